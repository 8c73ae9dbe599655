"""Entry points of training: ``train`` (parent: validate, prepare the run folder, launch) and
``train_job`` (every worker: build the task and run the loop).

Any ``TrainTask`` runs through the same path: ``run_training(task_name, train_cfg, extra, ...)``
writes ``RUN/config.yaml`` = ``{task, train, **extra}`` and launches the ``train`` job, whose
workers rebuild the task from that dict.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from . import launch
from ..config import ModelConfig, from_dict, save_yaml, to_dict
from ..errors import ConfigError
from ..util.fsutil import user_entries
from .config import TrainConfig

CONFIG_FILE = "config.yaml"
JOB_DIR = ".lm4lv"
# everything lm4lv writes into a run folder; --overwrite replaces only these
LOG_FILE = "train.log"  # third-party output of every run (the console shows lm4lv's own lines)
OWN_ENTRIES = ("checkpoints", "final", "previews", "metrics.csv", "loss.png", "data_order.csv", "run.json",
               CONFIG_FILE, JOB_DIR, ".final.tmp", LOG_FILE, "tensorboard")
COMMANDS = {"lm4lv": "train", "mae": "ft-mae"}  # training task → the command that runs it


def train_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker side: run the training described by ``job`` (``{task, train, run_dir, ...}``)."""
    from .loop import Trainer
    from .task import build_task

    cfg = from_dict(TrainConfig, job["train"], source="train config")
    return Trainer(build_task(job), cfg, job["run_dir"]).train()


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Refuse to reuse a non-empty run folder without --resume/--overwrite; with --overwrite,
    remove lm4lv's own outputs of the earlier run (other files are left alone)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and user_entries(out) and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"--out {out}: the run folder is not empty; pass --resume to continue it "
                          "or --overwrite to replace lm4lv's files in it")
    if cfg.overwrite and out.is_dir():
        for name in OWN_ENTRIES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_training(task: str, cfg: TrainConfig, extra: dict[str, Any]) -> Any:
    """Parent side of any training task: lock the run folder, write ``config.yaml`` and launch
    the workers."""
    from ..util.runlock import hold
    from .reporting import check_available, parse_report_to

    check_available(parse_report_to(cfg.report_to))
    with hold(cfg.out, COMMANDS.get(task, task)):  # one run per folder; removes killed runs' temp files
        out = prepare_run_dir(cfg)
        resolved = {"task": task, "train": to_dict(cfg), **extra}
        save_yaml(resolved, out / CONFIG_FILE)
        job = {**resolved, "run_dir": str(out.resolve())}
        return launch.run_job("train", job, nproc=cfg.nproc, engine=cfg.engine, job_dir=out / JOB_DIR,
                              num_nodes=cfg.num_nodes, hostfile=cfg.hostfile, master_port=cfg.master_port,
                              launcher=cfg.launcher, log_file=out / LOG_FILE, verbose=cfg.verbose)


def validate(cfg: TrainConfig, model: ModelConfig) -> int:
    """Everything that can be checked before workers start; returns the number of samples."""
    from ..data.format import load_checked
    from ..tasks.lm4lv import check_cache_allowed

    samples = load_checked(cfg.data, image_root=cfg.image_root, mode="train")
    if cfg.cache_features:
        check_cache_allowed(model)
    from ..hub import resolve_model

    resolve_model(model)  # hub ids (and recorded snapshots that were removed) -> cache folders
    if not Path(model.llm).is_dir():
        raise ConfigError(f"llm {model.llm}: folder not found")
    for part in ("encoder", "decoder"):
        path = getattr(model, part).kwargs.get("path")
        if path is not None and not Path(path).is_dir():
            raise ConfigError(f"{part} {path}: folder not found")
    if cfg.precision == "fp16" and not launch.has_cuda():
        raise ConfigError("--precision fp16 needs a GPU; use bf16 (or fp32) on CPU")
    from ..loading import check_attn_implementation, compute_dtype

    check_attn_implementation(model.attn_implementation, dtype=compute_dtype(cfg.precision))
    if cfg.hostfile and not Path(cfg.hostfile).is_file():
        raise ConfigError(f"--hostfile {cfg.hostfile}: file not found")
    if cfg.deepspeed_config:
        if not Path(cfg.deepspeed_config).is_file():
            raise ConfigError(f"--deepspeed-config {cfg.deepspeed_config}: file not found")
        from .backends import checked_deepspeed_overrides

        checked_deepspeed_overrides(cfg, cfg.nproc * cfg.num_nodes)
    cfg.image_root = str(Path(cfg.image_root if cfg.image_root is not None else Path(cfg.data).parent).resolve())
    cfg.data = str(Path(cfg.data).resolve())
    return len(samples)


def train(cfg: TrainConfig, model: ModelConfig) -> Any:
    """Train LM4LV: validate data, images and config, then run the workers."""
    validate(cfg, model)
    return run_training("lm4lv", cfg, {"model": to_dict(model)})


def load_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved ``config.yaml`` of a run (``{task, train, model, ...}``)."""
    from ..config import load_yaml

    return load_yaml(Path(run_dir) / CONFIG_FILE)


def model_config_of(run: dict[str, Any]) -> ModelConfig:
    return from_dict(ModelConfig, run["model"], source=CONFIG_FILE)
