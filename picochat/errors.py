"""Errors meant for the user: their message names the culprit and the fix.

The CLI prints them as one line (`error: ...`) and exits with status 2,
instead of a traceback.
"""


class UserError(Exception):
    """Bad input from the user: a flag, a file, a directory, a request."""


class DataError(UserError):
    """A data file or directory is missing, empty or malformed."""


class ConfigError(UserError):
    """Flags or presets that cannot work together."""
