"""User-facing errors: the CLI prints these as one clear message (no traceback) and exits with status 2.

Raise ``UserError`` for anything the user can fix (bad file, bad config value, missing output flag); its message
names the file or field and says what to do. Programming errors stay ordinary exceptions.
"""


class UserError(Exception):
    """An error caused by input the user controls; the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """A config file or --set override is invalid; the message names the field."""


class CheckpointError(UserError):
    """A checkpoint file cannot be read or is not a Flux checkpoint."""
