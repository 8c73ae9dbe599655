"""`lm4lv quickstart`."""

from lm4lv_core.errors import LM4LVError


def quickstart() -> None:
    """Run the whole pipeline on bundled images and tiny models (not available in this version yet)."""
    raise LM4LVError("`lm4lv quickstart` is not available in this version yet")
