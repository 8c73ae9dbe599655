"""``--report-to tensorboard``: scalars and preview images read back with TensorBoard's reader."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from lm4lv_cli.app import app
from lm4lv_core.errors import ConfigError

pytest.importorskip("tensorboard")


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_train_and_ft_mae_write_tensorboard_scalars_and_previews(pairs_file, tmp_path):
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--data", str(pairs_file), "--out", str(run), "--preset", "tiny",
                                   "--max-steps", "2", "--micro-batch", "2", "--preview-every", "1",
                                   "--report-to", "tensorboard"])
    assert res.exit_code == 0, res.output
    acc = _events(run)
    metrics = (run / "metrics.csv").read_text().splitlines()
    assert metrics[0] == "step,loss,text_loss,vision_loss,lr,samples/s,skipped_steps"
    first = dict(zip(metrics[0].split(","), metrics[1].split(",")))
    assert {"train/loss", "train/text_loss", "train/vision_loss", "train/lr", "train/samples_per_s",
            "train/skipped_steps"} <= \
        set(acc.Tags()["scalars"])
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2] and loss[0].value == pytest.approx(float(first["loss"]), rel=1e-4)
    assert [e.step for e in acc.Images("preview")] == [1, 2]

    mae_run = tmp_path / "mae"
    res = CliRunner().invoke(app, ["ft-mae", str(pairs_file.parent / "hq"), "--out", str(mae_run), "--preset", "tiny",
                                   "--lpips-weight", "0", "--max-steps", "1", "--micro-batch", "2",
                                   "--report-to", "tensorboard"])
    assert res.exit_code == 0, res.output
    assert {"train/loss", "train/l1", "train/lr"} <= set(_events(mae_run).Tags()["scalars"])


def test_report_to_errors(pairs_file, tmp_path, monkeypatch):
    base = ["train", "--data", str(pairs_file), "--out", str(tmp_path / "run"), "--preset", "tiny", "--max-steps", "1"]
    res = CliRunner().invoke(app, base + ["--report-to", "wandb"])
    assert isinstance(res.exception, ConfigError) and "valid: none, tensorboard" in str(res.exception)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    res = CliRunner().invoke(app, base + ["--report-to", "tensorboard"])
    assert isinstance(res.exception, ConfigError) and 'pip install "lm4lv[tensorboard]"' in str(res.exception)
    assert not (tmp_path / "run").exists()
