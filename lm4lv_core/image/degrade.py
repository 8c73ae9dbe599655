"""Image degradations: pure functions on HxWx3 uint8 arrays with an explicit RNG.

Every ``add_*`` function is deterministic given its arguments (random ones take a
``numpy.random.Generator``) and returns a new uint8 array; inputs are never modified.
Named degradations live in :data:`REGISTRY`; :func:`parse_spec` turns a spec string such as
``"blur:sigma=2+noise:sigma=15"`` into a :class:`Pipeline` that applies the steps in order.

A numeric value may be a range ``lo..hi`` (sampled uniformly per image) and any value may be a
list of alternatives ``a|b|c`` (one picked per image), e.g. ``noise:sigma=10..50`` or
``rotate:angle=90|180|270``. Sampling uses the same per-image generator as the degradation.
"""

from __future__ import annotations

import inspect
import io
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from ..errors import ConfigError
from ..registry import Registry

# --------------------------------------------------------------------------- helpers


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _check_image(img: np.ndarray) -> None:
    if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3
            and img.shape[2] == 3):
        raise ValueError("degradations take HxWx3 uint8 arrays")


def gaussian_kernel1d(sigma: float, radius: int) -> np.ndarray:
    """Normalised 1-D Gaussian of length ``2*radius+1``."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def motion_kernel(length: float, angle: float) -> np.ndarray:
    """Normalised line kernel of ``length`` pixels at ``angle`` degrees (0 = horizontal,
    90 = vertical), drawn with bilinear weights so that any angle is smooth."""
    n = max(1, int(round(length)))
    size = n if n % 2 else n + 1
    k = np.zeros((size, size), dtype=np.float64)
    c = size // 2
    t = np.linspace(-(n - 1) / 2, (n - 1) / 2, 4 * n) if n > 1 else np.zeros(1)
    th = math.radians(angle)
    xs, ys = c + t * math.cos(th), c - t * math.sin(th)
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0
    for dy, dx, w in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)),
                      (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        yy, xx = np.clip(y0 + dy, 0, size - 1), np.clip(x0 + dx, 0, size - 1)
        np.add.at(k, (yy, xx), w)
    return k / k.sum()


def _filter2d(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate each channel of a float HxWxC array with a 2-D kernel (reflect borders)."""
    return ndimage.correlate(x, kernel[:, :, None], mode="reflect")


_PIL_MODES = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
              "box": Image.Resampling.BOX}

# --------------------------------------------------------------------------- degradations


def add_noise(img: np.ndarray, rng: np.random.Generator, sigma: float = 25.0,
              gray: bool = False) -> np.ndarray:
    """Additive Gaussian noise with standard deviation ``sigma`` in 0–255 units.
    ``gray`` adds the same noise to the three channels."""
    _check_image(img)
    shape = img.shape[:2] + (1,) if gray else img.shape
    return _to_uint8(img.astype(np.float64) + rng.standard_normal(shape) * sigma)


def add_blur(img: np.ndarray, sigma: float = 2.0, ksize: int = 0) -> np.ndarray:
    """Isotropic Gaussian blur; ``ksize`` (odd) is the kernel size, 0 = 2*ceil(3*sigma)+1."""
    _check_image(img)
    if sigma <= 0:
        return img.copy()
    radius = ksize // 2 if ksize else max(1, math.ceil(3 * sigma))
    k = gaussian_kernel1d(sigma, radius)
    x = ndimage.correlate1d(img.astype(np.float64), k, axis=0, mode="reflect")
    return _to_uint8(ndimage.correlate1d(x, k, axis=1, mode="reflect"))


def add_motion_blur(img: np.ndarray, length: float = 15.0, angle: float = 0.0) -> np.ndarray:
    """Linear motion blur over ``length`` pixels in direction ``angle`` (degrees, 0 = horizontal)."""
    _check_image(img)
    if length <= 1:
        return img.copy()
    return _to_uint8(_filter2d(img.astype(np.float64), motion_kernel(length, angle)))


def add_rain(img: np.ndarray, rng: np.random.Generator, amount: float = 0.005,
             length: float = 20.0, angle: float = 75.0, width: int = 1,
             intensity: float = 0.7) -> np.ndarray:
    """Synthetic rain streaks: drops seeded at a fraction ``amount`` of the pixels, smeared
    into streaks of ``length`` px at ``angle`` degrees and ``width`` px, then screen-blended
    with opacity ``intensity`` (0–1)."""
    _check_image(img)
    h, w = img.shape[:2]
    seeds = (rng.random((h, w)) < amount) * rng.uniform(0.5, 1.0, (h, w))
    n = max(1, int(round(length)))
    streaks = ndimage.correlate(seeds, motion_kernel(n, angle), mode="constant") * n
    if width > 1:
        streaks = ndimage.maximum_filter1d(streaks, size=width, axis=1)
    rain = np.clip(streaks, 0.0, 1.0)[..., None] * intensity
    x = img.astype(np.float64)
    return _to_uint8(x + (255.0 - x) * rain)


def add_salt_pepper(img: np.ndarray, rng: np.random.Generator, amount: float = 0.05,
                    salt: float = 0.5) -> np.ndarray:
    """Each pixel becomes white (probability ``amount*salt``) or black
    (``amount*(1-salt)``), all three channels together."""
    _check_image(img)
    h, w = img.shape[:2]
    hit = rng.random((h, w)) < amount
    white = rng.random((h, w)) < salt
    out = img.copy()
    out[hit & white] = 255
    out[hit & ~white] = 0
    return out


def add_mask(img: np.ndarray, rng: np.random.Generator, ratio: float = 0.25, patch: int = 0,
             value: int = 0) -> np.ndarray:
    """Set exactly ``round(ratio * n)`` randomly chosen pixels (``patch`` = 0 or 1) or
    ``patch``x``patch`` grid cells to the grey level ``value``."""
    _check_image(img)
    h, w = img.shape[:2]
    cell = max(1, patch)
    gh, gw = math.ceil(h / cell), math.ceil(w / cell)
    flat = np.zeros(gh * gw, dtype=bool)
    flat[rng.choice(gh * gw, int(round(ratio * gh * gw)), replace=False)] = True
    grid = flat.reshape(gh, gw)
    if cell > 1:
        grid = np.repeat(np.repeat(grid, cell, axis=0), cell, axis=1)[:h, :w]
    out = img.copy()
    out[grid] = value
    return out


def add_jpeg(img: np.ndarray, quality: int = 30) -> np.ndarray:
    """JPEG compression round trip (Pillow encoder, 4:2:0 chroma subsampling)."""
    _check_image(img)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB")).copy()


def add_downup(img: np.ndarray, factor: float = 4.0, mode: str = "bicubic") -> np.ndarray:
    """Down-scale by ``factor`` then up-scale back to the original size (Pillow ``mode``)."""
    _check_image(img)
    h, w = img.shape[:2]
    small = (max(1, round(w / factor)), max(1, round(h / factor)))
    im = Image.fromarray(img).resize(small, _PIL_MODES[mode]).resize((w, h), _PIL_MODES[mode])
    return np.asarray(im).copy()


def add_lowlight(img: np.ndarray, rng: np.random.Generator, brightness: float = 0.3,
                 gamma: float = 1.5, noise: float = 0.0) -> np.ndarray:
    """Under-exposure: ``255 * brightness * (x/255)**gamma`` plus Gaussian noise of std
    ``noise`` (0–255 units)."""
    _check_image(img)
    y = 255.0 * brightness * (img.astype(np.float64) / 255.0) ** gamma
    if noise > 0:
        y = y + rng.standard_normal(img.shape) * noise
    return _to_uint8(y)


def rotate(img: np.ndarray, angle: int = 90) -> np.ndarray:
    """Rotate counter-clockwise by 90, 180 or 270 degrees (90/270 swap height and width)."""
    _check_image(img)
    return np.ascontiguousarray(np.rot90(img, k=(int(angle) // 90) % 4))


def flip(img: np.ndarray, direction: str = "h") -> np.ndarray:
    """Mirror horizontally (``h``, left-right) or vertically (``v``, top-bottom)."""
    _check_image(img)
    return np.ascontiguousarray(img[:, ::-1] if direction == "h" else img[::-1])


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Param:
    """One parameter of a named degradation. ``kind`` is int, float, bool or str."""

    name: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    odd_or_zero: bool = False

    def describe(self) -> str:
        if self.choices:
            rng = "|".join(map(str, self.choices))
        elif self.kind is bool:
            rng = "true|false"
        else:
            lo = "" if self.low is None else _fmt(self.low)
            hi = "" if self.high is None else _fmt(self.high)
            rng = f"{lo}..{hi}" if (lo or hi) else self.kind.__name__
        return f"{self.name}={_fmt(self.default)} ({rng}): {self.help}"

    def convert(self, text: str, where: str) -> Any:
        """Parse one literal value, checking type and bounds."""
        t = text.strip()
        try:
            if self.kind is bool:
                if t.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                v: Any = t.lower() in ("1", "true", "yes")
            elif self.kind is int:
                f = float(t)
                if not f.is_integer():
                    raise ValueError
                v = int(f)
            elif self.kind is float:
                v = float(t)
                if not math.isfinite(v):
                    raise ValueError
            else:
                v = t
        except ValueError:
            raise ConfigError(f"{where}: expected {self.kind.__name__}, got {text!r}") from None
        if self.choices is not None and v not in self.choices:
            raise ConfigError(f"{where}: must be one of {'|'.join(map(str, self.choices))}, "
                              f"got {text!r}")
        if (self.low is not None and v < self.low) or (self.high is not None and v > self.high):
            raise ConfigError(f"{where}: must be in [{_fmt(self.low)}, {_fmt(self.high)}], "
                              f"got {text!r}")
        if self.odd_or_zero and v != 0 and v % 2 == 0:
            raise ConfigError(f"{where}: must be odd (or 0 = automatic), got {text!r}")
        return v


@dataclass(frozen=True)
class Degradation:
    name: str
    fn: Callable[..., np.ndarray]
    help: str
    params: tuple[Param, ...]
    aliases: tuple[str, ...] = ()

    @property
    def uses_rng(self) -> bool:
        return "rng" in inspect.signature(self.fn).parameters

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


REGISTRY: Registry[Degradation] = Registry(
    "degradation", hint="`lm4lv make-data --list` describes them", normalize=_normalize)


def register(name: str, fn: Callable[..., np.ndarray], help: str, *params: Param,
             aliases: tuple[str, ...] = ()) -> None:
    """Add a named degradation; names and aliases must be unique."""
    REGISTRY.register(name, aliases)(Degradation(name, fn, help, tuple(params), aliases))


P = Param
register("noise", add_noise, "additive Gaussian noise",
         P("sigma", float, 25.0, "standard deviation, 0-255 units", 0, 255),
         P("gray", bool, False, "same noise in all channels"), aliases=("gaussian_noise",))
register("blur", add_blur, "Gaussian blur",
         P("sigma", float, 2.0, "standard deviation in pixels", 0, 50),
         P("ksize", int, 0, "odd kernel size, 0 = 2*ceil(3*sigma)+1", 0, 201, odd_or_zero=True),
         aliases=("gaussian_blur",))
register("motion_blur", add_motion_blur, "linear motion blur",
         P("length", float, 15.0, "blur length in pixels", 1, 201),
         P("angle", float, 0.0, "direction in degrees, 0 = horizontal", -360, 360),
         aliases=("motion",))
register("rain", add_rain, "synthetic rain streaks",
         P("amount", float, 0.005, "fraction of pixels seeding a streak", 0, 1),
         P("length", float, 20.0, "streak length in pixels", 1, 201),
         P("angle", float, 75.0, "streak direction in degrees, 90 = vertical", -360, 360),
         P("width", int, 1, "streak width in pixels", 1, 15),
         P("intensity", float, 0.7, "streak opacity", 0, 1))
register("salt_pepper", add_salt_pepper, "salt-and-pepper (impulse) noise",
         P("amount", float, 0.05, "fraction of pixels replaced", 0, 1),
         P("salt", float, 0.5, "share of replaced pixels that become white", 0, 1),
         aliases=("sp", "saltpepper"))
register("mask", add_mask, "random masking of pixels or square patches",
         P("ratio", float, 0.25, "fraction of pixels / patches masked", 0, 1),
         P("patch", int, 0, "patch size in pixels, 0 = single pixels", 0, 1024),
         P("value", int, 0, "grey level of masked pixels", 0, 255))
register("jpeg", add_jpeg, "JPEG compression artefacts",
         P("quality", int, 30, "JPEG quality", 1, 100))
register("downup", add_downup, "down-scale then up-scale (loss of detail)",
         P("factor", float, 4.0, "scale factor", 1, 64),
         P("mode", str, "bicubic", "resampling filter", choices=tuple(_PIL_MODES)),
         aliases=("downsample", "sr"))
register("lowlight", add_lowlight, "low light (dark, gamma, optional noise)",
         P("brightness", float, 0.3, "output scale", 0, 1),
         P("gamma", float, 1.5, "gamma applied before scaling", 0.1, 10),
         P("noise", float, 0.0, "Gaussian noise std, 0-255 units", 0, 255),
         aliases=("low_light",))
register("rotate", rotate, "rotation by a multiple of 90 degrees (counter-clockwise)",
         P("angle", int, 90, "rotation angle", choices=(90, 180, 270)))
register("flip", flip, "horizontal or vertical mirror",
         P("direction", str, "h", "h = left-right, v = top-bottom", choices=("h", "v")))
del P


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return format(v, "g")
    return str(v)


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class Value:
    """A parameter value as written: ``fixed`` literal, ``lo..hi`` range or ``a|b`` options."""

    options: tuple = ()
    low: Any = None
    high: Any = None

    def sample(self, rng: np.random.Generator, kind: type) -> Any:
        if self.low is not None:
            if kind is int:
                return int(rng.integers(self.low, self.high + 1))
            return float(rng.uniform(self.low, self.high))
        if len(self.options) == 1:
            return self.options[0]
        return self.options[int(rng.integers(len(self.options)))]

    @property
    def random(self) -> bool:
        return self.low is not None or len(self.options) > 1

    def text(self, sep_range: str = "..", sep_opt: str = "|") -> str:
        if self.low is not None:
            return f"{_fmt(self.low)}{sep_range}{_fmt(self.high)}"
        return sep_opt.join(_fmt(o) for o in self.options)


@dataclass(frozen=True)
class Step:
    """One named degradation with the parameters given explicitly (others use defaults)."""

    name: str
    values: tuple[tuple[str, Value], ...] = ()

    @property
    def degradation(self) -> Degradation:
        return REGISTRY.get(self.name)

    def params(self) -> dict[str, Any]:
        """All parameters; defaults filled in, random ones shown as written."""
        out = {p.name: p.default for p in self.degradation.params}
        for name, val in self.values:
            out[name] = val.text() if val.random else val.options[0]
        return out

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        d = self.degradation
        kw = {p.name: p.default for p in d.params}
        for name, val in self.values:
            kw[name] = val.sample(rng, d.param(name).kind)
        return d.fn(img, rng, **kw) if d.uses_rng else d.fn(img, **kw)

    def text(self) -> str:
        args = ",".join(f"{k}={v.text()}" for k, v in self.values)
        return f"{self.name}:{args}" if args else self.name

    def slug(self) -> str:
        args = "".join(f"_{k}{v.text('to', 'or')}" for k, v in self.values)
        return re.sub(r"[^A-Za-z0-9._-]", "_", self.name + args)


@dataclass(frozen=True)
class Pipeline:
    """Steps applied left to right (``a+b`` = a then b)."""

    steps: tuple[Step, ...]

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for step in self.steps:
            img = step(img, rng)
        return img

    @property
    def spec(self) -> str:
        """Canonical spec string (canonical names, parameters in definition order)."""
        return "+".join(s.text() for s in self.steps)

    @property
    def slug(self) -> str:
        """Folder-safe name, e.g. ``blur_sigma2+noise_sigma15``."""
        return "+".join(s.slug() for s in self.steps)


def _parse_value(p: Param, text: str, where: str) -> Value:
    if ".." in text and p.kind in (int, float) and "|" not in text:
        lo_t, _, hi_t = text.partition("..")
        lo, hi = p.convert(lo_t, where), p.convert(hi_t, where)
        if lo > hi:
            raise ConfigError(f"{where}: empty range {text!r}")
        return Value(low=lo, high=hi) if lo < hi else Value(options=(lo,))
    opts = tuple(p.convert(t, where) for t in text.split("|"))
    return Value(options=opts)


def parse_step(text: str) -> Step:
    """Parse ``name`` or ``name:k=v,k=v``."""
    name, _, args = text.strip().partition(":")
    if not name.strip():
        raise ConfigError(f"empty degradation name in {text!r}")
    d = REGISTRY.get(name)
    given: dict[str, Value] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip()
        p = d.param(key)
        if p is None:
            valid = ", ".join(q.name for q in d.params) or "none"
            raise ConfigError(f"degradation {d.name!r} has no parameter {key!r}; valid: {valid}")
        if not eq or not val.strip():
            raise ConfigError(f"{d.name}:{key} needs a value ({key}=...)")
        if key in given:
            raise ConfigError(f"{d.name}:{key} given twice")
        given[key] = _parse_value(p, val, f"{d.name}:{key}")
    order = [p.name for p in d.params]
    return Step(d.name, tuple(sorted(given.items(), key=lambda kv: order.index(kv[0]))))


def parse_spec(text: str) -> Pipeline:
    """Parse ``"blur:sigma=2+noise:sigma=15"`` into a :class:`Pipeline`.

    Raises :class:`~lm4lv_core.errors.ConfigError` (one line) for unknown names, unknown
    parameters or invalid values, listing the valid choices.
    """
    if not text or not text.strip():
        raise ConfigError("empty degradation spec")
    return Pipeline(tuple(parse_step(part) for part in text.split("+")))


def describe() -> list[dict[str, Any]]:
    """Rows for ``make-data --list``: name, aliases, description, parameter docs."""
    return [{"name": d.name, "aliases": list(d.aliases), "help": d.help,
             "params": [p.describe() for p in d.params]} for d in REGISTRY.values()]
