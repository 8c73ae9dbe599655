"""Typer options shared by the commands that train through the engine (train, ft-mae); generate
and recon-mae declare the node options (``NUM_NODES`` ... ``NODE_TIMEOUT``) from here too.

``@with_run_options`` replaces a command's ``run_options`` parameter by one option per entry of
``RUN_OPTIONS`` and hands their values back as the ``run_options`` dict (``None`` = not given), the
flat form the option resolver layers (``lm4lv_core.engine.options``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

import typer

O = typer.Option

CONFIG = O(None, "--config", help="YAML file holding any of these options (the command line overrides it).")
ENGINE = O(None, "--engine", help="deepspeed | accelerate [deepspeed].")
LAUNCHER = O(None, "--launcher", help="deepspeed | accelerate | torchrun [the engine's own; torchrun for the deepspeed engine with one launcher per node].")
NPROC = O(None, "--nproc", help="Workers on this node [1: in-process].")
NUM_NODES = O(None, "--num-nodes", help="Nodes: the same command on every node with its --node-rank (or all "
              "from this one with --hostfile) [1; under srun: SLURM's].")
NODE_RANK = O(None, "--node-rank", help="This node, 0 to --num-nodes - 1 [under srun: SLURM_NODEID].")
MASTER_ADDR = O(None, "--master-addr", help="Node 0's host, where the nodes meet [under srun: the step's first host].")
HOSTFILE = O(None, "--hostfile", help="Hostfile for the deepspeed launcher (reaches the nodes over ssh).")
MASTER_PORT = O(None, "--master-port", help="Rendezvous port [a free one; several nodes: 29500; under srun: "
                "20000 + job id mod 10000].")
NODE_TIMEOUT = O(None, "--node-timeout", help="Seconds nodes wait for each other to start, and before a silent "
                 "node counts as lost [600].")
ZERO_STAGE = O(None, "--zero-stage", help="DeepSpeed ZeRO stage 0|1|2|3 [0].")
DEEPSPEED_CONFIG = O(None, "--deepspeed-config", help="JSON/YAML merged over the generated DeepSpeed config.")
PRECISION = O(None, "--precision", help="fp32 | bf16 | fp16 [fp32].")
MICRO_BATCH = O(None, "--micro-batch", help="Samples per worker per micro-step [4].")
GRAD_ACCUM = O(None, "--grad-accum", help="Micro-steps per optimizer step [1].")
LR = O(None, "--lr", help="Peak learning rate [3e-4].")
WEIGHT_DECAY = O(None, "--weight-decay", help="AdamW weight decay [0].")
GRAD_CLIP = O(None, "--grad-clip", help="Gradient norm clip, 0 = off [1.0].")
WARMUP_RATIO = O(None, "--warmup-ratio", help="Warmup share of all steps; reference schedule: max(10, int(ratio·steps)) steps [0.1].")
EPOCHS = O(None, "--epochs", help="Passes over the data [1].")
MAX_STEPS = O(None, "--max-steps", help="Optimizer steps (overrides --epochs).")
STOP_AFTER = O(None, "--stop-after", help="Stop with a checkpoint after this many steps (resume later).")
SAVE_EVERY = O(None, "--save-every", help="Checkpoint every N steps [500].")
KEEP_CHECKPOINTS = O(None, "--keep-checkpoints", help="Newest checkpoints kept, 0 = all [3].")
PREVIEW_EVERY = O(None, "--preview-every", help="Preview image every N steps [200].")
SEED = O(None, "--seed", help="Seed of initialisation and data order [0].")
NUM_WORKERS = O(None, "--num-workers", help="Data loading processes per worker [0].")
RESUME = O(False, "--resume", help="Continue the run in --out from its newest intact checkpoint.")
OVERWRITE = O(False, "--overwrite", help="Reuse --out, replacing lm4lv's files in it.")
LR_SCHEDULE = O(None, "--lr-schedule", help="reference (DeepSpeed WarmupDecayLR: log warmup, linear decay to 0) | "
                "cosine (linear warmup, cosine decay) | constant (linear warmup) [reference].")
REPORT_TO = O(None, "--report-to", help="Also log to: tensorboard (event files in RUN/tensorboard) | wandb (Weights & Biases; local files in RUN/wandb) | a comma list | none [none].")
VERBOSE = O(False, "--verbose", help="Show third-party warnings and logs on the console too (RUN/train.log has them always).")
MAX_SKIPPED_STEPS = O(None, "--max-skipped-steps", help="Stop (exit 2) after this many steps in a row skipped for a "
                      "non-finite loss or gradient [3].")
GRADIENT_CHECKPOINTING = O(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                           help="Recompute transformer layers in the backward pass: less activation memory, one more forward [off].")


# name → (type, declaration), in the order --help lists them
RUN_OPTIONS: dict[str, tuple[Any, Any]] = {
    "engine": (Optional[str], ENGINE), "launcher": (Optional[str], LAUNCHER), "nproc": (Optional[int], NPROC),
    "num_nodes": (Optional[int], NUM_NODES), "node_rank": (Optional[int], NODE_RANK),
    "master_addr": (Optional[str], MASTER_ADDR), "master_port": (Optional[int], MASTER_PORT),
    "node_timeout": (Optional[float], NODE_TIMEOUT), "hostfile": (Optional[str], HOSTFILE),
    "zero_stage": (Optional[int], ZERO_STAGE),
    "deepspeed_config": (Optional[str], DEEPSPEED_CONFIG), "precision": (Optional[str], PRECISION),
    "micro_batch": (Optional[int], MICRO_BATCH), "grad_accum": (Optional[int], GRAD_ACCUM),
    "lr": (Optional[float], LR), "weight_decay": (Optional[float], WEIGHT_DECAY),
    "grad_clip": (Optional[float], GRAD_CLIP), "warmup_ratio": (Optional[float], WARMUP_RATIO),
    "lr_schedule": (Optional[str], LR_SCHEDULE), "epochs": (Optional[int], EPOCHS),
    "max_steps": (Optional[int], MAX_STEPS), "stop_after": (Optional[int], STOP_AFTER),
    "save_every": (Optional[int], SAVE_EVERY), "keep_checkpoints": (Optional[int], KEEP_CHECKPOINTS),
    "preview_every": (Optional[int], PREVIEW_EVERY), "seed": (Optional[int], SEED),
    "num_workers": (Optional[int], NUM_WORKERS), "resume": (bool, RESUME), "overwrite": (bool, OVERWRITE),
    "report_to": (Optional[str], REPORT_TO), "verbose": (bool, VERBOSE),
    "gradient_checkpointing": (Optional[bool], GRADIENT_CHECKPOINTING),
    "max_skipped_steps": (Optional[int], MAX_SKIPPED_STEPS),
}


# where the workers of generate / recon run (the node options of RUN_OPTIONS)
NODE_OPTIONS = {k: RUN_OPTIONS[k] for k in ("launcher", "num_nodes", "node_rank", "master_addr", "master_port",
                                            "node_timeout", "hostfile")}


def _with_options(table: dict[str, tuple[Any, Any]], param: str) -> Callable[[Callable], Callable]:
    """Declare ``table``'s options on a Typer command in place of its parameter ``param``, which
    receives their values as a dict (``None`` = not given)."""
    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        params: list[inspect.Parameter] = []
        for p in sig.parameters.values():
            if p.name != param:
                params.append(p)
                continue
            params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=decl, annotation=typ)
                       for name, (typ, decl) in table.items()]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            # a flag left off is "not given" (None), so a saved run's or --config's value stays
            given = {k: (kwargs.pop(k) or None) if typ is bool else kwargs.pop(k) for k, (typ, _) in table.items()}
            return fn(**kwargs, **{param: given})

        del command.__wrapped__  # Typer reads the signature below, not the wrapped function's
        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command
    return deco


with_run_options = _with_options(RUN_OPTIONS, "run_options")
with_node_options = _with_options(NODE_OPTIONS, "nodes")


def given(options: dict[str, Any]) -> dict[str, Any]:
    """The options that were given (``None`` left out, so defaults apply)."""
    return {k: v for k, v in options.items() if v is not None}
