"""`lm4lv train`."""

from lm4lv_core.errors import LM4LVError


def train() -> None:
    """Train the adapters and task tokens of LM4LV (not available in this version yet)."""
    raise LM4LVError("`lm4lv train` is not available in this version yet")
