"""Trained weights of another run, loaded into a new model: ``lm4lv train --init-from`` and
``lm4lv import-reference``.

A source is an lm4lv run (its ``final/``, else its newest intact checkpoint), a checkpoint
``RUN/checkpoints/step-N``, a saved model folder, or a reference delta checkpoint
(``pytorch_model*.pt``, see :mod:`lm4lv_core.sources.reference`). Its weights load into the new
model's saved weights (adapter, deadapter, task tokens, query, LoRA, a trained encoder / decoder)
by name. The rule, kept simple:

* a name present in both with the same shape is loaded;
* a name present in both with another shape is an error (the runs' model options differ, e.g.
  ``--num-task-tokens``): nothing is loaded and nothing is written;
* a name of the new model missing in the source starts fresh (its own initialisation);
* a source weight the new model does not save (e.g. LoRA when the new run has no ``--lora``, a
  trained encoder when the new run freezes it) is not used.

One line says what was loaded, what starts fresh and what was not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

LORA_DIR = "lora"
ORDER = ("adapter", "deadapter", "task_tokens", "query_tokens", "lora", "encoder", "decoder")  # of the summary


@dataclass
class InitSource:
    """Weights read from ``path``: lm4lv names, or the reference's (``reference``)."""

    path: str
    weights: dict[str, torch.Tensor]
    reference: bool = False


def read_source(spec: str, option: str = "--init-from") -> InitSource:
    """The weights of ``spec`` (see the module's docstring); errors name ``option``."""
    from safetensors.torch import load_file

    from ..defaults import WEIGHTS_FILE
    from ..sources.reference import read_delta_checkpoint

    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"{option} {spec}: not found")
    if path.is_file():
        if path.suffix in (".pt", ".pth", ".bin"):
            return InitSource(str(path), read_delta_checkpoint(path), reference=True)
        raise ConfigError(f"{option} {spec}: a file, but not a reference delta checkpoint (pytorch_model*.pt); "
                          "give a run, a checkpoint RUN/checkpoints/step-N or a saved model folder")
    from ..engine.model_source import find_model

    try:
        source = find_model(path)
    except ConfigError as e:
        raise ConfigError(str(e).replace("--run ", f"{option} ", 1)) from None
    weights = load_file(str(source.path / WEIGHTS_FILE))
    lora = source.path / LORA_DIR / "adapter_model.safetensors"
    if lora.is_file():  # a saved model's PEFT adapter: PEFT's names → the model's
        for k, v in load_file(str(lora)).items():
            name = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
            weights[f"llm.{name}"] = v
    return InitSource(str(source.path), weights)


def _group(name: str) -> str:
    if "lora_" in name:
        return "lora"
    return name.split(".", 1)[0]


def _counted(names: list[str]) -> str:
    groups: dict[str, int] = {}
    for n in names:
        groups[_group(n)] = groups.get(_group(n), 0) + 1
    rank = {g: i for i, g in enumerate(ORDER)}
    ordered = sorted(groups.items(), key=lambda gc: (rank.get(gc[0], len(ORDER)), gc[0]))
    return ", ".join(f"{g} ({c})" if c > 1 else g for g, c in ordered) or "nothing"


def match(source: InitSource, params: dict[str, Any], saved: list[str],
          option: str = "--init-from") -> tuple[dict[str, torch.Tensor], str]:
    """The source's weights to load into a model whose parameters are ``params`` (name → tensor,
    meta tensors will do) and that saves ``saved``, and the line saying what loads; a shape
    mismatch is a ``ConfigError``."""
    from ..sources.reference import to_lm4lv_names

    weights = to_lm4lv_names(source.weights, params, source.path) if source.reference else dict(source.weights)
    want = set(saved)
    load, unused, bad = {}, [], []
    for name, value in weights.items():
        if name not in want:
            unused.append(name)
        elif tuple(value.shape) != tuple(params[name].shape):
            bad.append(f"{name} {tuple(value.shape)} there, {tuple(params[name].shape)} here")
        else:
            load[name] = value
    if bad:
        raise ConfigError(f"{option} {source.path}: weights of another shape ({'; '.join(bad[:3])}"
                          f"{f'; {len(bad) - 3} more' if len(bad) > 3 else ''}); give the model options of "
                          "the run they come from (e.g. --num-task-tokens, the encoder, the LLM, --lora-r)")
    fresh = [n for n in saved if n not in load]
    line = (f"{option} {source.path}: loaded {_counted(list(load))}; fresh: {_counted(fresh)}"
            + (f"; not used: {_counted(unused)}" if unused else ""))
    return load, line


def load_into(model: torch.nn.Module, source: InitSource, option: str = "--init-from") -> str:
    """Load ``source`` into ``model`` (an ``LM4LV``, not yet wrapped by an engine); the summary line."""
    params = dict(model.named_parameters())
    load, line = match(source, params, model.saved_parameter_names(), option)
    with torch.no_grad():
        for name, value in load.items():
            params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))
    return line


def check_source(spec: str, model_config) -> str:
    """Parent side of ``--init-from``: read the source and match it against the new model's shapes
    (built on the meta device, no weights read); the line the workers will print."""
    import copy

    from ..model.memplan import build_meta_model

    source = read_source(spec)
    model, _ = build_meta_model(copy.deepcopy(model_config))
    return match(source, dict(model.named_parameters()), model.saved_parameter_names())[1]
