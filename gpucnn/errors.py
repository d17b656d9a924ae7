"""The exception for failures the user caused and can fix.

``gpucnn`` (the CLI) prints a UserError as one line, ``gpucnn: error: ...``, and
exits with status 2; any other exception is a bug and keeps its traceback.
Each concrete error also derives from the builtin a Python caller expects
(ValueError for bad settings and files, OSError for the output folder).
"""


class UserError(Exception):
    """A bad setting, input file, output folder or device request; the message says
    what was wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A training or evaluation setting is out of range or clashes with a checkpoint."""


class RunFolderError(UserError, OSError):
    """The output folder cannot be used: not a folder, not writable, in use, or
    already holding a run."""


class DiskFullError(UserError, OSError):
    """A file could not be written because the disk (or a size quota) is full."""


class DeviceError(UserError, RuntimeError):
    """The requested device cannot be used here (no CuPy, no GPU, a bad device name)."""
