"""`lm4lv ft-mae` and `lm4lv recon-mae`."""

from lm4lv_core.errors import LM4LVError


def ft_mae() -> None:
    """Fine-tune the MAE decoder with L1 + LPIPS (not available in this version yet)."""
    raise LM4LVError("`lm4lv ft-mae` is not available in this version yet")


def recon_mae() -> None:
    """Reconstruct a folder of images with an MAE (not available in this version yet)."""
    raise LM4LVError("`lm4lv recon-mae` is not available in this version yet")
