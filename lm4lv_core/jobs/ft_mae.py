"""``lm4lv ft-mae``: fine-tune the MAE decoder through the training engine."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import from_dict, save_yaml
from ..defaults import RUN_CONFIG
from ..engine.config import TrainConfig, train_config_keys
from ..engine.launch import register_job, require_gpu_for
from ..engine.options import layer_options
from ..engine.resume import fingerprint
from ..engine.run import TrainingJob, prepare_run_dir, run_training, train_in_worker
from ..image.io import require_images
from ..sources.presets import mae_path
from ..tasks.mae_config import MAEFinetuneConfig
from ..tasks.mae_decoder import MAETask
from ..vision.mae import MAEAutoencoder

MAE_KEYS = ("mae", "preset", "lpips_weight", "lpips_net", "lpips_weights", "train_encoder", "hub")


def option_names() -> set[str]:
    """Every option ``lm4lv ft-mae`` (and its ``--config`` file) takes."""
    return (train_config_keys() - {"init_from"}) | set(MAE_KEYS)  # --init-from is lm4lv train's


@dataclass(kw_only=True)
class FtMaeJob(TrainingJob):
    """One MAE decoder fine-tuning run: written as the run's ``config.yaml`` and handed to every worker."""

    TASK = "mae"
    OPTION_LABELS = {"mae.hub": "the MAE's hub snapshot"}
    task: str = TASK
    mae: MAEFinetuneConfig

    def build_task(self) -> MAETask:
        return MAETask(self.train, self.mae)


register_job("ft-mae", FtMaeJob)(train_in_worker)


def resolve_finetune_options(options: dict[str, Any],
                             config_file: str | None = None) -> tuple[TrainConfig, MAEFinetuneConfig]:
    """Flat ``ft-mae`` options (``None`` = not given) over ``--config`` over a resumed run's
    ``config.yaml`` → both configs. ``--max-steps 0`` asks for the starting model as ``final/``."""
    lay = layer_options(options, config_file, valid=option_names(), flat_sections=("train", "mae"))
    merged = dict(lay.options)
    source = lay.given if (lay.given.get("mae") or lay.given.get("preset")) else merged
    saved_record = (merged.get("hub") or {}).get("mae") if source is merged else None
    merged["mae"], record = mae_path(source.get("mae"), source.get("preset"), saved_record)
    merged["hub"] = {"mae": record} if record else {}
    merged.pop("preset", None)
    baseline = merged.get("max_steps") == 0
    if baseline:
        merged.pop("max_steps")
    train = from_dict(TrainConfig, {k: v for k, v in merged.items() if k in train_config_keys()},
                      source="ft-mae options")
    if baseline:
        train.max_steps = 0  # (TrainConfig's own check asks for >= 1 training steps)
    mae_cfg = from_dict(MAEFinetuneConfig, {k: v for k, v in merged.items() if k in MAE_KEYS},
                        source="ft-mae options")
    return train, mae_cfg


def finetune(train_cfg: TrainConfig, mae_cfg: MAEFinetuneConfig) -> Any:
    """Parent side of ``lm4lv ft-mae``: check, then run the MAE task through the engine.

    ``train_cfg.max_steps == 0`` writes the starting model unchanged as ``final/`` (a baseline).
    """
    from ..sources.hub import local_path

    mae_cfg.mae, record = local_path(mae_cfg.mae, "--mae", mae_cfg.hub.get("mae"))
    mae_cfg.hub = {"mae": record} if record else {}
    images = require_images(train_cfg.data)
    require_gpu_for(train_cfg.precision)
    train_cfg.data = str(Path(train_cfg.data).resolve())
    mae_cfg.mae = str(Path(mae_cfg.mae).resolve())
    job = FtMaeJob(train=train_cfg, mae=mae_cfg,
                   data_fingerprint=fingerprint("images", [os.path.abspath(p) for p in images]))
    if train_cfg.max_steps == 0:
        if train_cfg.workers().resolve().node:  # another node of a multi-node run: node 0 writes it
            return {"step": 0, "total_steps": 0, "finished": True}
        return _write_start_model(job)
    mae_cfg.build_lpips()  # fail now, not in the workers, when LPIPS weights are missing
    return run_training("ft-mae", job)


def _write_start_model(job: FtMaeJob) -> dict[str, Any]:
    from ..util.fsutil import temp_dir, writing
    from ..util.runlock import hold

    cfg = job.train
    with hold(cfg.out, "ft-mae"):
        out = prepare_run_dir(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
        save_yaml(job, out / RUN_CONFIG)
        with writing(out / "final"):
            tmp = temp_dir(out, "final")
            try:
                MAEAutoencoder(job.mae.mae).save_pretrained(tmp)
                os.replace(tmp, out / "final")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return {"step": 0, "total_steps": 0, "finished": True}
