"""Command-line options derived from the typed configs: each option is a field declared once
(``lm4lv_core.config.option``: type, default, one-line doc, flag, help panel), and its Typer option,
help text with the default, and docs table come from that declaration.

``@with_train_options`` (train), ``@with_ft_mae_options`` (ft-mae), ``@with_worker_options``
(generate, recon), ``@with_eval_options`` (eval) and the like replace a command's dict parameter
by one option per entry of their table and hand the values back as that dict (``None`` = not
given), the flat form the option resolver layers (``lm4lv_core.engine.options``);
:func:`with_defaults` fills in the declared defaults where a command needs them itself.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from lm4lv_core.config import (PANELS, GenerationConfig, LoraConfig, ModelConfig, ModelSources, declared,
                               option_name)
from lm4lv_core.engine.config import TrainConfig
from lm4lv_core.jobs.configs import (EvalConfig, GenerateOptions, ImportOptions, MakeDataConfig, QuickstartConfig,
                                     ReconOptions)
from lm4lv_core.jobs.demo import DemoConfig
from lm4lv_core.tasks.mae_config import MAEFinetuneConfig

O = typer.Option

CONFIG = O(None, "--config", help="YAML file holding any of these options (the command line overrides it).")


def _base_type(tp: Any) -> Any:
    """The command-line type of a field's annotation: ``X | None`` → X; ``list[X]`` → a repeatable
    option; other unions and specs → str."""
    if typing.get_origin(tp) is list:
        return typing.List[_base_type(typing.get_args(tp)[0])]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        tp = args[0] if len(args) == 1 else str
    return tp if tp in (bool, int, float, str, Path) or typing.get_origin(tp) is list else str


def default_text(f: dataclasses.Field) -> str | None:
    """What the help says the default is: the field's default (or its declared ``shows``)."""
    if f.metadata.get("shows"):
        return f.metadata["shows"]
    d = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(d, bool):
        flags = (f.metadata.get("flags") or "").split("/")
        return flags[0 if d else 1].lstrip("-") if len(flags) == 2 else ("on" if d else "off")
    if d is None:
        return None
    return repr(d) if d == "" else str(d)


def help_text(f: dataclasses.Field) -> str:
    shown = default_text(f)
    return f.metadata["doc"] + (f" [default: {shown}]" if shown is not None else "")


def declared_options(*classes: type, exclude: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """name → (type, Typer option) for every option-declared field of ``classes`` (the option's
    name, flag, help with its default and help panel all come from the declaration), ordered by panel."""
    rows = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in declared(cls, cli_only=True):
            name = option_name(f)
            if name in exclude:
                continue
            flags = (f.metadata.get("flags") or "--" + name.replace("_", "-")).split()
            base = _base_type(hints[f.name])
            typ, default = (bool, False) if base is bool and "/" not in flags[0] else (Optional[base], None)
            if f.metadata.get("required"):
                typ, default = base, ...
            panel = f.metadata.get("panel") or None
            bounds = {"min": f.metadata["min"]} if f.metadata.get("min") is not None else {}
            rows.append((PANELS.index(panel) if panel in PANELS else -1, name,
                         (typ, O(default, *flags, help=help_text(f), rich_help_panel=panel, show_default=False,
                                 **bounds))))
    return {name: decl for _, name, decl in sorted(rows, key=lambda r: r[0])}


# the options of a training run (train, ft-mae): TrainConfig's fields
RUN_OPTIONS = declared_options(TrainConfig, exclude=("data", "out", "image_root", "cache_features", "init_from"))
# every option of `lm4lv train`: how to train, where the model comes from, the model and LoRA
TRAIN_OPTIONS = declared_options(TrainConfig, ModelSources, ModelConfig, LoraConfig)
# the model options of import-reference: where the parts come from, and what the checkpoint was trained with
IMPORT_OPTIONS = {k: TRAIN_OPTIONS[k] for k in (
    "preset", "llm", "mae", "mae_decoder", "vision_config", "encoder", "decoder", "adapter", "deadapter", "template",
    "gpt_prefix", "system_prompt", "lora", "lora_r", "lora_alpha", "lora_targets")}
# where the workers of generate / recon run: the node options of a run
NODE_OPTIONS = {k: RUN_OPTIONS[k] for k in ("launcher", "num_nodes", "node_rank", "master_addr", "master_port",
                                            "node_timeout", "hostfile")}
# how many workers, where and in which precision (generate, recon: the same declarations as train's)
WORKER_OPTIONS = {**{k: RUN_OPTIONS[k] for k in ("nproc", "engine", "precision")}, **NODE_OPTIONS,
                  "verbose": RUN_OPTIONS["verbose"]}
# the decoding options of generate (GenerationConfig) and the LLM's attention
GENERATION_OPTIONS = {**declared_options(GenerationConfig), "attn_implementation": TRAIN_OPTIONS["attn_implementation"]}
TILE_OPTIONS = {k: GENERATION_OPTIONS[k] for k in ("tile", "tile_overlap")}
VERBOSE = RUN_OPTIONS["verbose"][1]


def by_panel(table: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """``table`` ordered by help panel (as :func:`declared_options` orders one class's options)."""
    order = sorted(enumerate(table.items()), key=lambda r: (
        PANELS.index(r[1][1][1].rich_help_panel) if r[1][1][1].rich_help_panel in PANELS else -1, r[0]))
    return {name: decl for _, (name, decl) in order}


# ft-mae: the options of a run, its folder, where the MAE comes from (--mae, or --preset as train's) and the loss
FT_MAE_OPTIONS = by_panel({**RUN_OPTIONS, "out": TRAIN_OPTIONS["out"], "preset": TRAIN_OPTIONS["preset"],
                           **declared_options(MAEFinetuneConfig)})
# the image commands' own configs; --workers, --on-error and --overwrite are the shared declarations of
# lm4lv_core.config, --verbose and --precision those of the training runs
MAKE_DATA_OPTIONS = declared_options(MakeDataConfig)
EVAL_OPTIONS = declared_options(EvalConfig)
QUICKSTART_OPTIONS = by_panel({**declared_options(QuickstartConfig), "verbose": RUN_OPTIONS["verbose"]})
DEMO_OPTIONS = by_panel({**declared_options(DemoConfig), "precision": RUN_OPTIONS["precision"]})


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


GENERATE_OPTIONS = declared_options(GenerateOptions)
RECON_OPTIONS = declared_options(ReconOptions)
IMPORT_OWN_OPTIONS = declared_options(ImportOptions)
# the vision parts recon reconstructs through: train's declarations of them
RECON_MODEL_OPTIONS = {k: TRAIN_OPTIONS[k] for k in ("preset", "mae", "encoder", "decoder")}

# one decorator per (table, parameter) a command takes
with_train_options = _with_options(TRAIN_OPTIONS, "options")
with_ft_mae_options = _with_options(FT_MAE_OPTIONS, "options")
with_make_data_options = _with_options(MAKE_DATA_OPTIONS, "options")
with_eval_options = _with_options(EVAL_OPTIONS, "options")
with_quickstart_options = _with_options(QUICKSTART_OPTIONS, "options")
with_demo_options = _with_options(DEMO_OPTIONS, "options")
with_generate_options = _with_options(GENERATE_OPTIONS, "options")
with_recon_options = _with_options(RECON_OPTIONS, "options")
with_import_own_options = _with_options(IMPORT_OWN_OPTIONS, "options")
with_import_options = _with_options(IMPORT_OPTIONS, "model")
with_recon_model_options = _with_options(RECON_MODEL_OPTIONS, "model")
with_worker_options = _with_options(WORKER_OPTIONS, "workers")
with_generation_options = _with_options(GENERATION_OPTIONS, "gen")
with_tile_options = _with_options(TILE_OPTIONS, "tiles")


def with_defaults(values: dict[str, Any], *classes: type) -> dict[str, Any]:
    """``values`` with every option not given (``None``) set to its declared default in ``classes``."""
    defaults = {option_name(f): f.default for cls in classes for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}
    defaults.update({option_name(f): f.default_factory() for cls in classes for f in declared(cls, cli_only=True)
                     if f.default_factory is not dataclasses.MISSING})  # (a repeatable option's empty list)
    return {k: (defaults.get(k) if v is None else v) for k, v in values.items()}


def workers_of(values: dict[str, Any]):
    """The ``Workers`` of the worker options (``--nproc``, ``--engine``, the node options)."""
    from lm4lv_core.engine.cluster import Workers

    w = with_defaults(values, TrainConfig)
    return Workers(nproc=w["nproc"], engine=w["engine"], **given({k: values[k] for k in NODE_OPTIONS}))


def given(options: dict[str, Any]) -> dict[str, Any]:
    """The options that were given (``None`` left out, so defaults apply)."""
    return {k: v for k, v in options.items() if v is not None}


def markdown_table(table: dict[str, tuple[Any, Any]]) -> str:
    """A Markdown table of options (flag, panel, help with its default), as in ``--help``."""
    rows = ["| option | group | what it does [default] |", "|---|---|---|"]
    for _, (_, info) in table.items():
        flags = " / ".join(f"`{f}`" for decl in info.param_decls for f in decl.split("/"))
        text = info.help.replace("\\[", "[")  # (as written, whether or not the app escaped it for rich)
        rows.append(f"| {flags} | {info.rich_help_panel or ''} | {text.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def options_page() -> str:
    """``docs/options.md``: every declared option of every command, from the declarations."""
    sections = [
        ("`lm4lv train` (and its `--config` file)", TRAIN_OPTIONS),
        ("`lm4lv generate`", GENERATE_OPTIONS),
        ("`lm4lv generate`: decoding and tiles", GENERATION_OPTIONS),
        ("`lm4lv generate`, `lm4lv recon`: workers", WORKER_OPTIONS),
        ("`lm4lv recon`", {**RECON_OPTIONS, **RECON_MODEL_OPTIONS}),
        ("`lm4lv import-reference` (and the model options of `train`)", IMPORT_OWN_OPTIONS),
        ("`lm4lv ft-mae` (and its `--config` file)", FT_MAE_OPTIONS),
        ("`lm4lv make-data`", MAKE_DATA_OPTIONS),
        ("`lm4lv eval`", EVAL_OPTIONS),
        ("`lm4lv quickstart`", QUICKSTART_OPTIONS),
        ("`lm4lv demo` (besides the required `--run`)", DEMO_OPTIONS),
    ]
    parts = ["# Options", "",
             "Generated from the declarations in `lm4lv_core/config.py`, `lm4lv_core/engine/config.py`, "
             "`lm4lv_core/tasks/mae_config.py`, `lm4lv_core/jobs/configs.py` and `lm4lv_core/jobs/demo.py` "
             "(`python -m lm4lv_cli.options > docs/options.md`); `--help` shows the same text. An option "
             "several commands take (`--workers`, `--on-error`, `--overwrite`, `--verbose`, `--precision`) "
             "is declared once.", ""]
    for title, table in sections:
        parts += [f"## {title}", "", markdown_table(table), ""]
    parts += ["## `lm4lv import-reference`", "",
              "The model options of `lm4lv train`, as declared there: "
              + ", ".join(f"`{info.param_decls[0].split('/')[0]}`" for _, info in IMPORT_OPTIONS.values()) + ".", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(options_page(), end="")
