"""Option layering shared by the training commands (``lm4lv train``, ``lm4lv ft-mae``).

Precedence, lowest first: built-in defaults, the run folder's ``config.yaml`` (with ``--resume``),
``--config FILE.yaml``, then options given on the command line. A config file holds any option
by its name (``micro-batch`` or ``micro_batch``), or is a run's own ``config.yaml``
(``{task, train, <task's config>}``), whose run-specific options (``RUN_ONLY``) are not taken,
or the reference's ``train_*.yaml`` (recognised by its keys, see ``lm4lv_core.sources.reference``).
Each command turns the merged flat options into its typed job (``lm4lv_core.jobs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..config import load_yaml
from ..defaults import RUN_CONFIG
from ..errors import ConfigError
from .config import run_only

RUN_ONLY = run_only()  # never taken from a saved run config (declared with ``run_only`` in TrainConfig)


@dataclass
class Layered:
    """The merged options, the ones given on the command line, and the non-flat sections of a
    saved run config that was read (e.g. ``{"model": {...}}``)."""

    options: dict[str, Any]
    given: dict[str, Any]
    saved: dict[str, Any] = field(default_factory=dict)


def normalise(options: dict[str, Any], valid: Iterable[str], source: str) -> dict[str, Any]:
    """Option names with ``-`` → ``_``; an unknown name is an error naming ``source``."""
    out = {str(k).replace("-", "_"): v for k, v in options.items()}
    unknown = sorted(set(out) - set(valid))
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}")
    return out


def _from_file(path: Path | str, source: str, valid: set[str],
               flat_sections: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    data = load_yaml(path)
    from ..sources.reference import is_reference_train_config, train_options

    if is_reference_train_config(data):  # the reference's train_*.yaml: its keys mapped onto ours
        from ..util.logs import say

        flat, line = train_options(data, source, valid)
        say(line)
        return flat, {}
    if not isinstance(data.get("train"), dict):  # a file of flat options
        return normalise(data, valid, source), {}
    flat: dict[str, Any] = {}
    for section in flat_sections:
        flat.update(data.get(section) or {})
    flat = {k: v for k, v in flat.items() if k not in RUN_ONLY}
    return flat, {k: v for k, v in data.items() if k not in (*flat_sections, "task")}


def layer_options(cli: dict[str, Any], config_file: str | None, *, valid: set[str],
                  flat_sections: tuple[str, ...] = ("train",), required: tuple[str, ...] = ("out",)) -> Layered:
    """Merge the layers (``None`` values mean "not given") and check the required options."""
    given = {k: v for k, v in normalise(cli, valid, "options").items() if v is not None}
    layers: list[dict[str, Any]] = []
    saved: dict[str, Any] = {}
    out = given.get("out")
    if given.get("resume") and out and (Path(out) / RUN_CONFIG).is_file():
        flat, sections = _from_file(Path(out) / RUN_CONFIG, f"{out}/{RUN_CONFIG}", valid, flat_sections)
        layers.append(flat)
        saved.update(sections)
    if config_file:
        flat, sections = _from_file(config_file, f"--config {config_file}", valid, flat_sections)
        layers.append(flat)
        saved.update(sections)
    layers.append(given)
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    for key in required:
        if not merged.get(key):
            raise ConfigError(f"--{key} is required")
    return Layered(merged, given, saved)
