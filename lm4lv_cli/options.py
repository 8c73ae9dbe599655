"""Typer options shared by the commands that train through the engine (train, ft-mae)."""

from __future__ import annotations

import typer

O = typer.Option

CONFIG = O(None, "--config", help="YAML file holding any of these options (the command line overrides it).")
ENGINE = O(None, "--engine", help="deepspeed | accelerate [deepspeed].")
LAUNCHER = O(None, "--launcher", help="deepspeed | accelerate | torchrun [the engine's own].")
NPROC = O(None, "--nproc", help="Workers on this node [1: in-process].")
NUM_NODES = O(None, "--num-nodes", help="Nodes (passed to the deepspeed launcher) [1].")
HOSTFILE = O(None, "--hostfile", help="Hostfile for the deepspeed launcher.")
MASTER_PORT = O(None, "--master-port", help="Rendezvous port [a free one].")
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
REPORT_TO = O(None, "--report-to", help="Also log to: tensorboard (event files in RUN/tensorboard) | none [none].")
VERBOSE = O(False, "--verbose", help="Show third-party warnings and logs on the console too (RUN/train.log has them always).")
GRADIENT_CHECKPOINTING = O(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                           help="Recompute transformer layers in the backward pass: less activation memory, one more forward [off].")
