"""Folders at scale through the installed ``lm4lv`` command: --on-error, failures.csv and exit 3,
errors that name the file (never a traceback), eval --workers / --resume, --overwrite refusing a
foreign file."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_pairs

LM4LV = str(Path(sys.executable).parent / "lm4lv")


def lm4lv(*args, cwd=None) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([LM4LV, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)
    return r.returncode, r.stdout + r.stderr


@pytest.fixture
def folder(tmp_path) -> Path:
    write_pairs(tmp_path / "d", n=20, size=32)
    return tmp_path / "d"


def _broken(folder: Path) -> Path:
    bad = folder / "lq" / "7.png"
    bad.write_bytes(b"not an image")
    return bad


def _failures(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eval_workers_equal_and_skip_and_stop(folder, tmp_path):
    code, out = lm4lv("eval", "psnr,ssim", folder / "hq", folder / "lq", "--workers", "1", "--csv", tmp_path / "w1.csv")
    assert code == 0, out
    code, out = lm4lv("eval", "psnr,ssim", folder / "hq", folder / "lq", "--workers", "2", "--csv", tmp_path / "w2.csv")
    assert code == 0, out
    assert (tmp_path / "w1.csv").read_text() == (tmp_path / "w2.csv").read_text()
    bad = _broken(folder)
    code, out = lm4lv("eval", "psnr,ssim", folder / "hq", folder / "lq", "--workers", "2", "--csv", tmp_path / "s.csv")
    assert code == 2 and str(bad) in out and "Traceback" not in out
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "s.csv.partial.jsonl").exists()
    code, out = lm4lv("eval", "psnr,ssim", folder / "hq", folder / "lq", "--workers", "2", "--csv", tmp_path / "s.csv",
                      "--on-error", "skip")
    assert code == 3 and "1 image(s)" in out and "Traceback" not in out
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 20  # header + 19
    assert [r["path"] for r in _failures(tmp_path / "failures.csv")] == [str(bad)]


def test_eval_too_small_names_the_file(tmp_path):
    write_pairs(tmp_path / "d", n=2, size=8)
    code, out = lm4lv("eval", "psnr", tmp_path / "d" / "hq", tmp_path / "d" / "lq")
    assert code == 2 and str(tmp_path / "d" / "lq" / "0.png") in out and "Traceback" not in out
    # every pair failing under --on-error skip is an error naming the first, with nothing written
    code, out = lm4lv("eval", "psnr", tmp_path / "d" / "hq", tmp_path / "d" / "lq", "--on-error", "skip",
                      "--csv", tmp_path / "s.csv")
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "every one of the 2 pair(s) failed" in errors[0], out
    assert str(tmp_path / "d" / "lq" / "0.png") in errors[0] and "Traceback" not in out
    assert not (tmp_path / "s.csv").exists() and not list(tmp_path.glob("*.partial.jsonl"))


def test_eval_resume_scores_only_the_rest(folder, tmp_path):
    out_csv = tmp_path / "r.csv"
    code, full = lm4lv("eval", "psnr", folder / "hq", folder / "lq", "--csv", tmp_path / "full.csv", "--workers", "1")
    assert code == 0
    # an interrupted run: its journal holds 5 rows, one of them deliberately wrong to prove it is reused
    rows = list(csv.DictReader(open(tmp_path / "full.csv")))
    ident = {"metrics": ["psnr"], "gt": str((folder / "hq").resolve()), "preds": [str((folder / "lq").resolve())],
             "labels": None, "crop_border": 4, "lpips_net": "alex", "lpips_weights": None,
             "resize_to_smaller": False, "y_channel": False}
    lines = [json.dumps({"format": "lm4lv-eval-partial", "identity": ident})]
    for r in rows[:5]:
        lines.append(json.dumps({"k": 0, "row": {"name": r["name"], "gt": r["gt"], "pred": r["pred"],
                                                 "psnr": 123.0}}))
    journal = tmp_path / "r.csv.partial.jsonl"
    journal.write_text("\n".join(lines) + "\n")
    code, out = lm4lv("eval", "psnr", folder / "hq", folder / "lq", "--csv", out_csv)
    assert code == 2 and "--resume" in out and "Traceback" not in out
    code, out = lm4lv("eval", "psnr", folder / "hq", folder / "lq", "--csv", out_csv, "--resume", "--crop-border", "0")
    assert code == 2 and "other settings" in out and "crop_border" in out
    code, out = lm4lv("eval", "psnr", folder / "hq", folder / "lq", "--csv", out_csv, "--resume")
    assert code == 0, out
    got = list(csv.DictReader(open(out_csv)))
    assert [float(r["psnr"]) for r in got[:5]] == [123.0] * 5
    assert [r["psnr"] for r in got[5:]] == [r["psnr"] for r in rows[5:]]
    assert not journal.exists()


def test_make_data_skip_and_stop(folder, tmp_path):
    bad = _broken(folder)
    code, out = lm4lv("make-data", folder / "lq", "-o", tmp_path / "ds", "-d", "noise:sigma=10", "--size", "16")
    assert code == 2 and str(bad) in out and "Traceback" not in out
    assert not (tmp_path / "ds").exists() and not any(p.name.startswith(".lm4lv-partial") for p in tmp_path.iterdir())
    code, out = lm4lv("make-data", folder / "lq", "-o", tmp_path / "ds", "-d", "noise:sigma=10", "--size", "16",
                      "--on-error", "skip", "--workers", "2")
    assert code == 3 and "1 image(s)" in out and "Traceback" not in out
    assert len(list((tmp_path / "ds" / "hq").glob("*.png"))) == 19
    assert [r["path"] for r in _failures(tmp_path / "ds" / "failures.csv")] == [str(bad)]


def test_absurd_size_is_one_line_before_any_output(folder, tmp_path):
    code, out = lm4lv("make-data", folder / "hq", "-o", tmp_path / "ds", "-d", "noise", "--size", "1000000")
    assert code == 2 and "make-data --size 1000000" in out and "GiB" in out and "Traceback" not in out
    assert not (tmp_path / "ds").exists()


def test_make_data_continues_an_interrupted_build(folder, tmp_path):
    code, _ = lm4lv("make-data", folder / "hq", "-o", tmp_path / "a", "-d", "noise:sigma=10", "--size", "16")
    assert code == 0
    # what a killed run leaves: the partial folder with its settings and some finished images
    import shutil

    settings = {"clean_dir": str((folder / "hq").resolve()), "test_dir": "None", "size": 16, "seed": 0,
                "resize": "stretch", "degradations": [json.loads((tmp_path / "a" / "manifest.json").read_text())
                                                      ["degradations"][0]["canonical"]], "version": "0.1.0"}
    part = tmp_path / ".lm4lv-partial-b"
    shutil.copytree(tmp_path / "a", part)
    for f in ("train.json", "test.json", "manifest.json"):
        (part / f).unlink()
    (part / ".lm4lv-settings.json").write_text(json.dumps(settings))
    code, out = lm4lv("make-data", folder / "hq", "-o", tmp_path / "b", "-d", "noise:sigma=10", "--size", "16")
    assert code == 0 and "20 image(s) were already made" in out, out
    assert not part.exists()


def test_overwrite_refuses_a_foreign_file_in_checkpoints(tmp_path):
    from lm4lv_core.engine.run import prepare_run_dir

    run = tmp_path / "run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "checkpoints" / "step-2" / "state.json").write_text("{}")
    (run / "checkpoints" / "note.txt").write_text("mine")
    from lm4lv_core.errors import ConfigError

    with pytest.raises(ConfigError, match="note.txt"):
        prepare_run_dir(run, overwrite=True)
    assert (run / "checkpoints" / "step-2" / "state.json").exists()
    (run / "checkpoints" / "note.txt").unlink()
    prepare_run_dir(run, overwrite=True)
    assert not (run / "checkpoints").exists()


def test_overwrite_knows_what_lm4lv_writes_in_final_tensorboard_and_wandb(tmp_path):
    from lm4lv_core.engine.run import prepare_run_dir
    from lm4lv_core.errors import ConfigError

    run = tmp_path / "run"
    own = {"final": ["lm4lv.yaml", "trainable.safetensors", "lora/adapter_config.json",  # an LM4LV model
                     "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"],  # ft-mae's Hugging Face MAE folder, sharded
           "tensorboard": ["events.out.tfevents.1796624526.host.example.11018.0"],
           "wandb": ["offline-run-20261207_062127-rrop964w/run-rrop964w.wandb", "run-20261207_062127-ab12cd34/x",
                     "debug-cli.me.log", "lm4lv-run-id"]}
    for sub, names in own.items():
        for name in names:
            (run / sub / name).parent.mkdir(parents=True, exist_ok=True)
            (run / sub / name).write_text("lm4lv")
    for link, target in (("latest-run", "offline-run-20261207_062127-rrop964w"),
                         ("debug.log", "offline-run-20261207_062127-rrop964w/run-rrop964w.wandb"),
                         ("debug-internal.log", "offline-run-20261207_062127-rrop964w/run-rrop964w.wandb")):
        (run / "wandb" / link).symlink_to(target)
    for foreign in ("final/NOTES.txt", "tensorboard/mine", "wandb/settings"):
        (run / foreign).mkdir() if foreign == "tensorboard/mine" else (run / foreign).write_text("mine")
        with pytest.raises(ConfigError, match=str(run / foreign)):
            prepare_run_dir(run, overwrite=True)
        assert all((run / sub / name).exists() for sub, names in own.items() for name in names)
        (run / foreign).rmdir() if foreign == "tensorboard/mine" else (run / foreign).unlink()
    prepare_run_dir(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == []


@pytest.mark.slow
def test_overwrite_refuses_a_foreign_file_in_final_or_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from lm4lv_core.engine.run import prepare_run_dir

    data = write_pairs(tmp_path / "d", n=4, size=32)
    run = tmp_path / "run"
    train = ["train", "--data", data, "--preset", "tiny", "--out", run, "--max-steps", "1", "--save-every", "1"]
    code, out = lm4lv(*train, "--report-to", "tensorboard")
    assert code == 0, out
    written = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert any(p.startswith("tensorboard/events.out.tfevents.") for p in written) and "final/lm4lv.yaml" in written
    for foreign in (run / "final" / "NOTES.txt", run / "tensorboard" / "NOTES.txt"):
        foreign.write_text("mine")
        code, out = lm4lv(*train, "--overwrite")
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and str(foreign) in errors[0] and "Traceback" not in out, out
        assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p != foreign) == written
        foreign.unlink()
    # a resumed run that finishes writes a new final/ and keeps the user's file in it
    note, before = run / "final" / "NOTES.txt", (run / "final" / "trainable.safetensors").stat().st_ino
    note.write_text("mine")
    code, out = lm4lv("train", "--data", data, "--out", run, "--max-steps", "2", "--resume")
    assert code == 0, out
    assert (run / "final" / "trainable.safetensors").stat().st_ino != before  # a new save
    assert note.read_text() == "mine"
    note.unlink()
    prepare_run_dir(run, overwrite=True)  # what the run wrote is lm4lv's own: all of it goes
    assert sorted(p.name for p in run.iterdir()) == []


def test_overwrite_refusal_through_the_command(folder, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "note.txt").write_text("mine")
    (run / "metrics.csv").write_text("step\n")
    code, out = lm4lv("train", "--data", folder.parent / "d" / "train.json", "--preset", "tiny", "--out", run,
                      "--overwrite", "--max-steps", "1")
    assert code == 2 and "note.txt" in out and "Traceback" not in out
    assert (run / "checkpoints" / "note.txt").read_text() == "mine" and (run / "metrics.csv").exists()


def test_generate_input_skip_and_stop(folder, tmp_path):
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.sources.presets import preset_config

    LM4LV.from_config(preset_config("tiny", restore_prompt="<image> <task>")).save_pretrained(tmp_path / "m")
    bad = _broken(folder)
    code, out = lm4lv("generate", "--run", tmp_path / "m", "--input", folder / "lq", "-o", tmp_path / "r")
    assert code == 2 and str(bad) in out and "Traceback" not in out and not (tmp_path / "r").exists()
    code, out = lm4lv("generate", "--run", tmp_path / "m", "--input", folder / "lq", "-o", tmp_path / "r",
                      "--on-error", "skip")
    assert code == 3 and "1 image(s)" in out and "Traceback" not in out
    assert len(list((tmp_path / "r").glob("*.png"))) == 19
    assert [r["path"] for r in _failures(tmp_path / "r" / "failures.csv")] == [str(bad)]


def _cut_jpeg(src: Path, dst: Path) -> Path:
    """A JPEG cut off in its pixel data: its header reads, so it passes the check before the
    workers start; decoding it fails, in the worker."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(src).convert("RGB").save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    dst.write_bytes(data[:int(len(data) * 0.8)])
    return dst


@pytest.mark.slow
def test_generate_input_skips_an_image_that_fails_in_a_worker(tmp_path):
    from lm4lv_core.data.format import find_image_problems
    from lm4lv_core.data.outputs import plan_restore
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.model.restore import restore_samples
    from lm4lv_core.sources.presets import preset_config

    LM4LV.from_config(preset_config("tiny", restore_prompt="<image> <task>")).save_pretrained(tmp_path / "m")
    lq = write_pairs(tmp_path / "d", n=4, size=32).parent / "lq"
    cut = _cut_jpeg(lq / "1.png", lq / "1b.jpg")
    assert find_image_problems(restore_samples(plan_restore([cut], tmp_path / "x"), "<image>")) == []
    gen = ["generate", "--run", tmp_path / "m", "--input", lq]
    code, out = lm4lv(*gen, "-o", tmp_path / "stop", "--nproc", "2")
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and str(cut) in errors[0] and "Traceback" not in out, out
    assert not (tmp_path / "stop" / "1b.jpg").exists()
    # one more on the other worker (the images are dealt round-robin), and one the check finds
    cut2 = _cut_jpeg(lq / "3.png", lq / "3b.jpg")
    unreadable = lq / "2b.png"
    unreadable.write_bytes(b"not an image")
    for nproc in ("1", "2"):
        out_dir = tmp_path / f"skip{nproc}"
        code, out = lm4lv(*gen, "-o", out_dir, "--nproc", nproc, "--on-error", "skip")
        assert code == 3 and "3 image(s) could not be restored" in out and "4/7 images restored" in out, out
        assert "Traceback" not in out and "error:" not in out
        assert sorted(p.name for p in out_dir.iterdir() if p.suffix in (".png", ".jpg")) == \
            ["0.png", "1.png", "2.png", "3.png"]
        rows = _failures(out_dir / "failures.csv")
        assert [r["path"] for r in rows] == [str(cut), str(unreadable), str(cut2)]
        assert rows[0]["reason"].startswith("cannot read image (image file is truncated")
        assert rows[1]["reason"].startswith("unreadable image")
