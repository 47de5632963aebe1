"""Exception types that separate user mistakes from bugs.

Entry points catch :class:`BiftaUserError` and print its message as one line (exit code 2);
anything else is a bug and keeps its traceback.
"""


class BiftaUserError(Exception):
    """A problem the user can fix: bad input, bad flag, missing file, unreachable weights."""


class ConfigError(BiftaUserError):
    """An invalid configuration value (flag, config file or Python API argument)."""


class LabelSetError(BiftaUserError):
    """A label set (classes, descriptions, descriptors, templates) is missing or malformed."""


class ModelLoadError(BiftaUserError):
    """Model weights cannot be obtained or do not fit the requested architecture."""


class InputError(BiftaUserError):
    """The input location is missing, empty or unreadable as a whole."""


class StorageError(BiftaUserError):
    """A permanent storage failure (no such key, access denied) for one object or location."""
