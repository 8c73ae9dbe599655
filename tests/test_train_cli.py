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
