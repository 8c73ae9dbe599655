"""The run folder of a training job and its launch: ``run_training(kind, job)`` is the parent
side shared by every training command (``lm4lv train``, ``lm4lv ft-mae``).

A training job is a typed object with a ``train`` field (:class:`TrainConfig`) and the task's own
config beside it (see ``lm4lv_core.jobs``), and the fingerprint of its data's content. It is
written once as the run's ``config.yaml`` (the record that ``--config`` and ``--resume`` read
back) and handed to the workers of ``kind``. With ``--resume`` it must match the newest
checkpoint (:mod:`.resume`) before anything is written.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..config import save_yaml
from ..defaults import JOB_DIR, RUN_CONFIG
from ..errors import ConfigError
from ..util.fsutil import remove_entries, user_entries
from . import launch, resume
from .config import TrainConfig

LOG_FILE = "train.log"  # third-party output of every run (the console shows lm4lv's own lines)
# everything lm4lv writes into a run folder; --overwrite replaces only these
OWN_ENTRIES = ("checkpoints", "final", "previews", "metrics.csv", "loss.png", "report.html", "data_order.csv", "run.json",
               RUN_CONFIG, JOB_DIR, ".final.tmp", LOG_FILE, "tensorboard", "wandb")
# inside these, --overwrite removes only what matches (lm4lv's names); anything else is refused
# (final/, tensorboard/ and wandb/ too: see own_patterns)
OWN_PATTERNS = {"checkpoints": r"step-\d+", "previews": r"step-\d+\.png"}


def own_patterns() -> dict[str, str]:
    """The entries lm4lv writes inside each subfolder of a run (name → regular expression of entry
    names), as declared where they are written: ``OWN_PATTERNS``; ``final/``: what a saved model
    folder holds (an LM4LV model's, or ft-mae's Hugging Face MAE folder); ``tensorboard/``,
    ``wandb/``: what the trackers write there (:mod:`.reporting`)."""
    from ..model.lm4lv import SAVED_ENTRIES as LM4LV_SAVED
    from ..vision.mae import SAVED_ENTRIES as MAE_SAVED
    from .reporting import TENSORBOARD_DIR, TENSORBOARD_ENTRIES, WANDB_DIR, WANDB_ENTRIES

    return {**OWN_PATTERNS, "final": f"(?:{LM4LV_SAVED})|(?:{MAE_SAVED})", TENSORBOARD_DIR: TENSORBOARD_ENTRIES,
            WANDB_DIR: WANDB_ENTRIES}


@dataclass(kw_only=True)
class TrainingJob:
    """The shared part of a training command's job: the task's name and how to train. A subclass
    adds the task's own config (the next key of ``config.yaml``) and builds the task."""

    TASK: ClassVar[str]
    # names of the task's options in --resume refusals (keys of resume.identity) beyond "--field"
    OPTION_LABELS: ClassVar[dict[str, str]] = {}
    task: str
    train: TrainConfig
    data_fingerprint: str | None = None  # resume.fingerprint of the data's content, set by the parent

    def __post_init__(self) -> None:
        if self.task != self.TASK:
            raise ConfigError(f"a {self.TASK!r} training job cannot run task {self.task!r}")

    def build_task(self) -> Any:
        raise NotImplementedError


def train_in_worker(job: TrainingJob) -> dict[str, Any]:
    """What every worker of a training job runs: the engine's loop on the job's task."""
    from .loop import Trainer

    return Trainer(job.build_task(), job.train, job.train.out, identity=resume.identity(job, None),
                   labels=job.OPTION_LABELS).train()


def check_resume(job: TrainingJob) -> None:
    """With ``--resume``: refuse a job whose options or data differ from the newest checkpoint's
    (each worker checks again the checkpoint it loads, with the number of workers)."""
    from . import checkpoint as ckpt

    last = ckpt.latest(Path(job.train.out) / "checkpoints") if job.train.resume else None
    if last is None:
        return
    try:
        state = ckpt.read_state(last)
    except (OSError, ValueError):
        return  # damaged: the workers fall back to an intact one and check it
    resume.check(state.get("identity"), resume.identity(job, None), str(last), job.OPTION_LABELS)
    resume.check_length(int(state.get("step", 0)), job.train.max_steps, str(last))


def prepare_run_dir(out: str | Path, *, resume: bool = False, overwrite: bool = False,
                    keep: tuple[str, ...] = ()) -> Path:
    """Refuse to reuse a non-empty run folder without --resume/--overwrite; with --overwrite,
    remove lm4lv's own outputs of the earlier run (other files are left alone; a file of the user's
    inside one of lm4lv's subfolders, :func:`own_patterns`, refuses it before anything is removed).
    ``keep``: entries that other nodes of this run may have made already (neither counted nor removed)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and [e for e in user_entries(out) if e.name not in keep] and not (resume or overwrite):
        raise ConfigError(f"--out {out}: the run folder is not empty; pass --resume to continue it "
                          "or --overwrite to replace lm4lv's files in it")
    if overwrite and out.is_dir():
        remove_entries(out, [e for e in OWN_ENTRIES if e not in keep], own_patterns())
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_training(kind: str, job: TrainingJob) -> Any:
    """Lock the run folder, write ``config.yaml`` and run the workers of ``kind`` on ``job``
    (they receive it with ``job.train.out`` made absolute).

    With one launcher per node, every node runs this on the shared run folder: node 0 checks and
    prepares the folder and writes ``config.yaml``, the others only add their own files."""
    from ..util.runlock import hold
    from .reporting import check_available, parse_report_to

    cfg = job.train
    check_available(parse_report_to(cfg.report_to))
    workers = cfg.workers().resolve()
    node = workers.node if workers.per_node else None
    # one run per folder (per node); removes killed runs' temp files
    with hold(cfg.out, kind, node=node, shared=(JOB_DIR,)):
        out = Path(cfg.out)
        with launch.on_node(workers, out / JOB_DIR, out / LOG_FILE):
            if not node:
                # (the other nodes' job files and records, and the logs, which every node appends to)
                out = prepare_run_dir(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite,
                                      keep=(JOB_DIR, LOG_FILE) if node is not None else ())
                check_resume(job)
                save_yaml(job, out / RUN_CONFIG)
            sent = copy.copy(job)
            sent.train = copy.copy(cfg)
            sent.train.out = str(out.resolve())
            return launch.run_job(kind, sent, job_dir=out / JOB_DIR, workers=workers,
                                  log_file=out / LOG_FILE, verbose=cfg.verbose)
