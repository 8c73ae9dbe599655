"""Real multi-process launches (deepspeed launcher, accelerate launch, torchrun) and kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lm4lv_core.engine import checkpoint as ckpt
from lm4lv_core.errors import LM4LVError
from lm4lv_core.engine.launch import run_job

from test_train import assert_close, final_weights, metrics, run

pytestmark = pytest.mark.slow

STEPS = dict(max_steps=3, lr=1e-2, save_every=3, preview_every=3)


@pytest.fixture(scope="module")
def reference(tiny_config, tmp_path_factory):
    """One worker, micro-batch 4: the global batch the 2-worker runs reproduce."""
    from conftest import write_pairs

    root = tmp_path_factory.mktemp("ref")
    data = write_pairs(root / "data", n=6)
    run(tiny_config, data, root / "run", micro_batch=4, **STEPS)
    return data, root / "run"


def _order_sets(run_dir: Path) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for line in (run_dir / "data_order.csv").read_text().splitlines():
        step, _, ids = line.split(",")
        out.setdefault(int(step), []).extend(int(i) for i in ids.split())
    return {k: sorted(v) for k, v in out.items()}


def test_two_deepspeed_workers_zero3_match_one_worker(reference, tiny_config, tmp_path):
    data, ref = reference
    ds = tmp_path / "ds.json"  # partition even the tiny adapters across the two ranks
    ds.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    out = tmp_path / "run"
    run(tiny_config, data, out, nproc=2, micro_batch=2, zero_stage=3, deepspeed_config=str(ds), **STEPS)
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 2 and info["process_group"] == "gloo"
    assert _order_sets(out) == _order_sets(ref)
    assert_close(final_weights(out), final_weights(ref), 1e-4)
    assert (out / "previews" / "step-3.png").is_file()
    ck = load_file(str(out / "checkpoints" / "step-3" / "trainable.safetensors"))
    assert_close(ck, final_weights(out), 0)  # gathered, not the empty partitions


def test_two_accelerate_workers_match_one_worker_and_resume(reference, tiny_config, tmp_path):
    data, ref = reference
    out = tmp_path / "run"
    run(tiny_config, data, out, nproc=2, micro_batch=2, engine="accelerate", stop_after=2, **STEPS)
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert ckpt.complete_steps(out / "checkpoints") == [2]
    run(tiny_config, data, out, nproc=2, micro_batch=2, engine="accelerate", resume=True, **STEPS)
    assert _order_sets(out) == _order_sets(ref)
    assert_close(final_weights(out), final_weights(ref), 1e-4)
    assert [r["step"] for r in metrics(out)] == ["1", "2", "3"]


def test_torchrun_probe_and_worker_errors_reach_the_parent(tmp_path):
    with pytest.raises(LM4LVError, match="probe failed on purpose"):
        run_job("probe", {"out": str(tmp_path), "fail": "probe failed on purpose"}, nproc=2,
                engine="accelerate", launcher="torchrun", job_dir=tmp_path)
    seen = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("probe-rank*.json"))]
    assert [s["world_size"] for s in seen] == [2, 2] and [s["rank_sum"] for s in seen] == [1, 1]


def test_kill_9_never_leaves_a_checkpoint_resume_would_pick(tiny_config, pairs_file, tmp_path):
    # a half-written checkpoint is invisible; a step folder without checksums is reported and skipped
    root = tmp_path / "fake"
    ckpt.begin(root, 5)
    (ckpt.tmp_dir(root, 5) / "x.bin").write_bytes(b"x")
    ckpt.commit(root, 5, {"step": 5})
    ckpt.tmp_dir(root, 7).mkdir()
    (root / "step-9").mkdir()
    assert ckpt.latest(root) == root / "step-5"
    found, problems = ckpt.newest_intact(root)
    assert found == root / "step-5" and len(problems) == 1 and "step-9" in problems[0], problems

    kw = dict(max_steps=12, save_every=1, preview_every=100, micro_batch=1, keep_checkpoints=0)
    run(tiny_config, pairs_file, tmp_path / "straight", **kw)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lm4lv_cli.app", "train", "--data", str(pairs_file), "--out", str(out),
           "--preset", "tiny", "--max-steps", "12", "--save-every", "1", "--micro-batch", "1",
           "--preview-every", "100", "--keep-checkpoints", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "step-3").exists() and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = ckpt.complete_steps(out / "checkpoints")
    assert steps and max(steps) < 12 and not (out / "final").exists(), steps
    for s in steps:
        d = ckpt.step_dir(out / "checkpoints", s)
        assert (d / "trainable.safetensors").is_file() and (d / "rng-rank0.safetensors").is_file()
        assert list((d / "deepspeed").rglob("*.pt"))
    run(tiny_config, pairs_file, out, resume=True, **kw)
    assert_close(final_weights(out), final_weights(tmp_path / "straight"), 1e-6)
