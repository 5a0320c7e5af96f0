"""One step of ``dprune bench gpu`` in its own process (started by :func:`.gpu.run_step`):

    python -m distributed_prune.bench.gpu_child MODULE:FUNCTION RESULT.json SETTINGS_JSON

calls ``FUNCTION(settings)`` and writes its dict, with ``status`` ok / skipped / failed and the
result header (device, date, commit), to RESULT.json. Kept apart from the steps so that a step
module that fails to import is reported like any other failure.
"""
from __future__ import annotations

import importlib
import json
import sys
import traceback

from . import harness


class Skipped(Exception):
    """A step (or part of one) that cannot run here; the message says why."""


def main(argv: list[str]) -> int:
    target, result_file, settings = argv
    settings = json.loads(settings)
    # run as __main__, this file is a second module object: the steps raise the Skipped of the
    # importable one
    skipped = importlib.import_module("distributed_prune.bench.gpu_child").Skipped
    res: dict = {}
    rc = 0
    try:
        res["header"] = harness.env_info(settings["device"])
        module, _, name = target.partition(":")
        out = getattr(importlib.import_module(module), name)(settings)
        res.update(out or {})
        res["status"] = "ok"
    except Exception as e:  # noqa: BLE001  (any failure of a step is reported, never raised)
        missing = e.name if isinstance(e, ModuleNotFoundError) else None
        if isinstance(e, skipped):
            res.update(status="skipped", why=str(e))
        elif missing and missing.split(".")[0] != "distributed_prune":
            # an optional dependency the machine lacks (torch-pruning, FFCV, DeepSpeed, ...)
            res.update(status="skipped", why=f"needs the Python module {missing!r}, which is not installed "
                                             "(README: carrying wheels to an offline GPU node)")
        else:
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:300]
            res.update(status="failed", why=f"{type(e).__name__}: {first}")
            rc = 1
    harness.write_json(result_file, res)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
