"""``lm4lv train``: the LM4LV training job, its option resolver, checks and dry run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import LoraConfig, ModelConfig, ModelSources, declared, from_dict, option_name
from ..data.format import Sample, load_checked
from ..engine.config import TrainConfig, train_config_keys
from ..engine.launch import register_job, require_gpu_for
from ..engine.options import layer_options
from ..engine.run import TrainingJob, run_training, train_in_worker
from ..errors import ConfigError

# the model options, from their declarations (lm4lv_core.config.option)
MODEL_SOURCE = tuple(f.name for f in declared(ModelSources))
MODEL_FIELDS = tuple(f.name for f in declared(ModelConfig, cli_only=True))
LORA = {option_name(f): f.name for f in declared(LoraConfig, cli_only=True)}


def option_names() -> set[str]:
    """Every option ``lm4lv train`` (and its ``--config`` file) takes."""
    return train_config_keys() | set(MODEL_SOURCE) | set(MODEL_FIELDS) | set(LORA)


@dataclass(kw_only=True)
class TrainJob(TrainingJob):
    """One LM4LV training run: written as the run's ``config.yaml`` and handed to every worker."""

    TASK = "lm4lv"
    OPTION_LABELS = {**{f"model.lora.{field}": f"--{option.replace('_', '-')}" for option, field in LORA.items()},
                     "model.hub": "the model's hub snapshots"}
    task: str = TASK
    model: ModelConfig

    def build_task(self):
        from ..tasks.lm4lv import LM4LVTask

        return LM4LVTask(self.train, self.model)


register_job("train", TrainJob)(train_in_worker)


def resolve_options(cli: dict[str, Any], config_file: str | None = None) -> tuple[TrainConfig, ModelConfig]:
    """Flat options (``None`` = not given) over ``--config`` over a resumed run's ``config.yaml``
    → both configs. A resumed run keeps its saved model; model options given now override its fields."""
    from ..model.options import resolve_model_config
    from ..vision import complete_config

    lay = layer_options(cli, config_file, valid=option_names(), required=("data", "out"))
    opts, saved_model = lay.options, lay.saved.get("model")
    train = from_dict(TrainConfig, {k: v for k, v in opts.items() if k in train_config_keys()},
                      source="train options")
    train.out = str(Path(train.out).resolve())  # recorded absolute, like the data
    fields = {k: opts[k] for k in MODEL_FIELDS if k in opts}
    sources = any(opts.get(k) for k in MODEL_SOURCE)
    if saved_model is not None and (lay.given.get("resume") or not sources):
        model = from_dict(ModelConfig, {**saved_model, **fields}, source="saved model config")
        if sources:
            given = resolve_model_config(**{k: opts.get(k) for k in MODEL_SOURCE}, **fields)
            for part in ("llm", "encoder", "decoder"):
                if getattr(given, part) != getattr(model, part):
                    raise ConfigError(f"--resume: the {part} given now differs from the run's "
                                      f"({getattr(model, part)}); drop the model options or start a new run")
    else:
        model = resolve_model_config(**{k: opts.get(k) for k in MODEL_SOURCE}, **fields)
    complete_config(model)  # adapters and loss that follow from the vision family, recorded as used
    lora = {LORA[k]: opts[k] for k in LORA if k in opts}
    if lora:
        if isinstance(lora.get("target_modules"), str):
            lora["target_modules"] = [t.strip() for t in lora["target_modules"].split(",") if t.strip()]
        model.lora = LoraConfig(**{**vars(model.lora), **lora})
    return train, model


def check_image_answers(model: ModelConfig, samples: list[Sample], data: str) -> None:
    """One-line error when the data asks for image answers that the model cannot paint."""
    from ..vision import cannot_paint

    bad = next((i for i, s in enumerate(samples) if "gpt" in s.image_turns()), None)
    why = cannot_paint(model) if bad is not None else None
    if why is not None:
        raise ConfigError(f"{data}: sample {bad} answers with an image, but {why}")


def complete_for_run(model: ModelConfig, samples: list[Sample]) -> ModelConfig:
    """Resolve the run's model config once and freeze it (:func:`lm4lv_core.model.resolve.resolve_config`),
    after filling what follows from the data: a learnable query when it holds ``<query>``, and the
    restoration prompt ``generate --input`` uses. A resumed run with a query keeps it."""
    from ..config import is_frozen, thawed
    from ..model.resolve import resolve_config
    from ..tasks.lm4lv import complete_from_data

    if not is_frozen(model):
        model = complete_from_data(thawed(model), samples)
    return resolve_config(model)


def llm_summary(model: ModelConfig) -> str:
    """One line on the resolved LLM choices (``--dry-run``)."""
    from ..model.families import llm_config, model_type

    lora = model.lora.target_modules
    lora = ",".join(lora) if isinstance(lora, list) else lora
    return (f"LLM {model_type(llm_config(model.llm)) or '?'}: attention {model.attn_implementation}"
            + (f"; LoRA r={model.lora.r} on {lora}" if model.lora.enabled else "")
            + ("; learnable query for <query> (" + ("trained" if model.train_query else "frozen") + ")"
               if model.query else ""))


def check(cfg: TrainConfig, model: ModelConfig) -> tuple[list[Sample], str | None, ModelConfig]:
    """Everything that can be checked before workers start (the real run and ``--dry-run`` alike);
    makes the data and image paths absolute and returns the parsed samples, the line saying what
    ``--init-from`` loads, and the model config resolved and frozen (the run's record)."""
    from ..config import is_frozen, thawed
    from ..model.loading import check_attn_implementation
    from ..sources.hub import resolve_hub_folders
    from ..precision import compute_dtype
    from ..tasks.lm4lv import check_cache_allowed

    samples = load_checked(cfg.data, image_root=cfg.image_root, mode="train")
    check_image_answers(model, samples, cfg.data)
    if cfg.cache_features:
        check_cache_allowed(model)
    if not is_frozen(model):  # hub ids (and recorded snapshots that were removed) -> cache folders, on a copy
        model = resolve_hub_folders(thawed(model))
    if not Path(model.llm).is_dir():
        raise ConfigError(f"llm {model.llm}: folder not found")
    for part in ("encoder", "decoder"):
        spec = getattr(model, part)
        path = spec.kwargs.get("path") if spec is not None else None
        if path is not None and not Path(path).is_dir():
            raise ConfigError(f"{part} {path}: folder not found")
    model = complete_for_run(model, samples)
    init = _check_init_from(cfg, model) if cfg.init_from else None
    require_gpu_for(cfg.precision)
    check_attn_implementation(model.attn_implementation, dtype=compute_dtype(cfg.precision))
    if cfg.hostfile and not Path(cfg.hostfile).is_file():
        raise ConfigError(f"--hostfile {cfg.hostfile}: file not found")
    if cfg.deepspeed_config:
        if not Path(cfg.deepspeed_config).is_file():
            raise ConfigError(f"--deepspeed-config {cfg.deepspeed_config}: file not found")
        from ..engine.backends import checked_deepspeed_overrides

        checked_deepspeed_overrides(cfg, cfg.world_size())
    cfg.image_root = str(Path(cfg.image_root if cfg.image_root is not None else Path(cfg.data).parent).resolve())
    cfg.data = str(Path(cfg.data).resolve())
    return samples, init, model


def _check_init_from(cfg: TrainConfig, model: ModelConfig) -> str | None:
    """``--init-from``: its weights must fit the new model (checked before anything is written);
    a run resumed from a checkpoint does not use them. The line saying what will load."""
    from ..engine import checkpoint as ckpt
    from ..tasks.init_from import check_source

    cfg.init_from = str(Path(cfg.init_from).resolve())
    if cfg.resume and ckpt.latest(Path(cfg.out) / "checkpoints") is not None:
        return None
    return check_source(cfg.init_from, model)


def data_fingerprint(samples: list[Sample]) -> str:
    """The content of a data file as a run trains on it: every sample's turns and task type with its
    image paths (other keys of a sample do not train)."""
    from ..engine.resume import fingerprint

    return fingerprint("samples", [{"conversations": s.to_json()["conversations"], "task_type": s.task_type,
                                    "image": [os.path.abspath(p) for p in s.images]} for s in samples])


def train(cfg: TrainConfig, model: ModelConfig) -> Any:
    """Train LM4LV: check data, images and config, then run the workers."""
    samples, _, model = check(cfg, model)
    return run_training("train", TrainJob(train=cfg, model=model, data_fingerprint=data_fingerprint(samples)))


@dataclass
class DryRun:
    """What ``lm4lv train --dry-run`` shows: the first sample rendered, its tokens, and the memory plan."""

    samples: int
    data: str
    text: str
    tokens: str
    counts: dict[str, int]
    plan: str
    llm: str = ""  # the resolved LLM choices (attention, LoRA targets, query)


def dry_run(cfg: TrainConfig, model: ModelConfig, gpu_memory: float | None = None) -> DryRun:
    """Check everything a run would, render the first sample and plan the memory per rank
    (against ``gpu_memory`` GiB, default the detected GPU's)."""
    from ..model.memplan import detected_gpu_memory_gib, format_plan, plan_training
    from ..model.prompt import render_first_prompt, vision_summary

    if gpu_memory is not None and not (0 < gpu_memory < float("inf")):
        raise ConfigError(f"--gpu-memory must be a finite number > 0 (GiB), got {gpu_memory}")
    samples, init, model = check(cfg, model)
    text, tokens, counts = render_first_prompt(model, samples[0])
    gpu = gpu_memory if gpu_memory is not None else detected_gpu_memory_gib()
    from ..engine.backends import checked_deepspeed_overrides

    overrides = checked_deepspeed_overrides(cfg, cfg.world_size()) if cfg.deepspeed_config else None  # (checked)
    plan = plan_training(cfg, model, samples, gpu, deepspeed_overrides=overrides)
    return DryRun(len(samples), cfg.data, text, tokens, counts, vision_summary(model) + "\n" + format_plan(plan),
                  llm_summary(model) + (f"\n{init}" if init else ""))
