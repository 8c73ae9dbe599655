"""``lm4lv train --init-from``: a new run (step 0, fresh optimizer) starting from another run's weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli

TRAIN = ("train", "--preset", "tiny", "--micro-batch", "2", "--preview-every", "100", "--save-every", "1")


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    import subprocess
    import sys

    from conftest import write_pairs

    root = tmp_path_factory.mktemp("init")
    data = write_pairs(root / "data")
    a = root / "a"
    done = subprocess.run([sys.executable, "-m", "lm4lv_cli.app", *TRAIN, "--data", str(data), "--out", str(a),
                           "--max-steps", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return data, a


def test_init_from_run_with_zero_steps_equals_the_source(monkeypatch, capsys, run_a, tmp_path):
    data, a = run_a
    code, out = run_cli(monkeypatch, capsys, *TRAIN, "--data", data, "--out", tmp_path / "b", "--init-from", a,
                        "--max-steps", "0")
    assert code == 0, out
    assert "loaded adapter (2), deadapter (2), task_tokens; fresh: nothing" in out, out
    want, got = load_file(a / "final" / "trainable.safetensors"), load_file(tmp_path / "b" / "final" / "trainable.safetensors")
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    import yaml

    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["train"]["init_from"] == str(a.resolve())


def test_init_from_a_checkpoint_trains_on(monkeypatch, capsys, run_a, tmp_path):
    data, a = run_a
    code, out = run_cli(monkeypatch, capsys, *TRAIN, "--data", data, "--out", tmp_path / "b", "--init-from",
                        a / "checkpoints" / "step-1", "--max-steps", "1",
                        "--lr-schedule", "constant")  # (the reference schedule's first steps have lr 0)
    assert code == 0, out
    assert "loaded adapter (2)" in out
    start = load_file(a / "checkpoints" / "step-1" / "trainable.safetensors")
    got = load_file(tmp_path / "b" / "final" / "trainable.safetensors")
    assert not torch.equal(start["task_tokens"], got["task_tokens"])  # one step trained from it
    assert (start["task_tokens"] - got["task_tokens"]).abs().max() < 0.1


def test_shape_mismatch_is_one_error_and_nothing_written(monkeypatch, capsys, run_a, tmp_path):
    data, a = run_a
    b = tmp_path / "b"
    code, out = run_cli(monkeypatch, capsys, *TRAIN, "--data", data, "--out", b, "--init-from", a,
                        "--max-steps", "0", "--num-task-tokens", "3")
    assert code == 2
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --init-from") and "task_tokens (10, 64) there, (3, 64) here" \
        in lines[0], out
    assert not b.exists() or not any(b.iterdir())


def test_missing_source_is_one_error(monkeypatch, capsys, run_a, tmp_path):
    data, _ = run_a
    code, out = run_cli(monkeypatch, capsys, *TRAIN, "--data", data, "--out", tmp_path / "b", "--init-from",
                        tmp_path / "nope", "--max-steps", "0")
    assert code == 2 and out.strip().startswith("error: --init-from") and "not found" in out


def test_resume_does_not_apply_init_from(monkeypatch, capsys, run_a, tmp_path):
    data, a = run_a
    b = tmp_path / "b"
    code, out = run_cli(monkeypatch, capsys, *TRAIN, "--data", data, "--out", b, "--max-steps", "2", "--stop-after", "1")
    assert code == 0, out
    before = load_file(b / "checkpoints" / "step-1" / "trainable.safetensors")
    code, out = run_cli(monkeypatch, capsys, *TRAIN, "--data", data, "--out", b, "--max-steps", "1", "--resume",
                        "--init-from", a)
    # --init-from is part of what a resumed run must keep: refused, and the checkpoint is untouched
    assert code == 2 and "init_from" in out.replace("-", "_"), out
    code, out = run_cli(monkeypatch, capsys, *TRAIN, "--data", data, "--out", b, "--max-steps", "1", "--resume")
    assert code == 0, out
    assert "--init-from" not in out
    got = load_file(b / "final" / "trainable.safetensors")
    for k in before:
        assert torch.equal(before[k], got[k]), k


def test_the_two_stage_captioning_recipe_of_the_docs(monkeypatch, capsys, tmp_path):
    """docs/vision.md's recipe with the tiny preset on the quickstart's pictures: stage 1 trains the
    adapter on captions; stage 2 starts from it, keeps it frozen and trains the task tokens with the
    answer prefix."""
    import json

    from conftest import write_pairs

    write_pairs(tmp_path, n=4)
    captions = [{"image": f"hq/{i}.png", "conversations": [{"from": "human", "value": "<image> <task>"},
                                                           {"from": "gpt", "value": "a small picture"}]}
                for i in range(4)]
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    common = ("train", "--data", tmp_path / "captions.json", "--preset", "tiny", "--micro-batch", "2",
              "--max-steps", "2", "--lr-schedule", "constant", "--warmup-ratio", "0")
    code, out = run_cli(monkeypatch, capsys, *common, "--out", tmp_path / "stage1")
    assert code == 0, out
    code, out = run_cli(monkeypatch, capsys, *common, "--out", tmp_path / "stage2", "--init-from", tmp_path / "stage1",
                        "--freeze-adapter", "--freeze-deadapter", "--gpt-prefix", "A picture of")
    assert code == 0, out
    one = load_file(tmp_path / "stage1" / "final" / "trainable.safetensors")
    two = load_file(tmp_path / "stage2" / "final" / "trainable.safetensors")
    assert torch.equal(one["adapter.weight"], two["adapter.weight"])  # loaded, then frozen
    assert not torch.equal(one["task_tokens"], two["task_tokens"])  # loaded, then trained on
    import yaml

    assert yaml.safe_load((tmp_path / "stage2" / "final" / "lm4lv.yaml").read_text())["gpt_prefix"] == "A picture of"
