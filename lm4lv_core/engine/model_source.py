"""What ``--run`` names (``generate``, ``recon``, ``--init-from``, ``import-reference``): a training
run's ``final/`` model, its newest intact checkpoint, a checkpoint ``RUN/checkpoints/step-N`` or a
saved model folder, with the model config that goes with it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig, from_dict, load_yaml
from ..defaults import MODEL_CONFIG, RUN_CONFIG, WEIGHTS_FILE
from ..errors import ConfigError
from ..util.finite import nonfinite_in_file


@dataclass
class ModelSource:
    """What ``--run`` names: a saved model folder (``config`` None: its own ``lm4lv.yaml``) or a
    training checkpoint (``config``: the model config of its run); ``note`` for the user."""

    path: Path
    config: ModelConfig | None = None
    note: str | None = None

    @property
    def model(self) -> ModelConfig:
        """The model's config: the checkpoint's run's, or the saved folder's ``lm4lv.yaml``."""
        if self.config is not None:
            return self.config
        path = self.path / MODEL_CONFIG
        return from_dict(ModelConfig, load_yaml(path), source=str(path))


def find_model(run: str | os.PathLike) -> ModelSource:
    """A training run folder (its ``final/``, else its newest intact checkpoint), a checkpoint
    ``RUN/checkpoints/step-N`` or a saved model folder; its weights must be finite."""
    from . import checkpoint as ckpt

    run = Path(run)
    for cand in (run / "final", run):
        if (cand / MODEL_CONFIG).is_file():
            source = ModelSource(cand.resolve())
            break
    else:
        if not run.exists():
            raise ConfigError(f"--run {run}: folder not found")
        if (run / ckpt.STATE_FILE).is_file():
            source = _checkpoint(run)
        elif ckpt.step_dirs(run / "checkpoints"):
            newest, problems = ckpt.newest_intact(run / "checkpoints")
            if newest is None:
                raise ConfigError(f"--run {run}: no final/ and no intact checkpoint ({'; '.join(problems)})")
            source = _checkpoint(newest)
            source.note = f"note: {run} has no final/ (yet): generating with its newest checkpoint {newest}"
        else:
            raise ConfigError(f"--run {run}: neither a saved model folder, a checkpoint, nor a run with "
                              f"final/{MODEL_CONFIG} or checkpoints")
    files = [source.path / WEIGHTS_FILE, source.path / "lora" / "adapter_model.safetensors"]
    for f in (f for f in files if f.is_file()):
        bad = nonfinite_in_file(f)
        if bad:
            raise ConfigError(f"--run {run}: non-finite weights (NaN or inf) in {f} ({', '.join(bad[:3])}): the "
                              "training run that wrote them diverged; use an earlier checkpoint (RUN/checkpoints/step-N)")
    return source


def resolve_model_dir(run: str | os.PathLike) -> Path:
    """The folder of :func:`find_model`."""
    return find_model(run).path


def _checkpoint(step_dir: Path) -> ModelSource:
    """A training checkpoint: verified, with the model config of its run (``RUN/config.yaml``)."""
    from ..util.checksums import verify

    problem = verify(step_dir)
    if problem:
        raise ConfigError(f"--run {step_dir}: damaged or incomplete checkpoint ({problem})")
    record = step_dir.parent.parent / RUN_CONFIG
    saved = load_yaml(record) if record.is_file() else {}
    if not isinstance(saved.get("model"), dict):
        raise ConfigError(f"--run {step_dir}: a checkpoint without its run's {RUN_CONFIG} (an lm4lv train run) "
                          f"at {record}")
    return ModelSource(step_dir.resolve(), from_dict(ModelConfig, saved["model"], source=str(record)))
