"""``--report-to tensorboard`` and ``wandb``: scalars and preview images read back with TensorBoard's
reader and from W&B's offline run files."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from lm4lv_cli.app import app
from lm4lv_core.errors import ConfigError

pytest.importorskip("tensorboard")

TRAIN = ["--preset", "tiny", "--micro-batch", "2"]


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
    res = CliRunner().invoke(app, base + ["--report-to", "tensorboard,mlflow"])
    assert isinstance(res.exception, ConfigError) and "valid: none, tensorboard, wandb" in str(res.exception)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    res = CliRunner().invoke(app, base + ["--report-to", "tensorboard"])
    assert isinstance(res.exception, ConfigError) and 'pip install "lm4lv[tensorboard]"' in str(res.exception)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- wandb
def _wandb_records(path):
    """The records of a W&B run file (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic 0xBEE1,
    version), then LevelDB-log framed protobuf ``Record``s in 32 KiB blocks."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:6] == b":W&B\xe1\xbe", data[:7]
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the block end
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def _wandb_run(path):
    """(run record, config dict, history rows {key: value}) of one offline run file."""
    recs = _wandb_records(path)
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    for r in recs:
        if r.WhichOneof("record_type") == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
    history = [{"/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json) for i in r.history.item}
               for r in recs if r.WhichOneof("record_type") == "history"]
    return run, config, history


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    for var in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)


def test_wandb_offline_run_has_the_scalars_previews_name_and_config(pairs_file, tmp_path, wandb_offline):
    from PIL import Image

    run = tmp_path / "denoise"
    res = CliRunner().invoke(app, ["train", "--data", str(pairs_file), "--out", str(run), *TRAIN, "--max-steps", "3",
                                   "--stop-after", "2", "--preview-every", "1", "--report-to", "tensorboard,wandb"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["train", "--data", str(pairs_file), "--out", str(run), *TRAIN, "--max-steps", "3",
                                   "--preview-every", "1", "--report-to", "tensorboard,wandb", "--resume"])
    assert res.exit_code == 0, res.output
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # the run and its resumed continuation, one W&B run id
    (first, config, hist1), (second, _, hist2) = _wandb_run(files[0]), _wandb_run(files[1])
    assert first.run_id == second.run_id == (run / "wandb" / "lm4lv-run-id").read_text().strip()
    assert first.display_name == "denoise" and first.project == "lm4lv"
    assert config["train"]["max_steps"] == 3 and config["train"]["report_to"] == "tensorboard,wandb"
    assert config["model"]["template"] == "default" and config["task"] == "lm4lv"

    metrics = (run / "metrics.csv").read_text().splitlines()
    rows = [dict(zip(metrics[0].split(","), line.split(","))) for line in metrics[1:]]
    scalars = [h for h in hist1 + hist2 if "train/loss" in h]
    assert [h["_step"] for h in scalars] == [1, 2, 3]
    for h, row in zip(scalars, rows):
        assert h["train/loss"] == pytest.approx(float(row["loss"]), rel=1e-4)
        assert h["train/lr"] == pytest.approx(float(row["lr"]), rel=1e-4, abs=1e-12)
        assert {"train/text_loss", "train/vision_loss", "train/samples_per_s"} <= set(h)
    previews = [h for h in hist1 + hist2 if "preview/path" in h]
    assert [h["_step"] for h in previews] == [1, 2, 3]
    media = files[0].parent / "files" / previews[0]["preview/path"]
    with Image.open(media) as a, Image.open(run / "previews" / "step-1.png") as b:
        assert a.size == b.size and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()
    assert (run / "tensorboard").is_dir()  # both trackers
    # nothing of W&B on the console: lm4lv's own line says where the run is
    assert "kept offline" in res.output and "wandb sync" in res.output
    assert "Tracking run with wandb" not in res.output

    mae = tmp_path / "mae"
    res = CliRunner().invoke(app, ["ft-mae", str(pairs_file.parent / "hq"), "--out", str(mae), "--preset", "tiny",
                                   "--lpips-weight", "0", "--max-steps", "1", "--micro-batch", "2",
                                   "--report-to", "wandb"])
    assert res.exit_code == 0, res.output
    (file,) = (mae / "wandb").glob("offline-run-*/run-*.wandb")
    run_rec, config, hist = _wandb_run(file)
    assert run_rec.display_name == "mae" and config["task"] == "mae"
    assert any("train/l1" in h and h["_step"] == 1 for h in hist)


def test_missing_wandb_is_one_line_naming_the_extra(pairs_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    res = CliRunner().invoke(app, ["train", "--data", str(pairs_file), "--out", str(tmp_path / "run"), *TRAIN,
                                   "--max-steps", "1", "--report-to", "tensorboard,wandb"])
    assert isinstance(res.exception, ConfigError)
    assert str(res.exception) == ('--report-to wandb needs the wandb package: pip install "lm4lv[wandb]" '
                                  '(or pip install wandb)')
    assert not (tmp_path / "run").exists()
