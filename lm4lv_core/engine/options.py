"""Flat ``lm4lv train`` options → (``TrainConfig``, ``ModelConfig``).

Precedence, lowest first: built-in defaults, the run folder's ``config.yaml`` (with ``--resume``),
``--config FILE.yaml``, then options given on the command line. A config file holds any option
by its name (``micro-batch`` or ``micro_batch``), or is a run's resolved ``config.yaml``
(``{train: ..., model: ...}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import LoraConfig, ModelConfig, from_dict, load_yaml
from ..errors import ConfigError
from .config import TrainConfig, train_config_keys

MODEL_SOURCE = ("preset", "llm", "mae", "mae_decoder", "vision_config")
MODEL_FIELDS = ("template", "gpt_prefix", "num_task_tokens", "system_prompt", "vision_loss",
                "text_loss_weight", "vision_loss_weight",
                "train_adapter", "train_deadapter", "train_encoder", "train_decoder", "resize",
                "attn_implementation")
LORA = {"lora": "enabled", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
        "lora_targets": "target_modules"}
RUN_ONLY = ("out", "resume", "overwrite", "stop_after", "verbose")  # never taken from a saved run config


def _norm(d: dict[str, Any], source: str) -> dict[str, Any]:
    out = {str(k).replace("-", "_"): v for k, v in d.items()}
    valid = train_config_keys() | set(MODEL_SOURCE) | set(MODEL_FIELDS) | set(LORA) | {"image_root"}
    unknown = sorted(set(out) - valid - {"config", "dry_run"})
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}")
    return out


def _from_file(path: str, source: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Flat options and (for a resolved run config) the saved model config."""
    data = load_yaml(path)
    if "train" in data and isinstance(data["train"], dict):
        flat = {k: v for k, v in data["train"].items() if k not in RUN_ONLY}
        return flat, data.get("model")
    return _norm(data, source), None


def resolve_options(cli: dict[str, Any], config_file: str | None = None) -> tuple[TrainConfig, ModelConfig]:
    """Merge the option layers and build both configs (``None`` values mean "not given")."""
    from ..presets import resolve_model_config

    cli = {k: v for k, v in _norm(cli, "options").items() if v is not None}
    layers: list[dict[str, Any]] = []
    saved_model: dict[str, Any] | None = None
    out = cli.get("out")
    if cli.get("resume") and out and (Path(out) / "config.yaml").is_file():
        flat, saved_model = _from_file(str(Path(out) / "config.yaml"), f"{out}/config.yaml")
        layers.append(flat)
    if config_file:
        flat, model = _from_file(config_file, f"--config {config_file}")
        layers.append(flat)
        saved_model = model or saved_model
    layers.append(cli)
    opts: dict[str, Any] = {}
    for layer in layers:
        opts.update({k: v for k, v in layer.items() if v is not None})

    for key in ("data", "out"):
        if not opts.get(key):
            raise ConfigError(f"--{key} is required")
    train_kw = {k: v for k, v in opts.items() if k in train_config_keys()}
    train = from_dict(TrainConfig, train_kw, source="train options")

    fields = {k: opts[k] for k in MODEL_FIELDS if k in opts}
    sources = any(opts.get(k) for k in MODEL_SOURCE)
    if saved_model is not None and (cli.get("resume") or not sources):
        # a resumed run keeps its saved model (template, prefix, LoRA, ...); options given now override
        model = from_dict(ModelConfig, {**saved_model, **fields}, source="saved model config")
        if sources:
            given = resolve_model_config(**{k: opts.get(k) for k in MODEL_SOURCE}, **fields)
            for part in ("llm", "encoder", "decoder"):
                if getattr(given, part) != getattr(model, part):
                    raise ConfigError(f"--resume: the {part} given now differs from the run's "
                                      f"({getattr(model, part)}); drop the model options or start a new run")
    else:
        model = resolve_model_config(**{k: opts.get(k) for k in MODEL_SOURCE}, **fields)
    lora = {LORA[k]: opts[k] for k in LORA if k in opts}
    if lora:
        if isinstance(lora.get("target_modules"), str):
            lora["target_modules"] = [t.strip() for t in lora["target_modules"].split(",") if t.strip()]
        base = vars(model.lora).copy()
        base.update(lora)
        model.lora = LoraConfig(**base)
    return train, model
