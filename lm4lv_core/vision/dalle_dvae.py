"""OpenAI's DALL-E dVAE decoder (the decoder of BEiT's image tokenizer), without the ``dall-e`` package.

:class:`DalleDecoder` has the parameter names and the computation of ``dall_e.decoder.Decoder``: one-hot
codes → 1×1 ``input`` conv → four groups of residual blocks, nearest ×2 upsampling between groups →
ReLU and 1×1 ``output`` conv to ``2 * output_channels`` logit-Laplace channels at 8× the code grid.
:meth:`DalleDecoder.decode_codes` gives pixels in [0, 1] as OpenAI's notebook does.
:func:`load_dalle_decoder` reads OpenAI's ``decoder.pkl`` (a whole pickled module) with a restricted
unpickler that neither imports ``dall_e`` nor runs pickled code, or a folder written by
:func:`save_dalle_decoder` (``config.json`` + ``model.safetensors``); :func:`convert` goes from one to the other.
"""

from __future__ import annotations

import json
import math
import pickle
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

LOGIT_LAPLACE_EPS = 0.1  # dall_e.utils.logit_laplace_eps
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "dalle-dvae-decoder"
# OpenAI's decoder; group_count is a class attribute there, not an attrs field: a pickle lacks it
DEFAULTS = {"group_count": 4, "n_init": 128, "n_hid": 256, "n_blk_per_group": 2, "output_channels": 3,
            "vocab_size": 8192}
EXPECTED = f"OpenAI's DALL-E decoder.pkl or a folder with {CONFIG_FILE} and {WEIGHTS_FILE} (save_dalle_decoder)"


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """DALL-E's ``unmap_pixels``: values in [eps, 1 - eps] → [0, 1], clamped."""
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


class Conv2d(nn.Module):
    """DALL-E's convolution: weight ``w`` ``[n_out, n_in, kw, kw]``, bias ``b``, 'same' padding, in the
    input's dtype (the original switches to fp16 on CUDA but for ``input``; here the caller chooses)."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw).normal_(std=1 / math.sqrt(n_in * kw ** 2)))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w.to(x.dtype), self.b.to(x.dtype), padding=(self.kw - 1) // 2)


class DecoderBlock(nn.Module):
    """``id_path(x) + post_gain * res_path(x)``, ``post_gain = 1 / n_layers**2``; ``res_path`` is
    ReLU-conv 1×1, then three ReLU-conv 3×3, through ``n_out // 4`` hidden channels."""

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / (n_layers ** 2)
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", Conv2d(n_in, n_hid, 1)),
            ("relu_2", nn.ReLU()), ("conv_2", Conv2d(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", Conv2d(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", Conv2d(n_hid, n_out, 3))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleDecoder(nn.Module):
    """``dall_e.decoder.Decoder``: one-hot codes ``[B, vocab_size, h, w]`` → logits
    ``[B, 2 * output_channels, s*h, s*w]`` with ``s = 2 ** (group_count - 1)`` (8 for OpenAI's).

    Group ``g`` (1-based) has ``2 ** (group_count - g) * n_hid`` channels (8, 4, 2, 1 × ``n_hid``), as
    the original with its fixed four groups; every block's ``post_gain`` is
    ``1 / (group_count * n_blk_per_group) ** 2``.
    """

    def __init__(self, group_count: int = 4, n_init: int = 128, n_hid: int = 256, n_blk_per_group: int = 2,
                 output_channels: int = 3, vocab_size: int = 8192) -> None:
        super().__init__()
        config = dict(group_count=group_count, n_init=n_init, n_hid=n_hid, n_blk_per_group=n_blk_per_group,
                      output_channels=output_channels, vocab_size=vocab_size)
        for k, v in config.items():
            if type(v) is not int or v < 1:
                raise ConfigError(f"DalleDecoder: {k} must be a positive integer, got {v!r}")
        self.config = config
        self.vocab_size, self.output_channels = vocab_size, output_channels
        self.upscale = 2 ** (group_count - 1)
        n_layers = group_count * n_blk_per_group
        layers: list[tuple[str, nn.Module]] = [("input", Conv2d(vocab_size, n_init, 1))]
        n_in = n_init
        for g in range(1, group_count + 1):
            width = 2 ** (group_count - g) * n_hid
            group: list[tuple[str, nn.Module]] = [
                (f"block_{i + 1}", DecoderBlock(n_in if i == 0 else width, width, n_layers))
                for i in range(n_blk_per_group)]
            if g < group_count:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            layers.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
            n_in = width
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", Conv2d(n_hid, 2 * output_channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One-hot (or soft) codes ``[B, vocab_size, h, w]`` → raw logits, computed in ``x``'s dtype."""
        if x.dim() != 4 or x.shape[1] != self.vocab_size:
            raise ValueError(f"DALL-E decoder: expected input [B, {self.vocab_size}, h, w], got {tuple(x.shape)}")
        return self.blocks(x)

    def check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` as int64 after checking they are ``[B, h, w]`` integers in ``[0, vocab_size)``."""
        if codes.dim() != 3 or codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"DALL-E codes must be integers [B, h, w], got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel():
            lo, hi = torch.stack([codes.min(), codes.max()]).tolist()
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"DALL-E codes must lie in [0, {self.vocab_size}), got values in [{lo}, {hi}]")
        return codes.long()

    def one_hot(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, h, w]`` → float32 one-hot ``[B, vocab_size, h, w]`` (the original's input)."""
        return F.one_hot(self.check_codes(codes), self.vocab_size).permute(0, 3, 1, 2).float()

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, h, w]`` → pixels ``[B, output_channels, s*h, s*w]`` in [0, 1], in float32.

        Equals ``unmap_pixels(sigmoid(self(self.one_hot(codes))[:, :output_channels]))``; the input
        1×1 convolution of a one-hot vector is computed as the equivalent column lookup, so the
        ``[B, vocab_size, h, w]`` one-hot tensor is never built. Gradients flow to the weights.
        """
        codes = self.check_codes(codes)
        inp = self.blocks.input
        x = inp.w.float()[:, :, 0, 0].t()[codes]  # [B, h, w, n_init]
        # channels-last like the original's permuted one-hot: same layout, same rounding, bit for bit
        x = x.permute(0, 3, 1, 2) + inp.b.float().view(1, -1, 1, 1)
        for layer in list(self.blocks)[1:]:
            x = layer(x)
        return unmap_pixels(torch.sigmoid(x[:, :self.output_channels])).contiguous()


# ---------------------------------------------------------------- reading OpenAI's pickled module

class _Stub:
    """Inert stand-in for a pickled module class: unpickling only fills its ``__dict__``
    (``dump_patches``: legacy torch files write no patch file when a class's source differs)."""

    pickled_as, dump_patches = "", False


_ALLOWED = {("torch", "device"): torch.device, ("collections", "OrderedDict"): OrderedDict,
            **{(m, t.__name__): t for m in ("builtins", "__builtin__") for t in (set, frozenset)},  # protocol 2
            **{("torch._utils", n): getattr(torch._utils, n)
               for n in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter")}}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only: inert stubs for ``dall_e.*`` and ``torch.nn.modules.*`` classes, torch's tensor
    and parameter rebuild functions, ``torch.device``, ``OrderedDict``, ``set`` and ``frozenset``;
    anything else (``os.system``, ``builtins.eval`` …) is an ``UnpicklingError``. ``torch.load``
    resolves the ``torch.*Storage`` names itself and reads the tensor data from its archive."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        if module.split(".")[0] == "dall_e" or module.startswith("torch.nn.modules."):
            return self._stubs.setdefault(full, type(name, (_Stub,), {"pickled_as": full, "__module__": module}))
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        raise pickle.UnpicklingError(f"refusing to load the global {full}")


def _restricted_pickle_module() -> types.ModuleType:
    """What ``torch.load(pickle_module=...)`` uses: ``Unpickler`` and ``load`` (legacy files)."""
    mod = types.ModuleType("lm4lv_restricted_pickle")
    mod.Unpickler = _RestrictedUnpickler
    mod.load = lambda f, **kwargs: _RestrictedUnpickler(f, **kwargs).load()
    return mod


def _read_pickle(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Hyper-parameters and state dict of a pickled ``dall_e.decoder.Decoder``."""
    try:
        with warnings.catch_warnings():  # legacy files: no source to compare a stub's with
            warnings.filterwarnings("ignore", "Couldn't retrieve source code")
            warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
            root = torch.load(path, map_location="cpu", pickle_module=_restricted_pickle_module(), weights_only=False)
    except Exception as e:  # a wrong or hostile file: any failure of the restricted unpickler
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: cannot read it as {EXPECTED} ({msg})") from None
    if getattr(root, "pickled_as", None) != "dall_e.decoder.Decoder":
        found = getattr(root, "pickled_as", None) or type(root).__name__
        raise ConfigError(f"{path}: expected {EXPECTED}; it holds a {found}, not a pickled dall_e.decoder.Decoder")
    fields = vars(root)
    config = {k: fields.get(k, v) for k, v in DEFAULTS.items()}
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(obj, prefix: str) -> None:
        parts = [vars(obj).get(k) or {} for k in ("_parameters", "_buffers", "_modules")] \
            if isinstance(obj, _Stub) and id(obj) not in seen and prefix.count(".") < 16 else [None]
        if not all(isinstance(p, dict) for p in parts):
            raise ConfigError(f"{path}: {prefix.rstrip('.') or 'the root'} is not a module of a DALL-E decoder")
        seen.add(id(obj))
        for name, t in [*parts[0].items(), *parts[1].items()]:
            if t is not None and not isinstance(t, torch.Tensor):
                raise ConfigError(f"{path}: {prefix}{name} is not a tensor")
            if t is not None:
                state[prefix + name] = t.detach()
        for name, m in parts[2].items():
            if m is not None:
                walk(m, f"{prefix}{name}.")

    walk(root, "")
    return config, state


def _build(config: dict, state: dict[str, torch.Tensor], path: Path) -> DalleDecoder:
    """A frozen float32 :class:`DalleDecoder` in eval mode with ``state`` as its weights."""
    try:
        with torch.device("meta"):
            model = DalleDecoder(**config)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{path}: invalid DALL-E decoder hyper-parameters {config} ({e})") from None
    own = model.state_dict()
    missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shape = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or extra or shape:
        raise ConfigError(f"{path}: weights do not fit a DALL-E decoder with {config}: missing {missing[:3]}, "
                          f"unexpected {extra[:3]}, wrong shape {shape[:3]}")
    model.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in state.items()}, assign=True)
    return model.requires_grad_(False).eval()


def _read_folder(folder: Path, weights: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file() or not weights.is_file():
        raise ConfigError(f"{folder}: expected {EXPECTED}; {cfg_path.name} or {weights.name} is missing")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_path}: not a JSON config of a DALL-E decoder ({e})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != MODEL_TYPE or set(raw) != {"model_type", *DEFAULTS}:
        raise ConfigError(f"{cfg_path}: expected model_type {MODEL_TYPE!r} and exactly the keys {sorted(DEFAULTS)}")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ConfigError(f"{weights}: not a readable safetensors file ({e})") from None
    return {k: raw[k] for k in DEFAULTS}, state


def load_dalle_decoder(path: str | Path) -> DalleDecoder:
    """Load a DALL-E dVAE decoder, frozen, in float32 and eval mode, on the CPU.

    ``path``: OpenAI's ``decoder.pkl`` (read without the ``dall_e`` package and without running
    pickled code), a folder from :func:`save_dalle_decoder`, or a ``.safetensors`` file of such weights
    with their ``config.json`` beside it.
    Raises :class:`ConfigError` naming the file when it is none of these.
    """
    path = Path(path)
    if path.is_dir():
        return _build(*_read_folder(path, path / WEIGHTS_FILE), path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; expected {EXPECTED}")
    if path.suffix == ".safetensors":
        return _build(*_read_folder(path.parent, path), path)
    return _build(*_read_pickle(path), path)


def save_dalle_decoder(model: DalleDecoder, folder: str | Path) -> Path:
    """Write ``folder/model.safetensors`` (float32, OpenAI's parameter names) and ``folder/config.json``
    (hyper-parameters), each atomically; return ``folder``."""
    from safetensors.torch import save_file

    from ..util.fsutil import atomic_path, write_json_atomic

    folder = Path(folder)
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    write_json_atomic(folder / CONFIG_FILE, {"model_type": MODEL_TYPE, **model.config})
    return folder


def convert(pkl: str | Path, out_folder: str | Path) -> Path:
    """One-time conversion of OpenAI's ``decoder.pkl`` to ``out_folder`` (config.json + model.safetensors)."""
    return save_dalle_decoder(load_dalle_decoder(pkl), out_folder)
