"""`lm4lv make-data` and `lm4lv eval`."""

from lm4lv_core.errors import LM4LVError


def make_data() -> None:
    """Build a restoration dataset from clean images (not available in this version yet)."""
    raise LM4LVError("`lm4lv make-data` is not available in this version yet")


def evaluate() -> None:
    """Score restored images with PSNR / SSIM / LPIPS (not available in this version yet)."""
    raise LM4LVError("`lm4lv eval` is not available in this version yet")
