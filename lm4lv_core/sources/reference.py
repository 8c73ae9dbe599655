"""The reference implementation's artefacts (bytetriper/LM4LV), read into lm4lv's terms.

* Vision YAML (``stage2_MAE.yaml``, ``stage2_BEiT.yaml``, ``stage2_vqgan.yaml``, ...): top keys
  ``encoder``, ``adapter``, ``deadapter``, ``vision_loss``, ``decoder``, each
  ``{target: model.vision_modules.Class | model.losses.Class, params: {...}}``. :data:`TARGETS` is
  the one table from a reference class to an lm4lv family, adapter or loss, with its params.
* Train YAML (``train_bf16.yaml``, ``train_ds3.yaml``, ...): run keys and a ``deepspeed:`` section,
  mapped onto ``lm4lv train`` options (:func:`train_options`).
* Delta checkpoint (``pytorch_model.pt`` / ``pytorch_model_epN.pt``): a ``torch.save``d
  ``OrderedDict`` of tensors under the reference model's attribute names, read with
  ``weights_only=True`` and renamed to lm4lv's (:func:`read_delta_checkpoint`, :func:`to_lm4lv_names`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModuleSpec
from ..errors import ConfigError

PARTS = ("encoder", "adapter", "deadapter", "vision_loss", "decoder")


@dataclass(frozen=True)
class Target:
    """A reference class: the ``part`` it fills, lm4lv's registry ``name``, how its params map
    (``{ref_key: lm4lv_kwarg}``), the params lm4lv derives from the models (``derived``), and
    the reference's own behaviour the mapping keeps (``note``)."""

    part: str
    name: str
    params: dict[str, str] = field(default_factory=dict)
    derived: tuple[str, ...] = ()
    note: str = ""


# reference class name -> lm4lv; a class missing here has no lm4lv equivalent (one ConfigError)
TARGETS: dict[str, Target] = {
    # encoders
    "MAE_Encoder": Target("encoder", "mae", {"ckpt_path": "path", "mask_ratio": "mask_ratio"}),
    "BEiT_Encoder": Target("encoder", "beit", {"ckpt_path": "path", "layer": "layer"}),
    "CLIP_Encoder": Target("encoder", "clip", {"ckpt_path": "path", "feature_type": "feature", "im_size": "image_size"},
                           note="the reference loads OpenAI's ViT-L/14; lm4lv reads ckpt_path "
                                "[openai/clip-vit-large-patch14]"),
    "DinoV2_Encoder": Target("encoder", "dinov2", {"ckpt_path": "path", "clear_cls": "clear_cls",
                                                   "im_size": "image_size"}),
    "Mocov3_Encoder": Target("encoder", "timm", {"model_name": "model", "ckpt_path": "checkpoint"}),
    "VQ_Encoder": Target("encoder", "vqgan", {"im_size": "image_size"}, derived=("reshape",)),
    # adapters (widths follow from the encoder and the LLM)
    "Linear_Adapter": Target("adapter", "linear", derived=("in_features", "out_features")),
    "LoRA_Linear_Adapter": Target("adapter", "lowrank", {"hidden_dim": "rank"}, derived=("in_features", "out_features")),
    "Embedding_Adapter": Target("adapter", "embedding", derived=("num_embeddings", "embedding_dim")),
    "Identity_Adapter": Target("adapter", "identity"),
    "PInv_Adapter": Target("adapter", "pseudo_inverse"),
    # decoders
    "MAE_Decoder": Target("decoder", "mae", {"ckpt_path": "path"}),
    "BEiT_Decoder": Target("decoder", "beit-dvae", {"ckpt_path": "path", "dalle_decoder_path": "dvae"}),
    "VQ_Decoder": Target("decoder", "vqgan", {"im_size": "image_size"}, derived=("reshape",)),
    # vision losses (the token count follows from the encoder)
    "Feat_MSELoss": Target("vision_loss", "feature_mse", derived=("num_vision_tokens",)),
    "MAE_FeatLoss": Target("vision_loss", "feature_mse", derived=("num_vision_tokens",),
                           note="MAE_FeatLoss is not defined in the reference's code: read as feature MSE"),
    "MAE_PixelLoss": Target("vision_loss", "pixel_l1", derived=("num_vision_tokens",)),
    "VQ_CrossEntropyLoss": Target("vision_loss", "code_ce", derived=("num_vision_tokens",)),
}
# what lm4lv offers instead of a reference class it has no equivalent for
INSTEAD = {
    "Truncate_Adapter": "use --adapter linear with --num-visual-tokens N --token-select first|strided",
    "CLIP_Text_Encoder": "lm4lv encodes images only",
}
CLIP_DEFAULT = "openai/clip-vit-large-patch14"


def is_reference_vision_config(data: dict) -> bool:
    """The reference form: some top key holds ``{target: ..., params: ...}``."""
    return any(isinstance(v, dict) and "target" in v for v in data.values())


def _class_name(target: Any, where: str) -> str:
    if not isinstance(target, str) or not target.strip():
        raise ConfigError(f"{where}: target must be a class path such as model.vision_modules.MAE_Encoder")
    return target.strip().rsplit(".", 1)[-1]


def _accepts(part: str, name: str, kwarg: str) -> bool:
    """Whether lm4lv's ``name`` (an encoder / decoder family or an adapter) takes ``kwarg``."""
    from ..registry import ADAPTERS, DECODERS, ENCODERS

    reg = {"encoder": ENCODERS, "decoder": DECODERS, "adapter": ADAPTERS, "deadapter": ADAPTERS}.get(part)
    if reg is None:
        return False
    params = inspect.signature(reg.get(name)).parameters
    return kwarg in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _vq_source(params: dict, where: str) -> str:
    """The lm4lv ``vqgan`` source of ``config_path`` + ``ckpt_path``: their folder (config.yaml + model.ckpt)."""
    ckpt = params.get("ckpt_path")
    if not ckpt:
        raise ConfigError(f"{where}: needs ckpt_path (a latent-diffusion VQGAN model.ckpt)")
    ckpt = Path(str(ckpt))
    folder = ckpt if ckpt.is_dir() else ckpt.parent
    cfg = params.get("config_path")
    if not ckpt.is_dir() and (ckpt.name != "model.ckpt"
                              or (cfg and Path(str(cfg)).resolve() != (folder / "config.yaml").resolve())):
        raise ConfigError(f"{where}: lm4lv reads a VQGAN as one folder holding config.yaml and model.ckpt; "
                          f"put {cfg or 'config.yaml'} and {ckpt} there as those names")
    return str(folder)


def vision_fields(data: dict, source: str) -> tuple[dict[str, Any], list[str]]:
    """A reference vision YAML → ``ModelConfig`` fields (``encoder``, ``decoder``, ``adapter``,
    ``deadapter``, ``vision_loss``) and notes (params lm4lv does not take, and what it derives)."""
    unknown = sorted(set(data) - set(PARTS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; the reference form has "
                          f"{', '.join(PARTS)}")
    out: dict[str, Any] = {}
    unsupported, derived, notes = [], [], []
    for part in PARTS:
        entry = data.get(part)
        if entry is None:
            continue
        where = f"{source}: {part}"
        if not isinstance(entry, dict) or "target" not in entry:
            raise ConfigError(f"{where}: expected {{target: ..., params: {{...}}}}")
        cls = _class_name(entry["target"], where)
        params = entry.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}: params must be a mapping")
        t = TARGETS.get(cls)
        want = "adapter" if part == "deadapter" else part
        if t is None or t.part != want:
            hint = INSTEAD.get(cls) or f"valid {want} targets: " + ", ".join(
                k for k, v in TARGETS.items() if v.part == want)
            raise ConfigError(f"{where}: target {entry['target']} has no lm4lv equivalent ({hint})")
        if t.note:
            notes.append(t.note)
        name, kwargs = t.name, {}
        if cls in ("VQ_Encoder", "VQ_Decoder"):
            if params.get("quantize"):
                name = "vqgan-codes"
            kwargs["path"] = _vq_source(params, where)
            rest = {k: v for k, v in params.items() if k not in ("config_path", "ckpt_path", "quantize")}
        else:
            rest = dict(params)
        if cls == "CLIP_Encoder":
            kwargs["path"] = CLIP_DEFAULT
            if rest.get("feature_type") == "local":  # the reference drops CLS of local features
                rest["keep_cls"] = False
        for key, value in rest.items():
            kwarg = t.params.get(key) or ("keep_cls" if key == "keep_cls" else None)
            if key in t.derived:
                derived.append(f"{part}.{key}")
            elif kwarg and (kwarg == "path" or part == "vision_loss" or _accepts(part, name, kwarg)):
                kwargs[kwarg] = str(value) if kwarg in ("path", "dvae", "checkpoint") else value
            else:
                unsupported.append(f"{part}.{key}={value}")
        out[part] = name if part == "vision_loss" else ModuleSpec(name, kwargs)
    if unsupported:
        notes.append("not taken by lm4lv, ignored: " + ", ".join(unsupported))
    if derived:
        notes.append("derived from the models: " + ", ".join(derived))
    return out, notes


# ---------------------------------------------------------------------------- train YAML
# reference run key (dotted under deepspeed.) -> lm4lv train option
TRAIN_KEYS: dict[str, str] = {
    "seed": "seed", "warmup_rate": "warmup_ratio", "epochs": "epochs",
    "lora_r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
    "lora_target_modules": "lora_targets",
    "deepspeed.train_micro_batch_size_per_gpu": "micro_batch",
    "deepspeed.gradient_accumulation_steps": "grad_accum",
    "deepspeed.gradient_clipping": "grad_clip",
    "deepspeed.zero_optimization.stage": "zero_stage",
    "deepspeed.optimizer.params.lr": "lr",
    "deepspeed.optimizer.params.weight_decay": "weight_decay",
    "deepspeed.optimizer.params.betas": "beta1,beta2",
    "deepspeed.scheduler.type": "lr_schedule",
    "deepspeed.bf16.enabled": "precision",
    "deepspeed.fp16.enabled": "precision",
}
REFERENCE_RUN_KEYS = ("deepspeed", "warmup_rate", "lora_target_modules", "max_shard_size", "logging_step")


def is_reference_train_config(data: dict) -> bool:
    """The reference's ``train_*.yaml``: a ``deepspeed:`` section or its run keys."""
    return isinstance(data.get("deepspeed"), dict) or any(k in data for k in REFERENCE_RUN_KEYS[1:])


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and (key == "deepspeed" or key.startswith("deepspeed.")) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def train_options(data: dict, source: str, valid: set[str]) -> tuple[dict[str, Any], str]:
    """A reference train YAML → flat ``lm4lv train`` options (those in ``valid``) and one line
    naming the keys it maps and the ones it ignores."""
    flat = _flatten(data)
    opts: dict[str, Any] = {}
    mapped, ignored = [], []
    for key, value in flat.items():
        name = TRAIN_KEYS.get(key)
        if key == "deepspeed.scheduler.type":
            value = "reference" if value == "WarmupDecayLR" else None
        elif key in ("deepspeed.bf16.enabled", "deepspeed.fp16.enabled"):
            value = key.split(".")[1] if value else None
        elif key == "deepspeed.optimizer.params.betas":
            if not (isinstance(value, (list, tuple)) and len(value) == 2):
                raise ConfigError(f"{source}: deepspeed.optimizer.params.betas must be two numbers")
            if {"beta1", "beta2"} <= valid:
                opts["beta1"], opts["beta2"] = float(value[0]), float(value[1])
                mapped.append(f"{key}→beta1,beta2")
                continue
            name = None
        elif key == "deepspeed.optimizer.type" and str(value).lower() in ("adam", "adamw"):
            mapped.append(f"{key}→AdamW")
            continue
        if name and name in valid and value is not None:
            if name == "precision" and opts.get("precision") not in (None, value):
                raise ConfigError(f"{source}: both bf16 and fp16 are enabled")
            opts[name] = value
            mapped.append(f"{key}→{name}")
        else:
            ignored.append(key)
    line = (f"{source}: the reference's train config; mapped " + (", ".join(mapped) or "nothing")
            + "; ignored " + (", ".join(ignored) or "nothing"))
    return opts, line


# ---------------------------------------------------------------------------- delta checkpoint
REFERENCE_PREFIXES = (("llama_model.", "llm."), ("visual_encoder.", "encoder."), ("decoder.", "decoder."),
                      ("adapter.", "adapter."), ("deadapter.", "deadapter."))
REFERENCE_EMBEDDINGS = {"learnable_task_token": "task_tokens", "learnable_visual_query": "query_tokens"}


def read_delta_checkpoint(path: str | Path) -> dict[str, Any]:
    """A reference delta checkpoint: ``torch.load(weights_only=True)``, a mapping of tensors only."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not a delta checkpoint of tensors (a weights-only load refused it: "
                          f"{first[:200]})") from None
    if not isinstance(sd, dict):
        raise ConfigError(f"{path}: not a delta checkpoint (a {type(sd).__name__}, not a mapping of tensors)")
    bad = [str(k) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"{path}: not a delta checkpoint of tensors ({', '.join(bad[:3])} "
                          f"{'is not a tensor' if len(bad) == 1 else 'are not tensors'})")
    return dict(sd)


def is_reference_name(name: str) -> bool:
    return name in REFERENCE_EMBEDDINGS or name.startswith(("llama_model.", "visual_encoder."))


def to_lm4lv_names(sd: dict[str, Any], model_names: dict[str, Any], source: str) -> dict[str, Any]:
    """Reference names → lm4lv's (``model_names``: name → parameter of the lm4lv model, to pick a
    vision part's inner name by its suffix). The reference's ``[1, K, d]`` embeddings become ``[K, d]``.
    A name that maps nowhere in the model is kept as it is (the caller reports it)."""
    out: dict[str, Any] = {}
    for key, value in sd.items():
        if key in REFERENCE_EMBEDDINGS:
            out[REFERENCE_EMBEDDINGS[key]] = value[0] if value.dim() == 3 and value.shape[0] == 1 else value
            continue
        new = key
        for old, lm in REFERENCE_PREFIXES:
            if key.startswith(old):
                new = lm + key[len(old):]
                break
        if new not in model_names and new.startswith(("encoder.", "decoder.")):
            new = _by_suffix(new, model_names, source)
        out[new] = value
    return out


def _by_suffix(name: str, model_names: dict[str, Any], source: str) -> str:
    """A vision part's weight under lm4lv's inner module name: the one model name of that part
    sharing the longest dotted suffix (the reference and lm4lv wrap the same Hugging Face modules)."""
    part, _, inner = name.partition(".")
    pieces = inner.split(".")
    for n in range(len(pieces) - 1, 0, -1):
        tail = "." + ".".join(pieces[-n:])
        hits = [m for m in model_names if m.startswith(part + ".") and m.endswith(tail)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:  # ambiguous: left as it is
            break
    return name
