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

ROOT = Path(__file__).resolve().parent.parent
CLASSES = (TrainConfig, ModelSources, ModelConfig, LoraConfig, GenerationConfig)


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


@pytest.mark.parametrize("command,classes", [("train", (TrainConfig, ModelSources, ModelConfig, LoraConfig)),
                                             ("generate", (GenerationConfig,))])
def test_help_shows_every_option_with_the_fields_default(command, classes):
    from lm4lv_cli.options import default_text

    text = " ".join(_help(command).split())
    for cls in classes:
        for f in declared(cls, cli_only=True):
            flag = (f.metadata.get("flags") or "--" + option_name(f).replace("_", "-")).split("/")[0]
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
