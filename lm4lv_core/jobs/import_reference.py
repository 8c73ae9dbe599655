"""``lm4lv import-reference``: a reference delta checkpoint (``pytorch_model*.pt``) → an lm4lv saved
model folder (``lm4lv.yaml``, ``trainable.safetensors``, ``lora/``), usable by ``lm4lv generate --run``.

The checkpoint holds the trained weights only; the model around them (LLM, encoder, decoder,
template, LoRA geometry) comes from the same model options as ``lm4lv train`` or from an lm4lv
run / saved model (``config_from``). What the checkpoint itself tells is taken from it: the number
of task tokens, a learnable query, and whether the encoder / decoder were trained.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

from ..config import LoraConfig, ModelConfig
from ..errors import ConfigError


def model_config(options: dict[str, Any], config_from: str | None) -> ModelConfig:
    """The model around the checkpoint: ``config_from``'s (a run, checkpoint or saved model) with
    ``options``' model fields over it, or the model options alone (as ``lm4lv train`` reads them)."""
    from ..model.options import resolve_model_config
    from .train import LORA, MODEL_FIELDS, MODEL_SOURCE

    opts = {k: v for k, v in options.items() if v is not None}
    fields = {k: opts[k] for k in MODEL_FIELDS if k in opts}
    if config_from:
        if any(opts.get(k) for k in MODEL_SOURCE):
            raise ConfigError("use either --config-from or model options (--preset, --llm, --vision-config, ...), not both")
        from ..engine.model_source import find_model

        try:
            cfg = copy.deepcopy(find_model(config_from).model)
        except ConfigError as e:
            raise ConfigError(str(e).replace("--run ", "--config-from ", 1)) from None
        cfg = ModelConfig(**{**vars(cfg), **fields})
    else:
        cfg = resolve_model_config(**{k: opts.get(k) for k in MODEL_SOURCE}, **fields)
    lora = {LORA[k]: opts[k] for k in LORA if k in opts}
    if lora:
        if isinstance(lora.get("target_modules"), str):
            lora["target_modules"] = [t.strip() for t in lora["target_modules"].split(",") if t.strip()]
        cfg.lora = LoraConfig(**{**vars(cfg.lora), **lora})
    return cfg


def _fit_to_checkpoint(cfg: ModelConfig, weights: dict, pt: str) -> None:
    """What the checkpoint tells about the model: K task tokens, a query, trained vision parts, LoRA."""
    task = weights.get("learnable_task_token")
    if task is not None:
        cfg.num_task_tokens = int(task.shape[-2])
    if "learnable_visual_query" in weights:
        cfg.query = True
    cfg.train_encoder = cfg.train_encoder or any(k.startswith("visual_encoder.") for k in weights)
    cfg.train_decoder = cfg.train_decoder or any(k.startswith("decoder.") for k in weights)
    lora = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights if ".lora_A." in k})
    if lora and not cfg.lora.enabled:
        rank = next(int(v.shape[0]) for k, v in weights.items() if ".lora_A." in k)
        raise ConfigError(f"{pt}: holds LoRA weights (rank {rank} on {','.join(lora)}); give --lora --lora-r {rank} "
                          f"--lora-targets {','.join(lora)} and the --lora-alpha of its train config")


def import_reference(pt: str, out: str, options: dict[str, Any], config_from: str | None = None,
                     overwrite: bool = False) -> str:
    """Write the saved model folder ``out`` from reference checkpoint ``pt``; the summary line."""
    import torch

    from ..tasks.init_from import InitSource, match
    from ..model.lm4lv import LM4LV
    from ..sources.reference import read_delta_checkpoint
    from ..util.fsutil import temp_dir, user_entries, writing
    from ..vision import complete_config

    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or (user_entries(out_dir) and not overwrite)):
        raise ConfigError(f"--out {out}: exists and is not empty; pass --overwrite to replace it")
    weights = read_delta_checkpoint(pt)
    cfg = model_config(options, config_from)
    _fit_to_checkpoint(cfg, weights, pt)
    complete_config(cfg)
    model = LM4LV.from_config(cfg, torch.float32)
    params = dict(model.named_parameters())
    load, line = match(InitSource(str(pt), weights, reference=True), params, model.saved_parameter_names(),
                       option="import-reference")
    missing = [n for n in ("adapter.weight", "deadapter.weight") if n in params and n not in load]
    if missing:
        raise ConfigError(f"{pt}: no {', '.join(missing)} (a reference delta checkpoint always holds the adapters)")
    with torch.no_grad():
        for name, value in load.items():
            params[name].copy_(value.float())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with writing(out_dir):
        tmp = temp_dir(out_dir.parent, out_dir.name)
        try:
            model.save_pretrained(tmp)
            if out_dir.exists():
                old = temp_dir(out_dir.parent, out_dir.name + "-old")
                os.rmdir(old)
                os.replace(out_dir, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return line.replace("import-reference ", "", 1)
