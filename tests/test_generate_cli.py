"""`lm4lv generate` end to end: outputs, resume, overwrite, refusals, naming, several workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import write_pairs, run_cli
from lm4lv_core.data.format import parse_sample
from lm4lv_core.data.outputs import image_names, output_stems
from lm4lv_core.engine.model_source import resolve_model_dir


lm4lv = run_cli  # lm4lv ARGS in this process


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny model, and a generation file: 4 restoration samples + 1 captioning sample."""
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.sources.presets import preset_config

    root = tmp_path_factory.mktemp("gencli")
    write_pairs(root, n=4)
    test = [{"image": [f"lq/{i}.png"], "target": f"hq/{i}.png",
             "conversations": [{"from": "human", "value": "<image> <task>"}, {"from": "gpt", "value": ""}]}
            for i in range(4)]
    test.append({"image": ["lq/0.png"], "conversations": [{"from": "human", "value": "<image>\n"},
                                                           {"from": "gpt", "value": ""}]})
    (root / "test.json").write_text(json.dumps(test))
    torch.manual_seed(0)
    LM4LV.from_config(preset_config("tiny")).save_pretrained(root / "run" / "final")
    return root


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}


def test_generate_resume_and_overwrite(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["generate", "--run", setup / "run", "--data", setup / "test.json", "--out", out,
            "--batch-size", "3", "--max-new-tokens", "6"]
    code, log = lm4lv(monkeypatch, capsys, *args)
    assert code == 0, log
    assert "5/5 samples finished (5 generated)" in log
    recs = _results(out)
    assert [r["index"] for r in recs] == [0, 1, 2, 3, 4]
    # restoration samples: one image each, named from the input's relative path (0.png is the
    # input of two samples, so both names carry the sample index)
    assert [r["outputs"] for r in recs[:4]] == [["images/0~0.png"], ["images/1.png"], ["images/2.png"], ["images/3.png"]]
    assert all(r["text"] == "<image>" and r["target"] == f"hq/{r['index']}.png" for r in recs[:4])
    assert recs[4]["outputs"] == [] and recs[4]["text"]  # captioning: text only
    assert recs[0]["inputs"] == [str(setup / "lq" / "0.png")]
    from PIL import Image

    assert Image.open(out / "images" / "1.png").size == (32, 32)
    assert json.loads((out / "generate.json").read_text())["format"] == "lm4lv-generate"
    assert not (out / "parts").exists()

    # re-run: everything is skipped, nothing rewritten
    before = _mtimes(out)
    code, log = lm4lv(monkeypatch, capsys, *args)
    assert code == 0 and "(0 generated, 5 already done)" in log, log
    assert _mtimes(out) == before

    # a sample lost its image and another its record; a killed writer left a torn line
    (out / "images" / "2.png").unlink()
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:3] + lines[4:]))  # drop sample 3's record
    (out / "parts").mkdir()
    (out / "parts" / "rank-0-old.jsonl").write_text(lines[3][:-20])  # torn: no newline
    code, log = lm4lv(monkeypatch, capsys, *args)
    assert code == 0 and "(2 generated, 3 already done)" in log, log
    assert [r["index"] for r in _results(out)] == [0, 1, 2, 3, 4]
    after = _mtimes(out)
    assert after["1.png"] == before["1.png"] and after["3.png"] != before["3.png"]
    assert not (out / "parts").exists()

    # changed options need --overwrite; --overwrite regenerates everything
    code, log = lm4lv(monkeypatch, capsys, *args[:-1], "7")
    assert code == 2 and "error:" in log and "--overwrite" in log, log
    code, log = lm4lv(monkeypatch, capsys, *args[:-1], "7", "--overwrite")
    assert code == 0 and "(5 generated)" in log, log
    assert all(_mtimes(out)[k] != after[k] for k in after)


def test_refusals_happen_before_any_worker(setup, tmp_path, monkeypatch, capsys):
    run, data = setup / "run", setup / "test.json"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, log = lm4lv(monkeypatch, capsys, "generate", "--run", run, "--data", data, "--out", foreign)
    assert code == 2 and "not empty and not an lm4lv generate output" in log
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    bad = json.loads(data.read_text())
    bad[2]["image"] = ["lq/missing.png"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    (tmp_path / "lq").symlink_to(setup / "lq")
    code, log = lm4lv(monkeypatch, capsys, "generate", "--run", run, "--data", tmp_path / "bad.json",
                      "--out", tmp_path / "o1")
    assert code == 2 and "sample 2" in log and "missing.png" in log, log
    assert not (tmp_path / "o1").exists()

    for opt, val, msg in (("--precision", "fp8", "--precision"), ("--top-p", "0", "--top-p"),
                          ("--batch-size", "0", "--batch-size"), ("--mode", "video", "--mode"),
                          ("--engine", "slurm", "--engine"), ("--nproc", "0", "--nproc")):
        code, log = lm4lv(monkeypatch, capsys, "generate", "--run", run, "--data", data,
                          "--out", tmp_path / "o2", opt, val)
        assert code == 2 and msg in log, log
    code, log = lm4lv(monkeypatch, capsys, "generate", "--run", tmp_path, "--data", data, "--out", tmp_path / "o2")
    assert code == 2 and "--run" in log, log
    assert not (tmp_path / "o2").exists()


def test_run_folder_or_model_folder(setup):
    assert resolve_model_dir(setup / "run") == (setup / "run" / "final").resolve()
    assert resolve_model_dir(setup / "run" / "final") == (setup / "run" / "final").resolve()


def test_output_names_are_collision_free(tmp_path):
    paths = ["a/x.png", "a/x.jpg", "b/x.png", "a/x.png", "a/y.1.png", "a/y_1.png", "a/y.png", "a/x~1.png"]

    def sample(i, p):
        images = [str(tmp_path / p)] if p else []
        value = "<image> <task>" if p else "hello"
        return parse_sample({"image": images, "conversations": [{"from": "human", "value": value},
                                                                {"from": "gpt", "value": ""}]}, i)

    samples = [sample(i, p) for i, p in enumerate(paths)] + [sample(len(paths), None)]
    stems = output_stems(samples)
    assert stems[2] == "b/x" and stems[6] == "a/y" and stems[8] == "sample-8"
    assert stems[0] == "a/x~0" and stems[3] == "a/x~3"
    assert stems[1] == "a/x~1~1" and stems[7] == "a/x~1~7"  # "a/x~1" was taken by a real file
    assert stems[4] == "a/y_1~4" and stems[5] == "a/y_1~5"  # "y.1" would look like an extra image
    names = [n for i, s in stems.items() for n in image_names(s, 3)]  # up to 3 images each
    assert len(names) == len(set(names))
    assert image_names("a/y", 2) == ["images/a/y.png", "images/a/y.1.png"]


@pytest.mark.slow
def test_two_workers_produce_every_sample_exactly_once(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, log = lm4lv(monkeypatch, capsys, "generate", "--run", setup / "run", "--data", setup / "test.json",
                      "--out", out, "--nproc", "2", "--batch-size", "2", "--max-new-tokens", "4")
    assert code == 0, log
    assert "5/5 samples finished (5 generated)" in log, log
    recs = _results(out)
    assert [r["index"] for r in recs] == [0, 1, 2, 3, 4]
    assert [r["worker"] for r in recs] == [0, 1, 0, 1, 0]  # sample i is made by worker i % 2 only
    assert len(list((out / "images").glob("*.png"))) == 4


def test_changed_prompt_is_regenerated_and_a_retrained_model_is_refused(setup, tmp_path, monkeypatch, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(setup / "run", run)
    data = tmp_path / "test.json"
    samples = json.loads((setup / "test.json").read_text())[:2]
    for s in samples:
        s["image"] = [str(setup / p) for p in s["image"]]
    data.write_text(json.dumps(samples))
    out = tmp_path / "out"
    args = ["generate", "--run", run, "--data", data, "--out", out, "--max-new-tokens", "4"]
    assert lm4lv(monkeypatch, capsys, *args)[0] == 0
    samples[1]["conversations"][0]["value"] = "<image> describe it"
    data.write_text(json.dumps(samples))
    code, log = lm4lv(monkeypatch, capsys, *args)
    assert code == 0 and "(1 generated" in log, log
    assert _results(out)[1]["text"] != "<image>"  # answered in text mode now
    # the same folder, retrained: its outputs are stale
    from lm4lv_core.model.lm4lv import LM4LV

    model = LM4LV.from_pretrained(run / "final")
    with torch.no_grad():
        model.task_tokens.add_(1.0)
    model.save_pretrained(run / "final")
    code, log = lm4lv(monkeypatch, capsys, *args)
    assert code == 2 and "model_fingerprint" in log


def test_training_file_answers_are_dropped_and_generated(setup, tmp_path, monkeypatch, capsys):
    """A training file (each sample ends with its answer) generates like the explicit prompts,
    and the command says once that it dropped the answers."""
    out = tmp_path / "out"
    code, log = lm4lv(monkeypatch, capsys, "generate", "--run", setup / "run", "--data", setup / "train.json",
                      "--out", out, "--max-new-tokens", "4")
    assert code == 0 and "4/4 samples finished (4 generated)" in log, log
    notes = [line for line in log.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "4 of 4 samples" in notes[0] and "each last answer is dropped and generated" in notes[0]
    recs = _results(out)
    assert [r["inputs"] for r in recs] == [[str(setup / "lq" / f"{i}.png")] for i in range(4)]
    assert all(r["text"] == "<image>" and len(r["outputs"]) == 1 for r in recs)
    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps([{"image": [str(setup / "lq" / "1.png")], "conversations": [
        {"from": "human", "value": "<image> <task>"}, {"from": "gpt", "value": ""}]}]))
    code, log = lm4lv(monkeypatch, capsys, "generate", "--run", setup / "run", "--data", prompt,
                      "--out", tmp_path / "explicit", "--max-new-tokens", "4")
    assert code == 0 and "note:" not in log, log
    import numpy as np
    from PIL import Image

    explicit = np.asarray(Image.open(tmp_path / "explicit" / _results(tmp_path / "explicit")[0]["outputs"][0]))
    assert np.array_equal(np.asarray(Image.open(out / recs[1]["outputs"][0])), explicit)
