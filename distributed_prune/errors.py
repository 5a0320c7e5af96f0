"""User-facing errors.

A :class:`UserError` is bad input (unknown config key, bad ratio spec, missing file,
mismatched checkpoint).  The CLI turns it into one line on stderr and exit status 2,
never a traceback.  Library code raises it with a message that names the key or file.
"""


class UserError(ValueError):
    """Bad input from the user; the message names the offending key, value or file."""
