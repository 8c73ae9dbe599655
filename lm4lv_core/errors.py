"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class LM4LVError(Exception):
    """A problem with the user's input (file, sample, option) that they can fix."""


class DataError(LM4LVError):
    """A dataset file or sample is malformed; the message names the file and sample index."""


class ConfigError(LM4LVError):
    """An option or config file value is invalid; the message names the option."""
