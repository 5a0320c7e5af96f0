"""Command-line plumbing shared by ``dprune`` and the modules that also run with
``python -m``: one argparse parser class, the option parsers for sizes, and the one error path.

Bad input is a :class:`~distributed_prune.errors.UserError`; :func:`run` turns it into one line
on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from .errors import Terminated, TrainingDiverged, UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad-argument errors are UserErrors (argparse's own ``error`` prints the
    whole usage and exits from inside the parser)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


MAX_INPUT_ELEMENTS = 1 << 27  # one sample of 512 MiB in fp32: far beyond any real input
MAX_SIDE = 16384  # pixels of a WIDTHxHEIGHT image; larger is a typo, not a benchmark


def check_at_least(option: str, value, least: int = 1) -> None:
    """``--option`` must be an integer >= ``least`` (argparse only checks that it is an integer)."""
    if value is not None and value < least:
        raise UserError(f"{option}: must be >= {least}, got {value}")


def check_output_file(option: str, path) -> None:
    """``--out FILE``-like options: a file name whose nearest existing ancestor is a directory.
    Checked before any work or write, so a long command never ends unable to save (and a bad
    second path never leaves the first file behind)."""
    if path is None:
        return
    p = Path(path)
    if not str(path).strip() or "\0" in str(path) or p.is_dir():
        raise UserError(f"{option} {str(path)!r}: expected a file name")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{option} {path}: {parent} is not a directory")
            break


def parse_input_size(text: str) -> tuple[int, ...]:
    """``--input-size 3,32,32`` -> ``(3, 32, 32)``."""
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--input-size: expected comma-separated integers like 3,32,32, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise UserError(f"--input-size: dimensions must be positive, got {text!r}")
    if math.prod(dims) > MAX_INPUT_ELEMENTS:
        raise UserError(f"--input-size {text}: {math.prod(dims)} values per sample, more than "
                        f"{MAX_INPUT_ELEMENTS} (a typo?)")
    return dims


def parse_image_size(text: str) -> tuple[int, int]:
    """argparse ``type`` for ``WIDTHxHEIGHT`` -> ``(width, height)``."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise argparse.ArgumentTypeError(f"width and height must lie in 1..{MAX_SIDE}, got {text!r}")
    return w, h


def run(main: Callable[[], "int | None"], prog: str = "dprune") -> int:
    """Exit status of ``main()``: its own, 2 after a UserError or a file system that refuses a
    write (one line on stderr), 3 when training diverged, 130 on Ctrl-C, 143 on SIGTERM, 0 when
    the reader of stdout went away (``dprune ... | head``)."""
    restore = _handle_sigterm()
    try:
        return int(main() or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"{prog}: error: training diverged: {e}", file=sys.stderr)
        return 3
    except OSError as e:
        if e.errno not in _NO_WRITE:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}cannot write ({e.strerror or os.strerror(e.errno)})", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{prog}: terminated (SIGTERM); the newest checkpoint is intact, run again to resume",
              file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        restore()


#: errno values of a write the file system refused: full disk, quota, read-only mount,
#: permission (they name a path the user chose, not a bug)
_NO_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _handle_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread (only where nobody installed a
    handler); returns the function that puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None

    def on_term(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)
