"""`lm4lv generate`."""

from lm4lv_core.errors import LM4LVError


def generate() -> None:
    """Restore images / answer prompts with a trained model (not available in this version yet)."""
    raise LM4LVError("`lm4lv generate` is not available in this version yet")
