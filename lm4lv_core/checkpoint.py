"""Training checkpoints: complete or invisible.

A checkpoint ``RUN/checkpoints/step-N/`` is written into ``RUN/checkpoints/.step-N.tmp/`` by all
ranks, then renamed to ``step-N`` by rank 0 in one ``os.replace`` once every rank has finished.
Resume only looks at folders named ``step-N`` that hold ``state.json``, so a worker killed at
any moment leaves either the previous checkpoints or the new one, never a half-written one.

Contents (besides what the backend writes, e.g. ``deepspeed/`` or ``optimizer.pt``):
``trainable.safetensors`` (full trainable weights), ``state.json`` (step, data position,
batch geometry) and ``rng-rankR.safetensors`` (torch, CUDA, numpy and Python RNG of rank R).
Everything loads with ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .fsutil import write_json_atomic

STEP_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step}"


def tmp_dir(root: Path, step: int) -> Path:
    return Path(root) / f".step-{step}.tmp"


def complete_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints under ``root``, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        m = STEP_RE.match(d.name)
        if m and d.is_dir() and (d / STATE_FILE).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest(root: Path) -> Path | None:
    steps = complete_steps(root)
    return step_dir(root, steps[-1]) if steps else None


def begin(root: Path, step: int) -> Path:
    """Rank 0: an empty temporary folder for the checkpoint of ``step`` (stale ones removed)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".step-*.tmp"), *root.glob(".step-*.del")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tmp_dir(root, step)
    tmp.mkdir()
    return tmp


def commit(root: Path, step: int, state: dict[str, Any], keep: int = 0) -> Path:
    """Rank 0, after every rank has written into the temporary folder: publish it atomically."""
    tmp = tmp_dir(root, step)
    write_json_atomic(tmp / STATE_FILE, state)
    final = step_dir(root, step)
    if final.exists():  # an older run's checkpoint of the same step (after --overwrite)
        shutil.rmtree(final)
    tmp.replace(final)
    if keep:
        for old in complete_steps(root)[:-keep]:
            gone = Path(root) / f".step-{old}.del"
            step_dir(root, old).replace(gone)  # invisible first, then removed
            shutil.rmtree(gone, ignore_errors=True)
    return final


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / STATE_FILE).read_text(encoding="utf-8"))


def save_weights(sd: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().float().cpu().contiguous() for k, v in sd.items()}, str(path),
              metadata={"format": "pt"})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ----------------------------------------------------------------------------- RNG
def save_rng(path: Path) -> None:
    """The RNG states of this process (torch CPU and CUDA, numpy's global, Python's)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    tensors["python_state"] = torch.tensor(py_state, dtype=torch.int64)
    meta = {"numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)]),
            "python": json.dumps([py_version, py_gauss])}
    save_file(tensors, str(path), metadata=meta)


def load_rng(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    py_version, py_gauss = json.loads(meta["python"])
    random.setstate((py_version, tuple(int(x) for x in tensors["python_state"].tolist()), py_gauss))
