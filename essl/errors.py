"""User-facing errors.

Anything raised as :class:`UserError` is printed by the CLI as one line (no traceback unless ``--debug``)
and exits with code 2. Library code raises it for bad input: a missing file, a bad value, a foreign file.
"""


class UserError(Exception):
    """Bad input from the user: the message names the key, file or value, in one line."""
