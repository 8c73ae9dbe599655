"""``TrainConfig``: how to train (engine, workers, optimiser, schedule, saving).

Defaults follow the reference recipe: AdamW with β = (0.9, 0.95), lr 3e-4, no weight decay,
gradient clipping at 1.0, and DeepSpeed's ``WarmupDecayLR`` (log warmup over
``max(10, int(0.1 · T))`` steps, then linear decay to 0: ``lr_schedule``, see ``schedule.py``).
The run directory's ``config.yaml`` holds ``{task, train, model}`` fully resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from ..config import option
from ..defaults import NODE_TIMEOUT
from ..precision import FP32, PRECISIONS
from ..errors import ConfigError
from ..util.finite import require_finite
from .schedule import SCHEDULES

if TYPE_CHECKING:
    from .cluster import Workers


@dataclass
class TrainConfig:
    """How to train. Each field is also the option of the same name (``--micro-batch`` for
    ``micro_batch``), declared once here (:func:`lm4lv_core.config.option`)."""

    data: str = option(doc="Training data file (JSON list of samples).", panel="Data", may_change=True,
                       shows="required")
    out: str = option(doc="Run directory.", panel="Output", may_change=True, run_only=True, shows="required")
    image_root: str | None = option(None, "Base of relative image paths.", panel="Data", may_change=True,
                                    shows="the data file's folder")
    # workers
    engine: str = option("deepspeed", "deepspeed | accelerate.", panel="Launch")
    launcher: str | None = option(None, "deepspeed | accelerate | torchrun.", panel="Launch", may_change=True,
                                  shows="the engine's own; torchrun for the deepspeed engine with one launcher per node")
    nproc: int = option(1, "Workers on this node (1: in-process).", panel="Launch", may_change=True)
    num_nodes: int | None = option(None, "Nodes: the same command on every node with its --node-rank (or all from "
                                   "this one with --hostfile).", panel="Launch", may_change=True, run_only=True,
                                   shows="1; under srun: SLURM's")
    hostfile: str | None = option(None, "Hostfile for the deepspeed launcher (reaches the nodes over ssh).",
                                  panel="Launch", may_change=True)
    master_port: int | None = option(None, "Rendezvous port.", panel="Launch", may_change=True, run_only=True,
                                     shows="a free one; several nodes: 29500; under srun: 20000 + job id mod 10000")
    node_rank: int | None = option(None, "This node, 0 to --num-nodes - 1.", panel="Launch", may_change=True,
                                   run_only=True, shows="under srun: SLURM_NODEID, else 0")
    master_addr: str | None = option(None, "Node 0's host, where the nodes meet.", panel="Launch", may_change=True,
                                     run_only=True, shows="under srun: the step's first host")
    node_timeout: float = option(NODE_TIMEOUT, "Seconds nodes wait for each other to start, and before a silent "
                                 "node counts as lost.", panel="Launch", may_change=True)
    zero_stage: int = option(0, "DeepSpeed ZeRO stage 0 | 1 | 2 | 3.", panel="Launch")
    deepspeed_config: str | None = option(None, "JSON/YAML merged over the generated DeepSpeed config.",
                                          panel="Launch")
    precision: str = option(FP32, "fp32 | bf16 | fp16.", panel="Launch")
    # optimisation
    micro_batch: int = option(4, "Samples per worker per micro-step.", panel="Training")
    grad_accum: int = option(1, "Micro-steps per optimizer step.", panel="Training")
    lr: float = option(3e-4, "Peak learning rate.", panel="Training")
    weight_decay: float = option(0.0, "AdamW weight decay.", panel="Training")
    beta1: float = option(0.9, "AdamW beta1.", panel="Training")
    beta2: float = option(0.95, "AdamW beta2.", panel="Training")
    grad_clip: float = option(1.0, "Gradient norm clip, 0 = off.", panel="Training")
    warmup_ratio: float = option(0.1, "Warmup share of all steps; reference schedule: max(10, int(ratio·steps)) "
                                 "steps.", panel="Training")
    epochs: int = option(1, "Passes over the data.", panel="Training", may_change=True)
    max_steps: int | None = option(None, "Optimizer steps (overrides --epochs; 0 writes the starting weights).",
                                   panel="Training", may_change=True, shows="epochs × steps per epoch")
    stop_after: int | None = option(None, "Stop with a checkpoint after this many steps of this invocation "
                                    "(resume later).", panel="Training", may_change=True, run_only=True)
    # saving and logging
    save_every: int = option(500, "Checkpoint every N steps.", panel="Output", may_change=True)
    keep_checkpoints: int = option(3, "Newest checkpoints kept, 0 = all.", panel="Output", may_change=True)
    preview_every: int = option(200, "Preview image every N steps.", panel="Output", may_change=True)
    preview_samples: int = option(2, "Samples in each preview.", panel="Output", may_change=True)
    resume: bool = option(False, "Continue the run in --out from its newest intact checkpoint.", panel="Output",
                          flags="--resume", may_change=True, run_only=True)
    overwrite: bool = option(False, "Reuse --out, replacing lm4lv's files in it.", panel="Output",
                             flags="--overwrite", may_change=True, run_only=True)
    seed: int = option(0, "Seed of initialisation and data order.", panel="Training")
    cache_features: bool = option(False, "Encode each image once (frozen encoder only).", panel="Training",
                                  flags="--cache-features/--no-cache-features")
    num_workers: int = option(0, "Data loading processes per worker.", panel="Training", may_change=True)
    record_order: bool = option(False, "Write data_order.csv (sample indices of every step and rank).",
                                panel="Output", flags="--record-order/--no-record-order", may_change=True)
    lr_schedule: str = option("reference", "reference (DeepSpeed WarmupDecayLR: log warmup, linear decay to 0) | "
                              "cosine (linear warmup, cosine decay) | constant (linear warmup).", panel="Training")
    report_to: str = option("none", "Also log to: tensorboard (RUN/tensorboard) | wandb (local files in RUN/wandb) "
                            "| a comma list | none.", panel="Output", may_change=True)
    verbose: bool = option(False, "Show third-party warnings and logs on the console too (the run's log file, "
                           "e.g. RUN/train.log, has them always).", panel="Output", flags="--verbose", may_change=True, run_only=True)
    gradient_checkpointing: bool = option(False, "Recompute transformer layers in the backward pass: less "
                                          "activation memory, one more forward.", panel="Training",
                                          flags="--gradient-checkpointing/--no-gradient-checkpointing",
                                          may_change=True)
    max_skipped_steps: int = option(3, "Stop (exit 2) after this many steps in a row skipped for a non-finite "
                                    "loss or gradient.", panel="Training", may_change=True)
    init_from: str | None = option(None, "Start from the trained weights of another run (RUN, "
                                   "RUN/checkpoints/step-N, a saved model or a reference pytorch_model*.pt) at step "
                                   "0 with a fresh optimizer; never applied over --resume.", panel="Training")

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


def may_change() -> tuple[str, ...]:
    """The train options a resumed run may change (declared with ``may_change``)."""
    return tuple(f.name for f in fields(TrainConfig) if f.metadata.get("may_change"))


def run_only() -> tuple[str, ...]:
    """The train options never taken from a saved run's config (declared with ``run_only``)."""
    return tuple(f.name for f in fields(TrainConfig) if f.metadata.get("run_only"))
