"""A model config is resolved once and then frozen: training and generating from a frozen config
change nothing in it, and setting a field of a frozen config fails loudly."""

from __future__ import annotations

import pytest

from conftest import write_pairs


def test_frozen_config_trains_and_generates_unchanged(tmp_path):
    from lm4lv_core.config import freeze, is_frozen, to_dict
    from lm4lv_core.data.format import load_checked
    from lm4lv_core.engine.config import TrainConfig
    from lm4lv_core.jobs.generate import generate
    from lm4lv_core.jobs.train import complete_for_run, train
    from lm4lv_core.sources.presets import preset_config

    data = write_pairs(tmp_path / "data", n=2)
    model = complete_for_run(preset_config("tiny"), load_checked(str(data), mode="train"))
    assert is_frozen(model) and is_frozen(model.lora) and is_frozen(model.encoder)
    before = to_dict(model)
    assert before["adapter"]["name"] == "linear" and before["attn_implementation"] != "auto"
    assert before["restore_prompt"] == "<image> <task>"
    with pytest.raises(AttributeError, match="resolved and frozen"):
        model.lora.r = 4
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), max_steps=1)
    train(cfg, model)
    generate(tmp_path / "run", data, tmp_path / "gen")
    assert to_dict(model) == before
    assert sorted(p.name for p in (tmp_path / "gen" / "images").iterdir()) == ["0.png", "1.png"]
    freeze(model)  # freezing again is harmless
