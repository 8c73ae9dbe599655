"""`lm4lv train` options: --config layering, --resume from the run's own config, refusals."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from lm4lv_cli.app import app
from lm4lv_core.errors import ConfigError

from test_train import metrics

runner = CliRunner()


def test_config_file_cli_override_and_bare_resume(pairs_file, tmp_path):
    conf = tmp_path / "train.yaml"
    conf.write_text(yaml.safe_dump({"preset": "tiny", "micro-batch": 1, "max_steps": 2, "save_every": 1,
                                    "data": str(pairs_file), "lora_targets": "q_proj", "lr": 1e-3}))
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--config", str(conf), "--out", str(out), "--max-steps", "3",
                              "--stop-after", "1", "--lora", "--num-task-tokens", "4"])
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 3 and saved["train"]["micro_batch"] == 1 and saved["train"]["lr"] == 1e-3
    assert saved["model"]["lora"]["enabled"] and saved["model"]["lora"]["target_modules"] == ["q_proj"]
    assert saved["model"]["num_task_tokens"] == 4
    assert not (out / "final").exists()
    # --resume alone continues with everything the run folder recorded
    res = runner.invoke(app, ["train", "--out", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in metrics(out)] == ["1", "2", "3"]
    assert (out / "final" / "lora" / "adapter_config.json").is_file()


def test_option_errors_name_the_option(pairs_file, tmp_path):
    conf = tmp_path / "bad.yaml"
    conf.write_text("micro_bach: 2\n")
    res = runner.invoke(app, ["train", "--config", str(conf), "--data", str(pairs_file), "--preset", "tiny",
                              "--out", str(tmp_path / "r")])
    assert isinstance(res.exception, ConfigError) and "micro_bach" in str(res.exception)
    res = runner.invoke(app, ["train", "--data", str(pairs_file), "--preset", "tiny", "--out", str(tmp_path / "r"),
                              "--engine", "accelerate", "--zero-stage", "2"])
    assert isinstance(res.exception, ConfigError) and "--zero-stage" in str(res.exception)
    res = runner.invoke(app, ["train", "--data", str(pairs_file), "--preset", "tiny", "--out", str(tmp_path / "r"),
                              "--precision", "fp16"])
    assert isinstance(res.exception, ConfigError) and "fp16" in str(res.exception)
    assert not (tmp_path / "r").exists()


def test_resume_with_model_options_keeps_the_saved_model_settings(pairs_file, tmp_path):
    from lm4lv_core.config import load_yaml
    from lm4lv_core.jobs.train import resolve_options

    out = tmp_path / "run"
    out.mkdir()
    first, model = resolve_options({"data": str(pairs_file), "out": str(out), "preset": "tiny",
                                    "template": "llama2", "gpt_prefix": "Sure.", "lora": True})
    from lm4lv_core.config import save_yaml, to_dict

    save_yaml({"task": "lm4lv", "train": to_dict(first), "model": to_dict(model)}, out / "config.yaml")
    _, resumed = resolve_options({"data": str(pairs_file), "out": str(out), "preset": "tiny", "resume": True})
    assert resumed.template == "llama2" and resumed.gpt_prefix == "Sure." and resumed.lora.enabled
    assert load_yaml(out / "config.yaml")["model"]["template"] == "llama2"
    import pytest

    from lm4lv_core.errors import ConfigError

    with pytest.raises(ConfigError, match="--resume: the llm given now differs"):
        resolve_options({"data": str(pairs_file), "out": str(out), "preset": "tiny-gpt2", "resume": True})


def test_deepspeed_config_cannot_change_the_batch_behind_the_loop(pairs_file, tmp_path):
    from typer.testing import CliRunner

    from lm4lv_cli.app import app

    ds = tmp_path / "ds.json"
    ds.write_text('{"gradient_accumulation_steps": 8, "zero_optimization": {"stage": 1}}')
    res = CliRunner().invoke(app, ["train", "--data", str(pairs_file), "--out", str(tmp_path / "run"),
                                   "--preset", "tiny", "--max-steps", "1", "--deepspeed-config", str(ds)])
    assert res.exit_code != 0 and "gradient_accumulation_steps = 8 disagrees with --grad-accum" in str(res.exception)
    assert not (tmp_path / "run").exists()
