"""``--resume`` is exact or refused: what a resumed run must share with its checkpoint.

Every option of a training job changes what the run computes, except those in
:data:`MAY_CHANGE` (how long to run, when to save, what to log, how to start the workers). A
checkpoint records the others as its *identity* in ``state.json``: the job's options (the
``train`` section and the task's own config, as resolved) without :data:`MAY_CHANGE`, the
number of workers and a fingerprint of the data's content (the job's ``data_fingerprint``, so a
different file of the same size is another data set). ``--resume`` compares the new job's
identity with the newest checkpoint's before any worker starts, and each worker again with the
checkpoint it loads; any difference stops the run with one line naming every differing option
with both values.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from typing import Any, Iterable, Mapping

from ..errors import ConfigError
from .config import may_change

# train options a resumed run may change (declared with ``may_change`` in TrainConfig)
MAY_CHANGE = may_change()
WORLD = "world_size"
LABELS = {WORLD: "workers (--nproc x --num-nodes)", "data_fingerprint": "data (content of --data)"}


def fingerprint(kind: str, items: Iterable[Any]) -> str:
    """``"N KIND, sha256 HEX"`` of JSON-able ``items`` (samples, file paths)."""
    items = list(items)
    digest = hashlib.sha256(json.dumps(items, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return f"{len(items)} {kind}, sha256 {digest[:16]}"


def identity(job: Any, world_size: int | None) -> dict[str, Any]:
    """The options of ``job`` (a training job dataclass) that a resumed run must keep, flat
    (``train.lr``, ``model.lora.r``, ...), with the number of workers (``None``: not known yet)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    data = asdict(job) if is_dataclass(job) else dict(job)
    for section, values in data.items():
        if isinstance(values, Mapping):
            values = {k: v for k, v in values.items() if not (section == "train" and k in MAY_CHANGE)}
        walk(section, values)
    if world_size is not None:
        out[WORLD] = world_size
    return json.loads(json.dumps(out))  # as state.json holds it (tuples as lists, ...)


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint's value, new value)`` of every key both record with different values
    (a key one side lacks is not compared: an older checkpoint, the parent's unknown world size)."""
    return [(k, saved[k], v) for k, v in now.items() if k in saved and saved[k] != v]


def label(key: str, labels: Mapping[str, str]) -> str:
    """The option a key stands for: ``train.lr`` → ``--lr``, ``model.encoder.kwargs.path`` →
    ``--encoder (kwargs.path)``; ``labels`` (the job's) and :data:`LABELS` name the others."""
    for k in (key, *(key.rsplit(".", n)[0] for n in range(1, key.count(".") + 1))):
        name = labels.get(k) or LABELS.get(k)
        if name:
            rest = key[len(k) + 1:]
            return f"{name} ({rest})" if rest else name
    parts = key.split(".")
    name = "--" + parts[1].replace("_", "-") if len(parts) > 1 else parts[0]
    return f"{name} ({'.'.join(parts[2:])})" if len(parts) > 2 else name


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."


def check(saved: Mapping[str, Any] | None, now: Mapping[str, Any], where: str,
          labels: Mapping[str, str] | None = None) -> None:
    """Refuse to resume from checkpoint ``where`` (identity ``saved``) with identity ``now``."""
    if not saved:
        return
    diff = differences(saved, now)
    if diff:
        shown = "; ".join(f"{label(k, labels or {})}: checkpoint {_show(a)}, now {_show(b)}" for k, a, b in diff)
        raise ConfigError(f"--resume from {where}: the run differs from the checkpoint in {shown}; "
                          "resume with the run's own options (they are in its config.yaml) or start a new run "
                          "(another --out, or --overwrite)")


def check_length(step: int, total_steps: int | None, where: str) -> None:
    """Refuse a run that would end before the step of the checkpoint it resumes from."""
    if total_steps is not None and step > total_steps:
        raise ConfigError(f"--resume from {where}: the checkpoint is at step {step}, after this run's last step "
                          f"{total_steps}; give --max-steps (or --epochs) reaching at least it")
