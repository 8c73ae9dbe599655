"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class LM4LVError(Exception):
    """A problem with the user's input (file, sample, option) that they can fix."""


class DataError(LM4LVError):
    """A dataset file or sample is malformed; the message names the file and sample index."""


class ConfigError(LM4LVError):
    """An option or config file value is invalid; the message names the option."""


class OutputError(LM4LVError):
    """An output cannot be written (disk full, quota, read-only or forbidden folder); the
    message names the path and the cause (``cause``, e.g. ``No space left on device``).
    Earlier outputs are left intact."""

    def __init__(self, message: str, cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause

    def __reduce__(self):
        return (type(self), (str(self), self.cause))


class Diverged(LM4LVError):
    """Training stopped because its loss or gradients stayed non-finite (NaN / inf); the message
    names the step, the loss parts and the newest finite checkpoint. Exit code 2."""


class Interrupted(Exception):
    """A run stopped early on request (SIGTERM / Ctrl-C) after saving its progress; the message
    says where it stopped and how to continue. Not an error: the CLI exits with code 75."""
