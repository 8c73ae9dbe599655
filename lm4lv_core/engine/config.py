"""``TrainConfig``: how to train (engine, workers, optimiser, schedule, saving).

Defaults follow the reference recipe: AdamW with β = (0.9, 0.95), lr 3e-4, no weight decay,
gradient clipping at 1.0, and DeepSpeed's ``WarmupDecayLR`` (log warmup over
``max(10, int(0.1 · T))`` steps, then linear decay to 0: ``lr_schedule``, see ``schedule.py``).
The run directory's ``config.yaml`` holds ``{task, train, model}`` fully resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from ..defaults import NODE_TIMEOUT
from ..precision import FP32, PRECISIONS
from ..errors import ConfigError
from ..util.finite import require_finite
from .schedule import SCHEDULES

if TYPE_CHECKING:
    from .cluster import Workers


@dataclass
class TrainConfig:
    data: str
    out: str
    image_root: str | None = None
    # workers
    engine: str = "deepspeed"
    launcher: str | None = None  # default: the engine's own launcher; torchrun also works
    nproc: int = 1
    num_nodes: int | None = None  # None: the srun step's nodes (engine/cluster.py), else 1
    hostfile: str | None = None
    master_port: int | None = None
    node_rank: int | None = None  # this node of num_nodes (one launcher per node); None: SLURM's, else 0
    master_addr: str | None = None  # node 0's host, where the nodes meet; None: SLURM's first host
    node_timeout: float = NODE_TIMEOUT  # seconds nodes wait for each other (start, silence)
    zero_stage: int = 0
    deepspeed_config: str | None = None  # JSON/YAML merged over the generated DeepSpeed config
    precision: str = FP32
    # optimisation
    micro_batch: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    warmup_ratio: float = 0.1
    epochs: int = 1
    max_steps: int | None = None
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of this invocation
    # saving and logging
    save_every: int = 500
    keep_checkpoints: int = 3  # newest complete step checkpoints kept; 0 keeps all
    preview_every: int = 200
    preview_samples: int = 2
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    cache_features: bool = False
    num_workers: int = 0
    record_order: bool = False  # write data_order.csv (sample indices of every step and rank)
    lr_schedule: str = "reference"  # reference | cosine | constant (engine/schedule.py)
    report_to: str = "none"  # trackers besides metrics.csv: none | tensorboard | wandb (a comma list)
    verbose: bool = False  # show third-party warnings and logs on the console (train.log has them always)
    gradient_checkpointing: bool = False  # recompute transformer layers in the backward pass
    max_skipped_steps: int = 3  # stop after this many steps in a row skipped for a non-finite loss or gradient
    # start from the trained weights of another run (RUN, RUN/checkpoints/step-N, a saved model or a
    # reference pytorch_model*.pt) at step 0 with a fresh optimizer; never applied over --resume
    init_from: str | None = None

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        self.workers()  # engine, launcher, nproc, num_nodes, node_rank, ...
        require_finite(self, ("lr", "weight_decay", "beta1", "beta2", "grad_clip", "warmup_ratio"))
        need(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        need(self.zero_stage in (0, 1, 2, 3), f"--zero-stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        need(self.engine == "deepspeed" or self.zero_stage == 0,
             "--zero-stage needs --engine deepspeed (accelerate runs plain data parallel here)")
        for name in ("micro_batch", "grad_accum", "epochs", "save_every",
                     "preview_every", "max_skipped_steps"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        need(self.keep_checkpoints >= 0, f"keep_checkpoints must be >= 0, got {self.keep_checkpoints}")
        need(self.preview_samples >= 0, f"preview_samples must be >= 0, got {self.preview_samples}")
        need(self.max_steps is None or self.max_steps >= 0, f"--max-steps must be >= 0, got {self.max_steps}")
        need(self.stop_after is None or self.stop_after >= 1, f"--stop-after must be >= 1, got {self.stop_after}")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "betas must be in [0, 1)")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        need(0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        need(not (self.resume and self.overwrite), "use either --resume or --overwrite, not both")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        need(self.lr_schedule in SCHEDULES,
             f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        from .reporting import parse_report_to

        parse_report_to(self.report_to)

    def workers(self) -> "Workers":
        """Where this run's workers start (checked on construction)."""
        from .cluster import Workers

        return Workers(nproc=self.nproc, engine=self.engine, launcher=self.launcher, num_nodes=self.num_nodes,
                       hostfile=self.hostfile, master_port=self.master_port, node_rank=self.node_rank,
                       master_addr=self.master_addr, node_timeout=self.node_timeout)

    def world_size(self) -> int:
        """Workers over all nodes (the nodes of an srun step when ``num_nodes`` is not given)."""
        return self.workers().resolve().world_size


def train_config_keys() -> set[str]:
    return {f.name for f in fields(TrainConfig)}
