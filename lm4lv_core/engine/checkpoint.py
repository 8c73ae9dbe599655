"""Training checkpoints: complete or invisible.

A checkpoint ``RUN/checkpoints/step-N/`` is written into ``RUN/checkpoints/.lm4lv-tmp-step-N/`` by
all ranks, then rank 0 writes ``state.json`` and ``checksums.json`` (size and SHA-256 of every
file) and renames the folder to ``step-N`` in one ``os.replace`` once every rank has finished. So
a worker killed at any moment leaves the previous checkpoints and at most a temporary folder
(removed by the next run). Resume verifies the newest ``step-N`` against its checksums and falls
back to the newest intact one; pruning (``keep``) never removes the newest intact checkpoint.

Contents (besides what the backend writes, e.g. ``deepspeed/`` or ``optimizer.pt``):
``trainable.safetensors`` (full trainable weights, always finite: the loop never saves others),
``state.json`` (step, data position, batch geometry, the schedule's segments, the count of skipped
steps and the run's *identity*, the options a resume must keep: ``resume.py``), ``checksums.json``
and ``rng-rankR.safetensors`` (torch, CUDA, numpy and Python RNG of rank R).
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

from ..util import checksums
from ..util.fsutil import TEMP_PREFIX, write_json_atomic

STEP_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step}"


def tmp_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{TEMP_PREFIX}step-{step}"


def step_dirs(root: Path) -> list[int]:
    """Steps of every ``step-N`` folder under ``root`` (intact or not), ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for d in root.iterdir() if (m := STEP_RE.match(d.name)) and d.is_dir())


def complete_steps(root: Path) -> list[int]:
    """Steps of the published checkpoints under ``root`` (holding ``checksums.json``, the last
    file written), ascending; :func:`newest_intact` also verifies their contents."""
    return [s for s in step_dirs(root) if (step_dir(root, s) / checksums.CHECKSUMS_FILE).is_file()]


def latest(root: Path) -> Path | None:
    steps = complete_steps(root)
    return step_dir(root, steps[-1]) if steps else None


def newest_intact(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files all match ``checksums.json``, and one line per newer
    ``step-N`` folder that is damaged or incomplete (``"PATH: problem"``)."""
    problems = []
    for s in reversed(step_dirs(root)):
        d = step_dir(root, s)
        problem = checksums.verify(d)
        if problem is None:
            return d, problems
        problems.append(f"{d}: {problem}")
    return None, problems


def begin(root: Path, step: int) -> Path:
    """Rank 0: an empty temporary folder for the checkpoint of ``step`` (stale ones removed)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TEMP_PREFIX}*"):
        _remove(stale)
    tmp = tmp_dir(root, step)
    tmp.mkdir()
    return tmp


def commit(root: Path, step: int, state: dict[str, Any], keep: int = 0) -> Path:
    """Rank 0, after every rank has written into the temporary folder: record checksums and
    publish it atomically, then prune to the ``keep`` newest intact checkpoints."""
    tmp = tmp_dir(root, step)
    write_json_atomic(tmp / STATE_FILE, state)
    checksums.record(tmp)
    final = step_dir(root, step)
    if final.exists():  # an older run's (or a damaged) checkpoint of the same step
        _remove(final)
    tmp.replace(final)
    if keep:
        prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Keep the ``keep`` newest intact checkpoints (sizes checked) and anything newer; remove
    older ones. The newest intact checkpoint is never removed."""
    intact = 0
    for s in reversed(step_dirs(root)):
        d = step_dir(root, s)
        if intact >= keep:
            _remove(d)
        elif checksums.verify(d, full=False) is None:
            intact += 1


def _remove(d: Path) -> None:
    """Make ``d`` invisible first (a temporary name), then delete it."""
    if not d.is_dir():
        d.unlink(missing_ok=True)
        return
    gone = d if d.name.startswith(TEMP_PREFIX) else d.with_name(f"{TEMP_PREFIX}del-{d.name}")
    if gone != d:
        shutil.rmtree(gone, ignore_errors=True)
        d.replace(gone)
    shutil.rmtree(gone, ignore_errors=True)


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
