"""Latent-diffusion / taming-transformers VQGAN checkpoints as a diffusers ``VQModel``.

A checkpoint folder holds ``config.yaml`` (``model.params``: ``embed_dim``, ``n_embed``,
``ddconfig``) and ``model.ckpt`` (a torch file whose ``state_dict`` uses taming's module names).
Neither Lightning nor the taming / latent-diffusion packages are needed:

- :func:`read_ckpt_state_dict` reads the tensors; a pickled Lightning callback (or any other
  class) becomes an inert stub and no pickled code runs.
- :func:`ldm_vq_config` turns the YAML into ``VQModel`` constructor arguments.
- :func:`ldm_to_diffusers_vq` renames the weights (decoder levels reversed, 1×1 attention convs
  squeezed to linear weights) and drops the training loss (discriminator, LPIPS).
- :func:`load_ldm_vqmodel` does all three and loads the weights strictly.

diffusers ``VQModel`` (0.42) in brief: ``encode(x).latents`` are the pre-quantisation latents
(after ``quant_conv``); ``quantize(h)[2][2]`` holds the codes, flattened to ``[B * h * w]``;
``quantize.get_codebook_entry(codes, (B, h, w, C))`` gives their latents, decoded without
re-quantising by ``decode(z, force_not_quantize=True)`` (plain ``decode`` snaps its input).
"""

from __future__ import annotations

import pickle
import re
import types
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import ConfigError

CONFIG_FILE = "config.yaml"
CKPT_FILE = "model.ckpt"

# ---------------------------------------------------------------------------------------------
# Reading model.ckpt without Lightning and without running pickled code
# ---------------------------------------------------------------------------------------------


class _Inert:
    """Stands in for a pickled class that is not on the allow-list (a Lightning callback,
    ``argparse.Namespace``, ``os.system`` …). Calling, constructing and restoring it only
    record the arguments; it has no behaviour, so unpickling never runs the original code."""

    pickled_as = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []

    def __setstate__(self, state) -> None:
        self.state = state

    def __setitem__(self, key, value) -> None:
        self.items.append((key, value))

    def append(self, item) -> None:
        self.items.append(item)

    def extend(self, items) -> None:
        self.items.extend(items)

    def __repr__(self) -> str:
        return f"<inert stand-in for {self.pickled_as}>"


_REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
               "_rebuild_parameter_with_state")


def _allowed_global(module: str, name: str):
    """The object for ``module.name`` when it only rebuilds tensors or plain containers, else None."""
    import _codecs
    import builtins

    if module == "torch._utils" and name in _REBUILDERS:
        return getattr(torch._utils, name, None)
    if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
        return torch._tensor._rebuild_from_type_v2
    if module in ("torch", "torch.storage"):
        obj = vars(torch).get(name)
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            return obj
        if obj in (torch.Size, torch.device, torch.Tensor) or (obj is not None and obj in torch._storage_classes):
            return obj
    if (module, name) == ("torch.nn.parameter", "Parameter"):
        return torch.nn.Parameter
    if (module, name) == ("collections", "OrderedDict"):
        return OrderedDict
    if (module, name) == ("_codecs", "encode"):  # how protocol 2 pickles bytes
        return _codecs.encode
    if module in ("builtins", "__builtin__") and name in ("set", "frozenset", "bytearray", "complex", "slice"):
        return getattr(builtins, name)
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :func:`_allowed_global` names; every other class or function becomes a
    fresh :class:`_Inert` subclass named after it (one per name, so identities are kept)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        obj = _allowed_global(module, name)
        if obj is not None:
            return obj
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = type(str(name), (_Inert,), {"pickled_as": f"{module}.{name}"})
        return self._stubs[key]


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


# ``torch.load(pickle_module=...)`` needs ``Unpickler`` (and ``load`` for the legacy format).
_restricted_pickle = types.ModuleType("lm4lv_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = _restricted_load


def read_ckpt_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a ``model.ckpt`` (or the file itself when it is a bare state dict).

    First ``torch.load(weights_only=True)``; when the pickle names classes outside torch's safe
    list (a Lightning checkpoint's callbacks, hyper-parameters), it is read again with an
    unpickler that resolves only tensor-rebuilding functions, dtypes, storages and plain
    containers and replaces every other class by an inert stub: Lightning is never imported and
    no pickled code runs. Raises ``ConfigError`` naming the file when it cannot be read or holds
    something other than tensors under ``state_dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint file (expected a torch model.ckpt)")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except Exception as e:  # corrupt, truncated, not a torch file
        raise ConfigError(f"{path}: cannot read it as a torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        sd = obj["state_dict"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj  # a bare state dict
    else:
        what = f"keys {', '.join(map(repr, list(obj)[:5]))}" if isinstance(obj, dict) else type(obj).__name__
        raise ConfigError(f"{path}: expected a dict with a 'state_dict' of tensors, got {what}")
    if not isinstance(sd, dict) or not sd:
        raise ConfigError(f"{path}: its 'state_dict' is not a non-empty dict of tensors")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"{path}: state_dict entries that are not tensors: "
                          f"{', '.join(map(repr, bad[:5]))}{' …' if len(bad) > 5 else ''}")
    return {k: v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------
# config.yaml → VQModel config
# ---------------------------------------------------------------------------------------------


def ldm_vq_config(yaml_dict: dict, source: str = CONFIG_FILE) -> dict:
    """diffusers ``VQModel`` constructor arguments for an ldm / taming VQ autoencoder config.

    Reads ``model.params.{n_embed, embed_dim}`` and ``model.params.ddconfig.{ch, ch_mult,
    num_res_blocks, attn_resolutions, in_channels, out_ch, resolution, z_channels, double_z}``.
    Level ``i`` works at ``resolution / 2**i``; levels whose resolution is in
    ``attn_resolutions`` get the attention block types (the decoder's list is reversed, as
    diffusers builds it from the lowest resolution up). diffusers' decoder has
    ``layers_per_block + 1`` resnets per level, like taming's ``num_res_blocks + 1``.
    ``source`` names the file in errors (``ConfigError``).
    """
    try:
        return _vq_config(yaml_dict, source)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: a model.params value has the wrong type ({e})") from None


def _vq_config(yaml_dict: dict, source: str) -> dict:
    def need(mapping, key, where):
        if not isinstance(mapping, dict) or key not in mapping:
            raise ConfigError(f"{source}: missing {where}{key} (expected an ldm/taming VQ autoencoder config)")
        return mapping[key]

    params = need(need(yaml_dict, "model", ""), "params", "model.")
    if isinstance(params, dict) and "ddconfig" not in params and "first_stage_config" in params:
        raise ConfigError(f"{source}: a full latent-diffusion config; expected the first-stage VQ "
                          f"autoencoder's own folder (model.params.ddconfig)")
    dd = need(params, "ddconfig", "model.params.")
    where = "model.params.ddconfig."
    ch, ch_mult = int(need(dd, "ch", where)), [int(m) for m in need(dd, "ch_mult", where)]
    resolution = int(need(dd, "resolution", where))
    attn = {int(r) for r in (dd.get("attn_resolutions") or [])}
    unsupported = {
        "model.params.ddconfig.double_z must be false for a VQ model": bool(dd.get("double_z", False)),
        "model.params.ddconfig.ch_mult must start with 1": not ch_mult or ch_mult[0] != 1,
        "model.params.ddconfig.resamp_with_conv must be true": not dd.get("resamp_with_conv", True),
        "model.params.ddconfig.attn_type must be 'vanilla'": dd.get("attn_type", "vanilla") != "vanilla",
        "model.params.ddconfig.tanh_out / give_pre_end are not supported":
            bool(dd.get("tanh_out")) or bool(dd.get("give_pre_end")),
        "model.params.remap (codebook remapping) is not supported": bool(params.get("remap")),
    }
    for message, failed in unsupported.items():
        if failed:
            raise ConfigError(f"{source}: {message}")
    if ch % 32:
        raise ConfigError(f"{source}: model.params.ddconfig.ch must be a multiple of 32 (GroupNorm groups), got {ch}")
    has_attn = [resolution // 2**i in attn for i in range(len(ch_mult))]
    return {
        "in_channels": int(need(dd, "in_channels", where)),
        "out_channels": int(need(dd, "out_ch", where)),
        "down_block_types": tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in has_attn),
        "up_block_types": tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(has_attn)),
        "block_out_channels": tuple(ch * m for m in ch_mult),
        "layers_per_block": int(need(dd, "num_res_blocks", where)),
        "act_fn": "silu",
        "latent_channels": int(need(dd, "z_channels", where)),
        "sample_size": resolution,
        "num_vq_embeddings": int(need(params, "n_embed", "model.params.")),
        "norm_num_groups": 32,
        "vq_embed_dim": int(need(params, "embed_dim", "model.params.")),
        "scaling_factor": 1.0,  # ldm VQ first stages are used unscaled; VQModel itself never uses it
        "norm_type": "group",
        "mid_block_add_attention": True,
    }


# ---------------------------------------------------------------------------------------------
# taming state dict → diffusers state dict
# ---------------------------------------------------------------------------------------------

_AE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
_LEAF = r"(weight|bias)"
_PATTERNS = [  # (regex on the key without "encoder."/"decoder.", kind)
    (re.compile(rf"(conv_in|conv_out|norm_out)\.{_LEAF}$"), "top"),
    (re.compile(rf"(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.{_LEAF}$"), "resnet"),
    (re.compile(rf"(down|up)\.(\d+)\.attn\.(\d+)\.(\w+)\.{_LEAF}$"), "attn"),
    (re.compile(rf"(down|up)\.(\d+)\.(downsample|upsample)\.conv\.{_LEAF}$"), "resample"),
    (re.compile(rf"mid\.(block_1|block_2)\.(\w+)\.{_LEAF}$"), "mid_resnet"),
    (re.compile(rf"mid\.attn_1\.(\w+)\.{_LEAF}$"), "mid_attn"),
]


def _map_key(key: str, num_levels: int) -> str | None:
    """The diffusers name of one taming autoencoder key, or None when it has no counterpart."""
    if key in ("quantize.embedding.weight", "quant_conv.weight", "quant_conv.bias",
               "post_quant_conv.weight", "post_quant_conv.bias"):
        return key
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return None
    for regex, kind in _PATTERNS:
        m = regex.match(rest)
        if not m:
            continue
        g, leaf = m.groups(), m.groups()[-1]
        if kind == "top":
            return f"{part}.{_TOP[g[0]]}.{leaf}"
        if kind in ("mid_resnet", "mid_attn"):
            table, sub = (_RESNET, g[1]) if kind == "mid_resnet" else (_ATTN, g[0])
            if sub not in table:
                return None
            prefix = f"mid_block.resnets.{int(g[0] == 'block_2')}" if kind == "mid_resnet" else "mid_block.attentions.0"
            return f"{part}.{prefix}.{table[sub]}.{leaf}"
        direction, level = g[0], int(g[1])
        if (direction == "down") != (part == "encoder"):
            return None
        block = (f"down_blocks.{level}" if direction == "down" else f"up_blocks.{num_levels - 1 - level}")
        if kind == "resample":
            if g[2] != ("downsample" if direction == "down" else "upsample"):
                return None
            return f"{part}.{block}.{'downsamplers' if direction == 'down' else 'upsamplers'}.0.conv.{leaf}"
        table = _RESNET if kind == "resnet" else _ATTN
        if g[3] not in table:
            return None
        return f"{part}.{block}.{'resnets' if kind == 'resnet' else 'attentions'}.{int(g[2])}.{table[g[3]]}.{leaf}"
    return None


def ldm_to_diffusers_vq(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a taming / ldm VQ autoencoder state dict to diffusers ``VQModel`` names.

    Keys outside the autoencoder (``loss.*``: discriminator, LPIPS; EMA copies, …) are dropped.
    Attention ``q/k/v/proj_out`` 1×1 conv weights ``[C, C, 1, 1]`` become linear ``[C, C]``
    (``to_q/to_k/to_v/to_out.0``); decoder level ``up.i`` becomes ``up_blocks.(L-1-i)``.
    An autoencoder key with no counterpart raises one ``ConfigError`` naming the first few.
    """
    levels = [int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
    num_levels = max(levels) + 1 if levels else 0
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in state_dict.items():
        if not key.startswith(_AE_PARTS):
            continue
        new = _map_key(key, num_levels)
        if new is None:
            unmapped.append(key)
            continue
        if value.ndim == 4 and re.search(r"\.(to_q|to_k|to_v|to_out\.0)\.weight$", new):
            value = value.reshape(value.shape[0], value.shape[1])  # 1×1 conv → linear
        out[new] = value
    if unmapped:
        raise ConfigError(f"{len(unmapped)} checkpoint key(s) have no VQModel counterpart: "
                          f"{', '.join(unmapped[:5])}{' …' if len(unmapped) > 5 else ''}")
    return out


# ---------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------


def is_ldm_vq_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds ``config.yaml`` and ``model.ckpt`` (an ldm / taming checkpoint)."""
    folder = Path(folder)
    return (folder / CONFIG_FILE).is_file() and (folder / CKPT_FILE).is_file()


def _check_keys(mapped: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], ckpt: Path) -> None:
    """One ``ConfigError`` for missing, unexpected or wrongly shaped weights."""
    def few(keys):
        keys = sorted(keys)
        return ", ".join(keys[:5]) + (" …" if len(keys) > 5 else "")

    missing, extra = expected.keys() - mapped.keys(), mapped.keys() - expected.keys()
    shapes = [f"{k} {tuple(mapped[k].shape)} vs {tuple(v.shape)}"
              for k, v in expected.items() if k in mapped and mapped[k].shape != v.shape]
    problems = ([f"{len(missing)} missing ({few(missing)})"] if missing else []) + \
               ([f"{len(extra)} unexpected ({few(extra)})"] if extra else []) + \
               ([f"{len(shapes)} of another shape ({'; '.join(shapes[:3])})"] if shapes else [])
    if problems:
        raise ConfigError(f"{ckpt}: weights do not match the VQModel built from {CONFIG_FILE}: "
                          + "; ".join(problems))


def load_ldm_vqmodel(folder: str | Path, dtype: torch.dtype = torch.float32):
    """A diffusers ``VQModel`` (eval mode) from an ldm / taming folder (``config.yaml`` + ``model.ckpt``).

    The weights are loaded strictly in ``dtype``, except the quantiser (codebook), which stays
    float32 so nearest-code search is exact. With another ``dtype``, callers pass ``h.float()`` to
    ``quantize`` and cast ``get_codebook_entry``'s output to ``dtype`` before
    ``decode(..., force_not_quantize=True)``; diffusers does neither (plain ``decode`` fails).
    Raises ``ConfigError`` naming the file at fault.
    """
    import yaml
    from diffusers import VQModel

    folder = Path(folder)
    if not is_ldm_vq_folder(folder):
        raise ConfigError(f"{folder}: expected an ldm/taming VQ checkpoint folder with {CONFIG_FILE} and {CKPT_FILE}")
    cfg_path = folder / CONFIG_FILE
    try:
        raw = yaml.safe_load(cfg_path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{cfg_path}: cannot read it as YAML ({e})") from None
    config = ldm_vq_config(raw, source=str(cfg_path))
    ckpt = folder / CKPT_FILE
    state_dict = read_ckpt_state_dict(ckpt)
    try:
        mapped = ldm_to_diffusers_vq(state_dict)
    except ConfigError as e:
        raise ConfigError(f"{ckpt}: {e}") from None
    with torch.device("meta"):  # no random init: every weight comes from the checkpoint
        model = VQModel(**config)
    _check_keys(mapped, model.state_dict(), ckpt)
    mapped = {k: v.to(torch.float32 if k.startswith("quantize.") else dtype) for k, v in mapped.items()}
    model.load_state_dict(mapped, strict=True, assign=True)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ConfigError(f"{ckpt}: VQModel tensors not set by the checkpoint: {', '.join(left[:5])}")
    return model.eval()
