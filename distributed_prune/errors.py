"""User-facing errors.

A :class:`UserError` is bad input (unknown config key, bad ratio spec, missing file,
mismatched checkpoint).  The CLI turns it into one line on stderr and exit status 2,
never a traceback.  Library code raises it with a message that names the key or file.
"""


class UserError(ValueError):
    """Bad input from the user; the message names the offending key, value or file."""


class TrainingDiverged(RuntimeError):
    """A training loss that is not finite (NaN or inf). The CLI prints the message (stage, epoch
    and step) as one line and exits with status 3, distinct from bad input (2)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds like Ctrl-C (files stay whole:
    every write is atomic); the CLI exits with status 143 (128 + SIGTERM)."""
