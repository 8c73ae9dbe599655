"""Each option is declared once (a config field with its type, default and one-line doc): every
field has a doc and, unless it is a recorded field, an option in ``--help`` whose default is the
field's; ``--config`` takes exactly those options; the docs' options page is generated from them."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from lm4lv_core.config import GenerationConfig, LoraConfig, ModelConfig, ModelSources, declared, option_name
from lm4lv_core.engine.config import TrainConfig
from lm4lv_core.jobs.configs import (EvalConfig, GenerateOptions, ImportOptions, MakeDataConfig, QuickstartConfig,
                                     ReconOptions)
from lm4lv_core.jobs.demo import DemoConfig
from lm4lv_core.tasks.mae_config import MAEFinetuneConfig

ROOT = Path(__file__).resolve().parent.parent
CLASSES = (TrainConfig, ModelSources, ModelConfig, LoraConfig, GenerationConfig, MAEFinetuneConfig, MakeDataConfig,
           EvalConfig, QuickstartConfig, DemoConfig, GenerateOptions, ReconOptions, ImportOptions)
# each command and the configs whose declared fields are its options
COMMANDS = [("train", (TrainConfig, ModelSources, ModelConfig, LoraConfig)), ("generate", (GenerationConfig, GenerateOptions)),
            ("recon", (ReconOptions,)), ("import-reference", (ImportOptions,)),
            ("ft-mae", (MAEFinetuneConfig,)), ("make-data", (MakeDataConfig,)), ("eval", (EvalConfig,)),
            ("quickstart", (QuickstartConfig,)), ("demo", (DemoConfig,))]


def _help(*args: str) -> str:
    from typer.testing import CliRunner

    from lm4lv_cli.app import app

    res = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert res.exit_code == 0, res.output
    return re.sub(r"[│╭╮╰╯─]", " ", res.output)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_field_is_declared_with_a_doc(cls):
    missing = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("doc")]
    assert not missing, f"{cls.__name__}: fields without option(... doc): {missing}"


@pytest.mark.parametrize("command,classes", COMMANDS, ids=[c for c, _ in COMMANDS])
def test_help_shows_every_option_with_the_fields_default(command, classes):
    from lm4lv_cli.options import default_text

    text = " ".join(_help(command).split())
    for cls in classes:
        for f in declared(cls, cli_only=True):
            flag = (f.metadata.get("flags") or "--" + option_name(f).replace("_", "-")).split()[0].split("/")[0]
            assert re.search(rf"{re.escape(flag)}\b", text), f"{flag} missing from lm4lv {command} --help"
            shown = default_text(f)
            if shown is not None and not f.metadata.get("shows"):  # the default itself, as the field has it
                d = f.default
                want = str(d) if not isinstance(d, bool) else shown
                assert shown == (repr(d) if d == "" else want)
                assert f"[default: {shown}]" in text, f"{flag}: [default: {shown}] missing from lm4lv {command} --help"


def test_config_file_takes_exactly_the_train_options():
    from lm4lv_cli.options import TRAIN_OPTIONS
    from lm4lv_core.jobs.train import option_names

    assert option_names() == set(TRAIN_OPTIONS)


def test_docs_options_page_is_generated_from_the_declarations():
    from lm4lv_cli.options import options_page

    assert (ROOT / "docs" / "options.md").read_text() == options_page(), \
        "regenerate it: python -m lm4lv_cli.options > docs/options.md"


@pytest.mark.parametrize("command", ["train", "generate", "recon", "import-reference", "ft-mae", "make-data", "eval",
                                     "quickstart", "demo"])
def test_no_command_declares_an_option_default_of_its_own(command):
    """Every option is a declared one (a config field's), except the required ones and the few that
    are actions of the command rather than settings (--config, --dry-run, --list, ...)."""
    import inspect

    import typer

    from lm4lv_cli import options as opt
    from lm4lv_cli.app import COMMANDS as FUNCTIONS

    actions = {"config", "dry_run", "gpu_memory", "list_"}
    tables = [v for v in vars(opt).values() if isinstance(v, dict) and v and all(
        isinstance(d, tuple) and len(d) == 2 and isinstance(d[1], typer.models.OptionInfo) for d in v.values())]
    declared_infos = {id(info) for t in tables for _, info in t.values()}
    own = [p.name for p in inspect.signature(FUNCTIONS[command]).parameters.values()
           if isinstance(p.default, typer.models.OptionInfo) and p.name not in actions
           and p.default.default is not ... and id(p.default) not in declared_infos]
    assert not own, f"lm4lv {command}: options with a default of their own: {own}"


def test_shared_options_are_declared_once():
    """--workers and --on-error of make-data and eval (the same declaration, each its own default),
    --overwrite of make-data, eval and quickstart, --verbose and --precision of the runs, quickstart
    and demo, --preset of train and ft-mae: one declaration each."""
    from lm4lv_cli import options as opt

    fields = {cls: {option_name(f): f for f in declared(cls)} for cls in (MakeDataConfig, EvalConfig)}
    for name in ("workers", "on_error"):
        assert fields[MakeDataConfig][name].metadata["doc"] == fields[EvalConfig][name].metadata["doc"], name
    for table in (opt.MAKE_DATA_OPTIONS, opt.EVAL_OPTIONS, opt.QUICKSTART_OPTIONS):
        assert table["overwrite"][1].param_decls == ("--overwrite",)
        assert table["overwrite"][1].help.startswith("Replace ")
    assert opt.QUICKSTART_OPTIONS["verbose"] is opt.RUN_OPTIONS["verbose"]
    assert opt.DEMO_OPTIONS["precision"] is opt.RUN_OPTIONS["precision"]
    assert opt.FT_MAE_OPTIONS["preset"] is opt.TRAIN_OPTIONS["preset"]
