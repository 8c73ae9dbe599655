"""Image quality metrics: PSNR, SSIM (scikit-image) and LPIPS (the ``lpips`` package).

Protocol (as in the LM4LV evaluation): images are 8-bit RGB, ``crop_border`` pixels are
removed from every side before scoring, PSNR uses a data range of 255 and is 100 dB for
identical images, SSIM uses an 11x11 Gaussian window with sigma 1.5 (population covariance,
K1=0.01, K2=0.03) averaged over channels. ``y_channel=True`` scores the ITU-R BT.601 luma
(Y in [16, 235], from ``skimage.color.rgb2ycbcr``) instead of RGB.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from ..defaults import CROP_BORDER
from ..errors import ConfigError, LM4LVError
from ..util.fsutil import JsonStream, write_csv_atomic, write_json_atomic
from .io import load_rgb, pair_relative
from .pairs import PairPlan, ScoredRows
from ..registry import Registry

PSNR_IDENTICAL = 100.0
LPIPS_NETS = ("alex", "vgg")


# --------------------------------------------------------------------------- PSNR / SSIM


def _prepare(gt: np.ndarray, pred: np.ndarray, crop_border: int,
             y_channel: bool, as_float: bool = True) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise LM4LVError(f"image sizes differ: {gt.shape} vs {pred.shape}")
    if gt.ndim != 3 or gt.shape[2] != 3 or gt.dtype != np.uint8 or pred.dtype != np.uint8:
        raise ValueError("metrics take HxWx3 uint8 RGB arrays")
    if crop_border < 0:
        raise ConfigError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        if min(gt.shape[:2]) <= 2 * crop_border:
            raise LM4LVError(f"image of size {gt.shape[1]}x{gt.shape[0]} is too small for "
                             f"crop_border={crop_border}")
        gt = gt[crop_border:-crop_border, crop_border:-crop_border]
        pred = pred[crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        from skimage.color import rgb2ycbcr

        return rgb2ycbcr(gt)[..., 0], rgb2ycbcr(pred)[..., 0]
    if not as_float:
        return gt, pred
    return gt.astype(np.float64), pred.astype(np.float64)


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error; exact (integer arithmetic) for uint8 inputs."""
    if a.dtype == np.uint8:
        d = a.astype(np.int32)
        d -= b
        d *= d
        return float(np.mean(d, dtype=np.float64))
    return float(np.mean((a - b) ** 2, dtype=np.float64))


def psnr(gt: np.ndarray, pred: np.ndarray, crop_border: int = CROP_BORDER, y_channel: bool = False) -> float:
    """PSNR in dB of two HxWx3 uint8 RGB images (data range 255; identical images -> 100).

    The same value as ``skimage.metrics.peak_signal_noise_ratio(..., data_range=255)``: the squared
    errors of 8-bit images are summed exactly in integers (no float working copy)."""
    a, b = _prepare(gt, pred, crop_border, y_channel, as_float=False)
    err = _mse(a, b)
    if err == 0:
        return PSNR_IDENTICAL
    return float(10 * np.log10((255.0 ** 2) / err))


SSIM_SIGMA, SSIM_TRUNCATE = 1.5, 3.5  # scikit-image's Gaussian window: radius int(3.5 * 1.5 + 0.5) = 5 -> 11x11
SSIM_PAD = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)


_SSIM_WINDOW: np.ndarray | None = None


def _ssim_window() -> np.ndarray:
    """The 1-D Gaussian weights ``scipy.ndimage.gaussian_filter1d(sigma=1.5, truncate=3.5)`` uses
    (computed as it computes them)."""
    global _SSIM_WINDOW
    if _SSIM_WINDOW is None:
        x = np.arange(-SSIM_PAD, SSIM_PAD + 1)
        phi = np.exp(-0.5 / (SSIM_SIGMA * SSIM_SIGMA) * x ** 2)
        _SSIM_WINDOW = (phi / phi.sum())[::-1]
    return _SSIM_WINDOW


def _ssim_2d(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two 2-D float64 images exactly as ``skimage.metrics.structural_similarity(x, y,
    data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` computes it
    (equal to the last bit; tests/test_metrics.py checks it), without scikit-image's overheads:
    the five local moments are filtered with the same separable Gaussian (scipy.ndimage, rows then
    columns), and only inside the 5-pixel border that scikit-image crops before averaging."""
    from scipy.ndimage import correlate1d

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    p, w = SSIM_PAD, _ssim_window()

    def local_mean(m: np.ndarray) -> np.ndarray:  # = gaussian_filter(m, 1.5, truncate=3.5)[p:-p, p:-p]
        m = correlate1d(m, w, axis=0, mode="reflect")[p:-p]
        return correlate1d(m, w, axis=1, mode="reflect")[:, p:-p]

    ux, uy = local_mean(x), local_mean(y)
    uxx, uyy, uxy = local_mean(x * x), local_mean(y * y), local_mean(x * y)
    # scikit-image's arithmetic term for term, with fewer temporaries:
    # A1 = 2 ux uy + C1, A2 = 2 (uxy - ux uy) + C2, B1 = ux^2 + uy^2 + C1,
    # B2 = (uxx - ux^2) + (uyy - uy^2) + C2, S = (A1 A2) / (B1 B2)
    a1 = ux * uy
    a2 = np.subtract(uxy, a1, out=uxy)
    a2 *= 2
    a2 += c2
    a1 *= 2
    a1 += c1
    ux *= ux
    uy *= uy
    b2 = np.subtract(uxx, ux, out=uxx)
    b2 += np.subtract(uyy, uy, out=uyy)
    b2 += c2
    b1 = np.add(ux, uy, out=ux)
    b1 += c1
    b1 *= b2
    # the map goes into the crop of a full-size buffer so that its mean sums in the same order as
    # scikit-image's mean of its cropped map
    full = np.empty(x.shape, dtype=np.float64)
    s = full[p:-p, p:-p]
    np.multiply(a1, a2, out=s)
    s /= b1
    return s.mean(dtype=np.float64)


def ssim(gt: np.ndarray, pred: np.ndarray, crop_border: int = CROP_BORDER, y_channel: bool = False) -> float:
    """SSIM of two HxWx3 uint8 RGB images: 11x11 Gaussian window (sigma 1.5), averaged
    over channels (or on the Y channel); the value of scikit-image's ``structural_similarity``
    with those settings, computed without it (see :func:`_ssim_channels`)."""
    a, b = _prepare(gt, pred, crop_border, y_channel, as_float=y_channel)
    if min(a.shape[:2]) < 11:
        raise LM4LVError(f"SSIM needs images of at least 11x11 pixels after cropping, "
                         f"got {a.shape[1]}x{a.shape[0]}")
    if y_channel:
        return float(_ssim_2d(a, b))
    per_channel = [_ssim_2d(np.ascontiguousarray(a[..., c], dtype=np.float64),
                            np.ascontiguousarray(b[..., c], dtype=np.float64)) for c in range(a.shape[2])]
    return float(np.mean(np.asarray(per_channel)))


# --------------------------------------------------------------------------- LPIPS


# torchvision's file names of the ImageNet backbones (``AlexNet_Weights.IMAGENET1K_V1`` and
# ``VGG16_Weights.IMAGENET1K_V1``): known here so that finding the file does not import torchvision
LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


def lpips_backbone_file(net: str) -> str:
    """File name torchvision uses for the ImageNet backbone of ``net`` (alex | vgg)."""
    return LPIPS_BACKBONE_FILES[net]


def lpips_cache_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (torch hub cache; ``~/.cache/torch`` by default). Found as
    ``torch.hub.get_dir()`` finds it, without importing torch when this process has not."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "hub"):
        return Path(torch.hub.get_dir()) / "checkpoints"
    home = os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch")))
    return Path(home) / "hub" / "checkpoints"


def _load_backbone(lp: Any, net: str, weights: Path) -> None:
    """Copy a torchvision ``alexnet``/``vgg16`` state dict (``features.*``) into LPIPS."""
    import torch

    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is the user's file
        raise LM4LVError(f"{weights}: cannot read LPIPS backbone weights ({e})") from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    target = lp.net.state_dict()
    new = {}
    for key in target:  # slice{k}.{i}.weight <- features.{i}.weight
        _, idx, pname = key.split(".")
        src = f"features.{idx}.{pname}"
        if src not in sd or tuple(sd[src].shape) != tuple(target[key].shape):
            raise LM4LVError(f"{weights}: not a torchvision {net} backbone state dict "
                             f"({src} missing or of the wrong shape)")
        new[key] = sd[src]
    lp.net.load_state_dict(new)


def _lpips_module_class() -> type:
    """:class:`LPIPSModule`, defined on first use: torch is imported only when LPIPS is scored
    (PSNR / SSIM workers of ``lm4lv eval`` start without it)."""
    global _LPIPSModule
    if _LPIPSModule is not None:
        return _LPIPSModule
    import torch

    class LPIPSModule(torch.nn.Module):
        """Frozen LPIPS distance; see :func:`build_lpips`."""

        def __init__(self, lp: torch.nn.Module, net: str) -> None:
            super().__init__()
            self.lpips = lp
            self.net_name = net
            for p in self.parameters():
                p.requires_grad_(False)
            self.eval()

        def train(self, mode: bool = True) -> "LPIPSModule":  # always eval: dropout stays off
            return super().train(False)

        def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            """(N, 3, H, W) images in [0, 1] -> per-sample distance (N,)."""
            return self.lpips(pred, target, normalize=True).reshape(pred.shape[0])

    LPIPSModule.__qualname__ = "LPIPSModule"
    _LPIPSModule = LPIPSModule
    return LPIPSModule


_LPIPSModule: type | None = None


def __getattr__(name: str) -> Any:
    if name == "LPIPSModule":
        return _lpips_module_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lpips_weights_file(net: str, weights: str | os.PathLike | None = None) -> Path:
    """The backbone weights LPIPS (``net``) loads: ``weights``, or the torch hub cache's file;
    a one-line error when it is missing (nothing is downloaded)."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise LM4LVError(f"{path}: LPIPS backbone weights file not found")
        return path
    name = lpips_backbone_file(net)
    path = lpips_cache_dir() / name
    if not path.is_file():
        raise LM4LVError(
            f"LPIPS ({net}) needs the ImageNet backbone weights {name}, which are not in "
            f"{path.parent} and cannot be downloaded offline: copy {name} into that "
            f"folder (or set TORCH_HOME), or pass --lpips-weights FILE")
    return path


def build_lpips(net: str = "alex", weights: str | os.PathLike | None = None,
                random_backbone: bool = False) -> Any:
    """A frozen LPIPS module usable as a metric or a loss.

    ``module(pred, target)`` takes two float tensors of shape (N, 3, H, W) **in [0, 1]** and
    returns the per-sample distance, shape (N,). Gradients flow to the inputs; the module's
    own parameters are frozen and it always stays in eval mode (no dropout), even inside a
    model switched to ``train()``.

    The ImageNet backbone comes from ``weights`` (a torchvision state dict file) or from the
    torch hub cache (``$TORCH_HOME/hub/checkpoints/<torchvision file name>``); nothing is
    downloaded. ``random_backbone=True`` uses a random backbone (for tests only: its values
    are not LPIPS). The linear calibration heads ship with the ``lpips`` package.
    """
    import lpips

    if net not in LPIPS_NETS:
        raise ConfigError(f"unknown LPIPS network {net!r}; valid: {', '.join(LPIPS_NETS)}")
    path = None if random_backbone else lpips_weights_file(net, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lp = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if path is not None:
        _load_backbone(lp, net, path)

    return _lpips_module_class()(lp, net)


def lpips_score(module: Any, gt: np.ndarray, pred: np.ndarray, crop_border: int = CROP_BORDER) -> float:
    """LPIPS of two HxWx3 uint8 RGB images with a module from :func:`build_lpips`."""
    import torch

    from ..util.params import parameter_device

    a, b = _prepare(gt, pred, crop_border, False)
    dev = parameter_device(module)
    ta = torch.from_numpy(a / 255.0).permute(2, 0, 1)[None].float().to(dev)
    tb = torch.from_numpy(b / 255.0).permute(2, 0, 1)[None].float().to(dev)
    with torch.inference_mode():
        return float(module(tb, ta)[0])


# --------------------------------------------------------------------------- the metrics


@dataclass(frozen=True)
class Metric:
    """A full-reference metric: ``score(gt, pred, crop_border, y_channel, lpips_module)`` of two
    HxWx3 uint8 RGB images (``lpips_module``: from :func:`build_lpips`, used by LPIPS only)."""

    name: str
    higher_is_better: bool
    score: Callable[[np.ndarray, np.ndarray, int, bool, Any], float]


METRICS: Registry[Metric] = Registry("metric")
for _m in (Metric("psnr", True, lambda gt, pred, cb, y, _lp: psnr(gt, pred, cb, y)),
           Metric("ssim", True, lambda gt, pred, cb, y, _lp: ssim(gt, pred, cb, y)),
           Metric("lpips", False, lambda gt, pred, cb, _y, lp: lpips_score(lp, gt, pred, cb))):
    METRICS.register(_m.name)(_m)
del _m


# --------------------------------------------------------------------------- pairs / folders


@dataclass
class EvalReport:
    """Per-image rows (``name``, ``gt``, ``pred`` and one value per metric) and summary. ``rows``
    is a list, or the compact :class:`~lm4lv_core.image.pairs.ScoredRows` of a scored folder."""

    metrics: list[str]
    rows: Sequence[dict[str, Any]]
    unmatched_gt: list[str] = field(default_factory=list)
    unmatched_pred: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.rows)

    def values(self, metric: str) -> np.ndarray:
        """One metric's values over the rows, in order."""
        if isinstance(self.rows, ScoredRows):
            return self.rows.column(metric)
        return np.asarray([r[metric] for r in self.rows], dtype=float)

    def mean(self, metric: str) -> float:
        return float(np.mean(self.values(metric))) if self.count else math.nan

    def summary(self) -> dict[str, Any]:
        return {"count": self.count, "mean": {m: self.mean(m) for m in self.metrics},
                "settings": self.settings, "unmatched_gt": self.unmatched_gt,
                "unmatched_pred": self.unmatched_pred}

    def write_json(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, {**self.summary(), "images": JsonStream(self.rows)})

    def write_csv(self, path: str | os.PathLike) -> None:
        write_csv_atomic(path, ["name", "gt", "pred", *self.metrics], self.rows)


def _match_sizes(gt: np.ndarray, pred: np.ndarray, resize_to_smaller: bool,
                 name: str) -> tuple[np.ndarray, np.ndarray]:
    if gt.shape == pred.shape:
        return gt, pred
    if not resize_to_smaller:
        raise LM4LVError(f"{name}: sizes differ (GT {gt.shape[1]}x{gt.shape[0]}, prediction "
                         f"{pred.shape[1]}x{pred.shape[0]}); pass --resize-to-smaller to "
                         "resize both to the smaller size")
    h, w = min(gt.shape[0], pred.shape[0]), min(gt.shape[1], pred.shape[1])

    def fit(x: np.ndarray) -> np.ndarray:
        if x.shape[:2] == (h, w):
            return x
        return np.asarray(Image.fromarray(x).resize((w, h), Image.Resampling.BICUBIC))

    return fit(gt), fit(pred)


def score_pair(g: str | os.PathLike, p: str | os.PathLike, metrics: Sequence[str], crop_border: int,
               y_channel: bool, resize_to_smaller: bool, lpips_module: Any = None) -> dict[str, Any]:
    """The row of one (gt, pred) pair; any error about it (unreadable, too small, out of memory)
    is one ``LM4LVError`` naming the prediction's path (and the ground truth's when it is at fault)."""
    from ..util.memory import named_errors

    with named_errors("eval", p):
        gt_img = np.asarray(load_rgb(g))
        pr_img = np.asarray(load_rgb(p))
        gt_img, pr_img = _match_sizes(gt_img, pr_img, resize_to_smaller, str(p))
        row: dict[str, Any] = {"name": Path(p).name, "gt": str(g), "pred": str(p)}
        for m in metrics:
            row[m] = METRICS.get(m).score(gt_img, pr_img, crop_border, y_channel, lpips_module)
    return row


ON_ERROR = ("stop", "skip")


def check_on_error(value: str) -> str:
    if value not in ON_ERROR:
        raise ConfigError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {value!r}")
    return value


def score_pairs(pairs: Iterable[tuple[str | os.PathLike, str | os.PathLike]] | PairPlan,
                metrics: Sequence[str] = ("psnr", "ssim"), crop_border: int = CROP_BORDER,
                y_channel: bool = False, resize_to_smaller: bool = False,
                lpips_net: str = "alex", lpips_weights: str | os.PathLike | None = None,
                lpips_module: Any = None,
                progress: Callable[[int, int], None] | None = None, *, workers: int | None = 1,
                device: str | None = None, on_error: str = "stop",
                failures: list[tuple[str, str]] | None = None, done: dict[int, dict] | None = None,
                on_row: Callable[[int, dict], None] | None = None, _scorer: Any = None) -> EvalReport:
    """Score (gt, pred) image file pairs (or a :class:`PairPlan`). LPIPS ignores ``y_channel`` (it
    needs RGB).

    ``workers``: processes scoring in parallel (see :mod:`lm4lv_core.image.scoring`; rows keep the
    order of ``pairs``). ``on_error="skip"`` leaves a failed pair out and appends ``(path, reason)``
    to ``failures``; ``done``: rows by pair index already scored (``--resume``), not scored again;
    ``on_row(i, row)`` sees every newly scored row as it arrives. The report's rows are
    :class:`ScoredRows`: memory grows by a few floats per pair, not by a row dictionary."""
    from .scoring import Scorer

    metrics = validate_metrics(metrics)
    plan = pairs if isinstance(pairs, PairPlan) else PairPlan.of_pairs(list(pairs))
    rows = ScoredRows(plan, metrics)
    for i, row in (done or {}).items():
        rows.add(i, row)

    def sink(i: int, row: dict) -> None:
        rows.add(i, row)
        if on_row:
            on_row(i, row)

    settings = {"crop_border": crop_border, "y_channel": y_channel,
                "resize_to_smaller": resize_to_smaller}
    scorer = _scorer or Scorer(metrics, settings, lpips_net=lpips_net, lpips_weights=lpips_weights,
                               lpips_module=lpips_module, workers=workers, device=device)
    try:
        scorer.score(plan, progress=progress, on_error=on_error, failures=failures, done=done,
                     on_row=sink, collect=False)
    finally:
        if _scorer is None:
            scorer.close()
    if "lpips" in metrics:
        settings["lpips_net"] = scorer.lpips_net
    return EvalReport(list(metrics), rows, settings=settings)


def validate_metrics(metrics: Sequence[str] | str) -> list[str]:
    """Accept names or a comma list (``psnr,ssim``; ``all``); unknown names raise."""
    if isinstance(metrics, str):
        metrics = [metrics]
    out: list[str] = []
    for item in metrics:
        for m in filter(None, (s.strip().lower() for s in item.split(","))):
            names = list(METRICS) if m == "all" else [m]
            for n in names:
                if n not in METRICS:
                    raise ConfigError(f"unknown metric {m!r}; valid: {', '.join(METRICS)}, all")
                if n not in out:
                    out.append(n)
    if not out:
        raise ConfigError(f"no metric given; valid: {', '.join(METRICS)}, all")
    return out


def plan_pairs(gt: str | os.PathLike, pred: str | os.PathLike) -> tuple[PairPlan, list[str], list[str]]:
    """The pairs of two files or two folders (paired by relative path / stem, see
    :func:`lm4lv_core.image.io.pair_relative`; each named by its pairing key), and the unmatched
    relative paths of each folder."""
    gt, pred = Path(gt), Path(pred)
    for p in (gt, pred):
        if not p.exists():
            raise LM4LVError(f"{p}: no such file or folder")
    if gt.is_file() != pred.is_file():
        raise LM4LVError("GT and PRED must both be files or both be folders")
    if gt.is_file():
        return PairPlan.of_files(gt, pred), [], []
    pairs, only_gt, only_pred = pair_relative(gt, pred)
    if not pairs:
        raise LM4LVError(f"no image in {pred} matches one in {gt} by relative path or name "
                         f"({len(only_gt)} GT, {len(only_pred)} predicted images)")
    plan = PairPlan(gt, pred, [a for _, a, _ in pairs], [b for _, _, b in pairs])
    del pairs
    return plan, only_gt, only_pred


def evaluate_paths(metrics: Sequence[str] | str, gt: str | os.PathLike, pred: str | os.PathLike,
                   **kwargs: Any) -> EvalReport:
    """Score two files, or two folders paired by relative path / stem (see
    :func:`lm4lv_core.image.io.pair_relative`). Keyword arguments go to :func:`score_pairs`."""
    metrics = validate_metrics(metrics)
    plan, only_gt, only_pred = plan_pairs(gt, pred)
    return report_of(metrics, plan, only_gt, only_pred, **kwargs)


def report_of(metrics: Sequence[str], plan: PairPlan, only_gt: list[str], only_pred: list[str],
              **kwargs: Any) -> EvalReport:
    """Score planned pairs (:func:`plan_pairs`); rows are named by their pairing key."""
    report = score_pairs(plan, metrics, **kwargs)
    report.unmatched_gt, report.unmatched_pred = only_gt, only_pred
    return report
