"""Fail loudly, never silently: divergence, resume with other options, outputs that exist, errors
inside workers, generating from a checkpoint, the commands of docs/real-use.md."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_pairs
from lm4lv_core.engine import checkpoint as ckpt
from lm4lv_core.errors import ConfigError, Diverged
from test_train import metrics, run

ROOT = Path(__file__).resolve().parent.parent
LM4LV = shutil.which("lm4lv") or str(Path(sys.executable).with_name("lm4lv"))
DIVERGE = ["--lr", "1e30", "--lr-schedule", "constant", "--grad-clip", "0"]


def lm4lv(*args, cwd: Path | None = None) -> tuple[int, list[str], str]:
    """Run the installed ``lm4lv`` script: exit code, its ``error:`` lines, all its output."""
    proc = subprocess.run([LM4LV, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    return proc.returncode, [ln for ln in out.splitlines() if ln.startswith("error:")], out


def _finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loud")
    write_pairs(root, n=4)
    test = [{"image": [f"lq/{i}.png"], "conversations": [{"from": "human", "value": "<image> <task>"},
                                                          {"from": "gpt", "value": ""}]} for i in range(4)]
    (root / "test.json").write_text(json.dumps(test))
    return root


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory) -> Path:
    """A LoRA run stopped by --stop-after at step 2 of 4 (checkpoints at 1 and 2, no final/)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    code, err, log = lm4lv("train", "--data", data / "train.json", "--out", out, "--preset", "tiny", "--max-steps", 4,
                           "--micro-batch", 2, "--save-every", 1, "--stop-after", 2, "--lora",
                           "--lr-schedule", "constant", "--lr", "1e-2")
    assert code == 0, log
    return out


def _corrupt_idat(src: Path, dst: Path) -> None:
    """A PNG whose chunks and checksums are valid (it passes the checks before a run) but whose
    pixel data cannot be decoded."""
    import struct
    import zlib

    b = src.read_bytes()
    out, i = bytearray(b[:8]), 8
    while i < len(b):
        n = struct.unpack(">I", b[i:i + 4])[0]
        typ, chunk = b[i + 4:i + 8], bytearray(b[i + 8:i + 8 + n])
        if typ == b"IDAT":
            for k in range(len(chunk) // 2, len(chunk)):
                chunk[k] ^= 0x5A
        out += struct.pack(">I", n) + typ + chunk + struct.pack(">I", zlib.crc32(typ + bytes(chunk)) & 0xFFFFFFFF)
        i += 12 + n
    dst.write_bytes(bytes(out))


# ----------------------------------------------------------------------------- divergence
def test_nonfinite_option_values_are_refused(stopped, data, tmp_path):
    train = ["train", "--data", data / "train.json", "--out", tmp_path / "run", "--preset", "tiny", "--dry-run"]
    for extra, option in ((["--lr", "inf"], "--lr"), (["--vision-loss-weight", "nan"], "--vision-loss-weight"),
                          (["--warmup-ratio", "nan"], "--warmup-ratio"), (["--grad-clip", "inf"], "--grad-clip")):
        code, err, log = lm4lv(*train, *extra)
        assert code == 2 and err == [f"error: {option} must be a finite number, got {extra[1]}"], log
    code, err, log = lm4lv("generate", "--run", stopped, "--data", data / "test.json", "--out", tmp_path / "gen",
                           "--temperature", "nan")
    assert code == 2 and err == ["error: --temperature must be a finite number, got nan"], log
    code, err, log = lm4lv("ft-mae", data / "hq", "--out", tmp_path / "mae", "--preset", "tiny", "--lpips-weight", "inf")
    assert code == 2 and err == ["error: --lpips-weight must be a finite number, got inf"], log
    assert not any((tmp_path / d).exists() for d in ("run", "gen", "mae"))


def test_divergence_stops_with_one_line_and_keeps_the_newest_finite_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    code, err, log = lm4lv("train", "--data", data / "train.json", "--out", out, "--preset", "tiny",
                           "--max-steps", 8, "--micro-batch", 2, "--save-every", 1, "--keep-checkpoints", 2, *DIVERGE)
    assert code == 2 and len(err) == 1, log
    assert re.match(r"error: training diverged: non-finite loss, vision_loss at steps 2-4 \(skipped, "
                    r"--max-skipped-steps 3\); the newest checkpoint .*step-1 holds finite weights; lower --lr "
                    r"\(now 1e\+30\) or clip gradients with --grad-clip \(now 0\)", err[0]), err[0]
    assert "Traceback" not in log and "done" not in log
    rows = metrics(out)
    assert [r["skipped_steps"] for r in rows] == ["0", "1", "2", "3"] and rows[1]["loss"] == "inf"
    assert ckpt.complete_steps(out / "checkpoints") == [1] and not (out / "final").exists()
    assert _finite(out / "checkpoints" / "step-1" / "trainable.safetensors")


@pytest.mark.parametrize("engine,zero", [("deepspeed", 0), ("deepspeed", 2), ("accelerate", 0)])
def test_a_skipped_step_leaves_weights_and_optimizer_alone(tiny_config, data, tmp_path, monkeypatch, engine, zero):
    """Step 2 has a finite loss but a NaN gradient: it is skipped (on both engines and with
    DeepSpeed's own ZeRO optimizer), the schedule goes on, the run finishes; a NaN loss in the
    last step leaves no final/."""
    from lm4lv_core.engine.loop import Trainer
    from lm4lv_core.tasks.lm4lv import LM4LVTask

    loss, log = LM4LVTask.loss, Trainer._log
    calls, seen = [], {}

    def nan_gradient_at_2(self, model, batch):
        out = loss(self, model, batch)
        calls.append(1)
        if len(calls) == 2:  # sqrt(|x|) at 0: value 0, gradient NaN
            x = self.model.task_tokens[0, 0] - self.model.task_tokens[0, 0].detach()
            out["loss"] = out["loss"] + x.abs().sqrt()
        return out

    def log_weights(self, row, ids, progress):
        log(self, row, ids, progress)
        seen[row["step"]] = (self.backend.full_trainable_state_dict(),
                             [float(s["step"]) for s in self.backend._torch_optimizer.state.values() if "step" in s])

    monkeypatch.setattr(LM4LVTask, "loss", nan_gradient_at_2)
    monkeypatch.setattr(Trainer, "_log", log_weights)
    out = tmp_path / "run"
    summary = run(tiny_config, data / "train.json", out, max_steps=4, engine=engine, zero_stage=zero,
                  lr_schedule="cosine", warmup_ratio=0.0, lr=1e-2, preview_every=100)
    assert summary["finished"] and summary["skipped_steps"] == 1
    rows = metrics(out)
    assert [r["skipped_steps"] for r in rows] == ["0", "1", "1", "1"] and math.isfinite(float(rows[1]["loss"]))
    # the schedule went on over the skipped step
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * s / 4))
                                                            for s in range(4)], rel=1e-5)
    for k, v in seen[1][0].items():
        assert torch.equal(v, seen[2][0][k]), k  # step 2 changed nothing
    assert seen[2][1] == seen[1][1] and seen[3][1] != seen[2][1]  # nor Adam's step count
    assert any(not torch.equal(v, seen[3][0][k]) for k, v in seen[2][0].items())  # step 3 trained
    assert ckpt.complete_steps(out / "checkpoints") == [4] and _finite(out / "final" / "trainable.safetensors")


def test_nan_loss_mid_run_keeps_the_last_good_checkpoints(tiny_config, data, tmp_path, monkeypatch):
    from lm4lv_core.tasks.lm4lv import LM4LVTask

    loss, calls = LM4LVTask.loss, []

    def nan_from_4(self, model, batch):
        out = loss(self, model, batch)
        calls.append(1)
        if len(calls) >= 4:
            out["vision_loss"] = out["vision_loss"] * float("nan")
            out["loss"] = out["loss"] + out["vision_loss"]
        return out

    monkeypatch.setattr(LM4LVTask, "loss", nan_from_4)
    out = tmp_path / "run"
    with pytest.raises(Diverged, match=r"non-finite loss, vision_loss at steps 4-6 .*step-3 holds finite weights"):
        run(tiny_config, data / "train.json", out, max_steps=8, save_every=1, keep_checkpoints=2, preview_every=100)
    assert ckpt.complete_steps(out / "checkpoints") == [2, 3] and not (out / "final").exists()
    for step in (2, 3):
        assert _finite(out / "checkpoints" / f"step-{step}" / "trainable.safetensors")


def test_optimizer_skip_is_agreed_by_every_rank(tmp_path):
    """Only rank 1 sees a NaN gradient: both ranks refuse the step (a collective flag)."""
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_skip, args=(str(tmp_path), _free_port()), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0-refused", "rank1-refused"]


def _free_port() -> int:
    from lm4lv_core.engine.launch import free_port

    return free_port()


def _two_rank_skip(rank: int, out: str, port: int) -> None:
    import torch.distributed as tdist

    from lm4lv_core.engine.backends import GuardedAdamW

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1)
    p.grad = torch.tensor([1.0, float("nan") if rank == 1 else 1.0, 1.0])
    opt.step()
    if opt.overflow and torch.equal(p.detach(), torch.ones(3)) and not opt.state:
        Path(out, f"rank{rank}-refused").touch()
    p.grad = torch.ones(3)
    opt.step()
    assert not opt.overflow and not torch.equal(p.detach(), torch.ones(3))
    tdist.destroy_process_group()


@pytest.mark.slow
def test_two_workers_diverge_together_with_one_line(data, tmp_path):
    out = tmp_path / "run"
    code, err, log = lm4lv("train", "--data", data / "train.json", "--out", out, "--preset", "tiny", "--nproc", 2,
                           "--zero-stage", 2, "--max-steps", 6, "--micro-batch", 1, "--save-every", 1, *DIVERGE)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: training diverged"), log
    assert "Traceback" not in log
    assert ckpt.complete_steps(out / "checkpoints") == [1]


def test_generate_and_from_pretrained_refuse_nonfinite_weights(tiny_config, data, tmp_path):
    from lm4lv_core.model.lm4lv import LM4LV

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    LM4LV.from_config(tiny_config).save_pretrained(model_dir)
    weights = load_file(str(model_dir / "trainable.safetensors"))
    weights["task_tokens"][0, 0] = float("nan")
    save_file(weights, str(model_dir / "trainable.safetensors"))
    code, err, log = lm4lv("generate", "--run", model_dir, "--data", data / "test.json", "--out", tmp_path / "gen")
    assert code == 2 and len(err) == 1 and "non-finite weights" in err[0] and "task_tokens" in err[0], log
    assert not (tmp_path / "gen").exists()
    with pytest.raises(ConfigError, match="non-finite weights .* task_tokens"):
        LM4LV.from_pretrained(model_dir)


# ----------------------------------------------------------------------------- resume
def test_resume_with_changed_options_is_refused_naming_each(stopped, data, tmp_path):
    before = (stopped / "config.yaml").read_text()
    other = tmp_path / "other.json"
    samples = json.loads((data / "train.json").read_text())
    samples[0]["image"] = samples[1]["image"]  # same size, other content
    for s in samples:
        s["image"] = [str(data / p) for p in s["image"]]
    other.write_text(json.dumps(samples))
    resume = ["train", "--out", stopped, "--resume"]
    # one refusal names every option that differs (one command each: a command costs seconds)
    cases = [(["--no-lora"], ["--lora: checkpoint true, now false"]),
             (["--lr", "1e-3", "--num-task-tokens", "4", "--precision", "bf16", "--template", "llama2",
               "--vision-loss", "pixel_l1", "--vision-loss-weight", "2", "--lr-schedule", "cosine", "--resize", "crop",
               "--lora-r", "4"],
              ["--lr: checkpoint 0.01, now 0.001", "--num-task-tokens: checkpoint 10, now 4",
               "--precision: checkpoint fp32, now bf16", "--template: checkpoint default, now llama2",
               "--vision-loss: checkpoint feature_mse, now pixel_l1", "--vision-loss-weight: checkpoint 1.0, now 2.0",
               "--lr-schedule: checkpoint constant, now cosine", "--resize: checkpoint stretch, now crop",
               "--lora-r: checkpoint 8, now 4"]),
             (["--data", other], ["data (content of --data): checkpoint 4 samples, sha256 "])]
    for extra, named in cases:
        code, err, log = lm4lv(*resume, *extra)
        assert code == 2 and len(err) == 1 and "Traceback" not in log, log
        assert err[0].startswith(f"error: --resume from {stopped}/checkpoints/step-2: the run differs"), err[0]
        for n in named:
            assert n in err[0], (n, err[0])
    assert (stopped / "config.yaml").read_text() == before
    assert ckpt.complete_steps(stopped / "checkpoints") == [1, 2]


def test_each_worker_checks_the_checkpoint_it_loads(tiny_config, data, tmp_path, monkeypatch):
    from lm4lv_core.engine import run as run_module

    out = tmp_path / "run"
    run(tiny_config, data / "train.json", out, max_steps=2, stop_after=1, save_every=1, preview_every=100)
    monkeypatch.setattr(run_module, "check_resume", lambda job: None)  # as if the parent had not checked
    with pytest.raises(ConfigError, match=r"step-1: the run differs from the checkpoint in --micro-batch: "
                                          r"checkpoint 2, now 1; --seed: checkpoint 0, now 3"):
        run(tiny_config, data / "train.json", out, max_steps=2, resume=True, micro_batch=1, seed=3)


def test_extending_max_steps_continues_the_learning_rate(tiny_config, data, tmp_path):
    from lm4lv_core.engine.schedule import chained_lambda, lr_lambda, warmup_steps_for

    for schedule in ("reference", "cosine", "constant"):
        one = lr_lambda(schedule, 40, warmup_steps_for(schedule, 40, 0.1))
        assert [chained_lambda(schedule, [(0, 40)], 0.1)(s) for s in range(45)] == [one(s) for s in range(45)]
        f = chained_lambda(schedule, [(0, 40), (30, 100)], 0.1)
        assert [f(s) for s in range(31)] == [one(s) for s in range(31)]  # the same up to the checkpoint
        tail = [f(s) for s in range(30, 101)]
        assert all(b <= a + 1e-12 for a, b in zip(tail, tail[1:]))  # no jump up, decaying (or flat)
        assert tail[-1] == (one(30) if schedule == "constant" else 0.0)
    out = tmp_path / "run"
    run(tiny_config, data / "train.json", out, max_steps=12, stop_after=11, save_every=100, preview_every=100)
    run(tiny_config, data / "train.json", out, max_steps=16, resume=True, save_every=100, preview_every=100)
    from test_lr_schedule import reference_lrs

    lrs = [float(r["lr"]) for r in metrics(out)]
    assert len(lrs) == 16 and lrs[:12] == pytest.approx(reference_lrs(12, 0.1)[:12], rel=1e-5)  # as planned
    assert lrs[12:] == pytest.approx([lrs[11] * (1 - k / 5) for k in range(1, 5)], rel=1e-5)  # then linear to 0
    assert json.loads((out / "checkpoints" / "step-16" / "state.json").read_text())["schedule"] == [[0, 12], [11, 16]]
    saved = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="the checkpoint is at step 16, after this run's last step 10"):
        run(tiny_config, data / "train.json", out, max_steps=10, resume=True)
    assert (out / "config.yaml").read_text() == saved


# ----------------------------------------------------------------------------- outputs
def test_eval_never_overwrites_what_it_did_not_write(data, tmp_path):
    gt, pred = data / "hq", data / "lq"
    report = tmp_path / "scores.json"
    report.write_text("my notes\n")
    code, err, log = lm4lv("eval", "psnr", gt, pred, "--json", report)
    assert code == 2 and err == [f"error: --json {report}: exists; pass --overwrite to replace it, or choose "
                                 "another file"], log
    code, err, log = lm4lv("eval", "psnr", gt, pred, "--json", report, "--overwrite")
    assert code == 2 and "not written by lm4lv eval" in err[0], log
    assert report.read_text() == "my notes\n"
    gt_image = (gt / "0.png").read_bytes()
    code, err, log = lm4lv("eval", "psnr", gt, pred, "--grid", gt / "0.png", "--overwrite")
    assert code == 2 and "not written by lm4lv eval" in err[0] and (gt / "0.png").read_bytes() == gt_image, log
    outs = ["--json", tmp_path / "s.json", "--csv", tmp_path / "s.csv", "--grid", tmp_path / "g.png"]
    assert lm4lv("eval", "psnr", gt, pred, *outs)[0] == 0
    code, err, log = lm4lv("eval", "psnr", gt, pred, *outs)
    assert code == 2 and "exists; pass --overwrite" in err[0], log
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "s.json", tmp_path / "s.csv", tmp_path / "g.png")}
    code, err, log = lm4lv("eval", "psnr", gt, pred, *outs, "--overwrite")
    assert code == 0, log
    assert all(p.stat().st_mtime_ns != t for p, t in stamps.items())


def test_generate_refuses_an_out_of_other_data_or_files_it_did_not_write(stopped, data, tmp_path):
    out = tmp_path / "gen"
    base = ["generate", "--run", stopped, "--out", out, "--max-new-tokens", 2]
    code, err, log = lm4lv(*base, "--data", data / "test.json")
    assert code == 0 and "note: " in log and "newest checkpoint" in log, log
    images = {p: p.read_bytes() for p in (out / "images").glob("*.png")}
    code, err, log = lm4lv(*base, "--data", data / "train.json")
    assert code == 2 and len(err) == 1 and "holds outputs of another data" in err[0], log
    assert {p: p.read_bytes() for p in (out / "images").glob("*.png")} == images
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "0.png").write_bytes(b"my image")
    code, err, log = lm4lv("generate", "--run", stopped, "--out", mine, "--data", data / "test.json", "--overwrite")
    assert code == 2 and "not written by lm4lv generate" in err[0], log
    assert (mine / "images" / "0.png").read_bytes() == b"my image"


def test_recon_mae_overwrite_replaces_only_its_own_reconstructions(data, tmp_path):
    out = tmp_path / "recon"
    out.mkdir()
    (out / "0.png").write_bytes(b"my picture")
    (out / "notes.txt").write_text("mine")
    recon = ["recon-mae", data / "hq", "--out", out, "--preset", "tiny"]
    code, err, log = lm4lv(*recon, "--overwrite")
    assert code == 2 and err == [f"error: --out {out}: 0.png was not written by lm4lv recon; --overwrite "
                                 "replaces only lm4lv's outputs: choose another --out"], log
    assert (out / "0.png").read_bytes() == b"my picture"
    (out / "0.png").unlink()
    assert lm4lv(*recon, "--overwrite")[0] == 0  # beside the user's other files
    assert lm4lv(*recon)[0] == 2  # not empty
    assert lm4lv(*recon, "--overwrite")[0] == 0  # its own reconstructions
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.glob("*.png"))) == 4


def test_generate_from_a_checkpoint_equals_the_final_model(data, tmp_path):
    """A LoRA run of 2 steps: its checkpoint step-2 and final/ generate the same images."""
    out = tmp_path / "run"
    code, err, log = lm4lv("train", "--data", data / "train.json", "--out", out, "--preset", "tiny", "--max-steps", 2,
                           "--micro-batch", 2, "--save-every", 2, "--lora", "--lr-schedule", "constant", "--lr", "1e-2")
    assert code == 0, log
    for name, run_arg in (("final", out), ("ckpt", out / "checkpoints" / "step-2")):
        code, err, log = lm4lv("generate", "--run", run_arg, "--data", data / "test.json", "--out", tmp_path / name,
                               "--max-new-tokens", 2)
        assert code == 0 and "note:" not in log, log
    for i in range(4):
        a = (tmp_path / "final" / "images" / f"{i}.png").read_bytes()
        assert a == (tmp_path / "ckpt" / "images" / f"{i}.png").read_bytes(), i


# ----------------------------------------------------------------------------- errors in workers
def test_unreadable_image_in_a_loader_process_is_one_line(data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    _corrupt_idat(data / "lq" / "2.png", root / "lq" / "2.png")
    code, err, log = lm4lv("train", "--data", root / "train.json", "--out", tmp_path / "run", "--preset", "tiny",
                           "--max-steps", 4, "--micro-batch", 1, "--num-workers", 2)
    assert code == 2 and "Traceback" not in log and "DataLoader" not in log, log
    assert len(err) == 1 and err[0].startswith(f"error: sample 2: {root / 'lq' / '2.png'}: cannot read image"), err


@pytest.mark.slow
def test_a_bad_input_in_one_of_two_generate_workers_is_one_line(stopped, data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    _corrupt_idat(data / "lq" / "1.png", root / "lq" / "1.png")
    code, err, log = lm4lv("generate", "--run", stopped, "--data", root / "test.json", "--out", tmp_path / "gen",
                           "--nproc", 2, "--batch-size", 1, "--max-new-tokens", 2)
    assert code == 2 and "Traceback" not in log and "Connection closed" not in log, log
    assert err == [f"error: sample 1: {root / 'lq' / '1.png'}: cannot read image (unrecognized data stream "
                   "contents when reading image file)"], log


# ----------------------------------------------------------------------------- docs/real-use.md
def _readme_commands() -> dict[str, list[list[str]]]:
    """The make-data, generate and eval commands of the docs' "Real use" recipe, as written (in order)."""
    text = (ROOT / "docs" / "real-use.md").read_text(encoding="utf-8")
    block = text[text.index("# Real use"):text.index("- **Several nodes**")]
    lines = block.replace("\\\n", " ").splitlines()
    cmds = {}
    for line in lines:
        words = shlex.split(line.strip()) if line.strip().startswith("lm4lv ") else []
        if words and words[1] in ("make-data", "generate", "eval"):
            cmds.setdefault(words[1], []).append(words[1:])
    return cmds


def test_the_readme_dataset_generate_and_eval_commands_work_as_written(tmp_path):
    """make-data, generate and eval as docs/real-use.md writes them; only what needs a GPU or real
    weights changes: the image size and workers (make-data), the trained model, --nproc and
    --precision (generate)."""
    cmds = _readme_commands()
    assert set(cmds) == {"make-data", "generate", "eval"}, cmds
    write_pairs(tmp_path / "photos", n=5, size=48)
    (tmp_path / "data" / "clean").mkdir(parents=True)
    (tmp_path / "data" / "clean-test").mkdir()
    for i in range(5):
        shutil.copy(tmp_path / "photos" / "hq" / f"{i}.png", tmp_path / "data" / ("clean-test" if i > 2 else "clean"))
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.sources.presets import preset_config

    torch.manual_seed(0)
    LM4LV.from_config(preset_config("tiny", restore_prompt="<image> <task>")).save_pretrained(
        tmp_path / "runs" / "denoise" / "final")

    def local(words: list[str], drop: dict[str, int], swap: dict[str, str]) -> list[str]:
        out, skip = [], 0
        for w in words:
            if skip:
                skip -= 1
                continue
            if w in drop:
                skip = drop[w]
                continue
            out.append(swap.get(w, str(tmp_path) + w if w.startswith("/data/") else w))
        return out

    make = local(cmds["make-data"][0], {"--workers": 1}, {"224": "32"})
    assert lm4lv(*make, cwd=tmp_path)[0] == 0
    data_gen, input_gen = cmds["generate"]  # a data file, then a folder of photos (--input)
    gen = local(data_gen, {"--nproc": 1, "--precision": 1}, {})
    code, err, log = lm4lv(*gen, "--max-new-tokens", 2, cwd=tmp_path)
    assert code == 0, log
    code, err, log = lm4lv(*local(input_gen, {"--nproc": 1, "--precision": 1}, {}), cwd=tmp_path)
    assert code == 0, log
    assert sorted(p.relative_to(tmp_path / "restored").as_posix() for p in (tmp_path / "restored").rglob("*.png")) \
        == sorted(p.relative_to(tmp_path / "photos").as_posix() for p in (tmp_path / "photos").rglob("*.png"))
    code, err, log = lm4lv(*local(cmds["eval"][0], {}, {}), cwd=tmp_path)
    assert code == 0, log
    assert "degraded" in log and "lm4lv" in log and "without a" not in log
    assert json.loads((tmp_path / "out" / "denoise" / "scores.json").read_text())["predictions"][1]["count"] == 2
    assert (tmp_path / "out" / "denoise" / "grid.png").is_file()
