"""Long runs: graceful stop, verified checkpoints, leftovers of killed processes, full disks and
unwritable folders, one run per folder."""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_pairs
from lm4lv_core.engine import checkpoint as ckpt
from lm4lv_core.util import signals
from lm4lv_core.errors import ConfigError, Interrupted, OutputError
from lm4lv_core.util.fsutil import TEMP_PREFIX, torch_save, write_failure
from lm4lv_core.util.runlock import FolderBusy, hold
from test_generate_cli import lm4lv
from test_train import assert_close, final_weights, metrics, run

ROOT = Path(__file__).resolve().parent.parent
KW = dict(max_steps=6, save_every=2, preview_every=100, keep_checkpoints=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("reliability") / "data")


@pytest.fixture(scope="module")
def straight(tiny_config, data, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run (DeepSpeed engine, one worker)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run(tiny_config, data, out, **KW)
    return out


@pytest.fixture(scope="module")
def gen(tmp_path_factory) -> Path:
    """A saved tiny model and a generation file of 4 restoration samples."""
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.sources.presets import preset_config

    root = tmp_path_factory.mktemp("gen")
    write_pairs(root, n=4)
    test = [{"image": [f"lq/{i}.png"], "conversations": [{"from": "human", "value": "<image> <task>"},
                                                          {"from": "gpt", "value": ""}]} for i in range(4)]
    (root / "test.json").write_text(json.dumps(test))
    torch.manual_seed(0)
    LM4LV.from_config(preset_config("tiny")).save_pretrained(root / "run" / "final")
    return root


def _gen_args(gen: Path, out: Path) -> list:
    return ["generate", "--run", gen / "run", "--data", gen / "test.json", "--out", out, "--batch-size", "2",
            "--max-new-tokens", "4"]


def _temps(root: Path) -> list[Path]:
    """Temporary files/folders and run locks under ``root``."""
    return [p for p in root.rglob("*") if p.name.startswith((TEMP_PREFIX, ".lm4lv-lock"))]


def _errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------- graceful stop
def test_first_signal_requests_a_stop_and_the_second_aborts():
    before = signal.getsignal(signal.SIGTERM)
    calls = []
    with signals.handling(on_stop=lambda: calls.append("stop"), on_abort=lambda: calls.append("abort"),
                          announce=False):
        assert not signals.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert signals.requested() and calls == ["stop"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert calls == ["stop", "abort"]
    assert not signals.requested() and signal.getsignal(signal.SIGTERM) is before


def test_sigterm_finishes_the_step_saves_it_and_resume_is_exact(tiny_config, data, tmp_path, monkeypatch):
    from lm4lv_core.engine.loop import Trainer

    kw = dict(KW, engine="accelerate")
    run(tiny_config, data, tmp_path / "straight", **kw)
    log = Trainer._log

    def log_then_signal(self, row, ids, progress):
        log(self, row, ids, progress)
        if row["step"] == 2:  # arrives while step 3 runs: step 3 is finished and saved
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_log", log_then_signal)
    out = tmp_path / "run"
    with pytest.raises(Interrupted, match=r"^interrupted at step 3; continue with --resume$"):
        run(tiny_config, data, out, **kw)
    monkeypatch.undo()
    assert ckpt.complete_steps(out / "checkpoints") == [2, 3] and not (out / "final").exists()
    assert [r["step"] for r in metrics(out)] == ["1", "2", "3"]
    run(tiny_config, data, out, resume=True, **kw)
    assert_close(final_weights(out), final_weights(tmp_path / "straight"), 1e-6)


@pytest.mark.slow
def test_sigterm_to_two_worker_training_and_a_concurrent_run(tiny_config, data, tmp_path, monkeypatch, capsys):
    kw = dict(max_steps=20, save_every=100, preview_every=100, micro_batch=1, nproc=2, keep_checkpoints=0)
    straight = tmp_path / "straight"
    run(tiny_config, data, straight, **kw)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lm4lv_cli.app", "train", "--preset", "tiny", "--data", str(data), "--out", str(out),
           "--max-steps", "20", "--save-every", "100", "--preview-every", "100", "--micro-batch", "1",
           "--nproc", "2", "--keep-checkpoints", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.csv").is_file() and len((out / "metrics.csv").read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        # a second run into the folder this one trains in fails at once, naming it
        code, log = lm4lv(monkeypatch, capsys, "train", "--preset", "tiny", "--data", data, "--out", out, "--resume")
        assert code == 2 and f"pid {proc.pid} on host {socket.gethostname()}" in log, log
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == signals.EXIT_INTERRUPTED, err
    m = re.fullmatch(r"interrupted at step (\d+); continue with --resume", err.strip().splitlines()[-1])
    assert m, err
    step = int(m.group(1))
    assert 1 <= step < 20
    assert ckpt.complete_steps(out / "checkpoints") == [step]
    assert ckpt.newest_intact(out / "checkpoints") == (ckpt.step_dir(out / "checkpoints", step), [])
    assert ckpt.read_state(ckpt.step_dir(out / "checkpoints", step))["step"] == step
    assert not (out / "final").exists() and metrics(out)[-1]["step"] == str(step)
    run(tiny_config, data, out, resume=True, **kw)
    assert_close(final_weights(out), final_weights(straight), 1e-6)
    assert [r["step"] for r in metrics(out)] == [str(i) for i in range(1, 21)]
    assert not _temps(out)


def test_generate_stops_after_the_current_batch_and_keeps_it(gen, tmp_path, monkeypatch, capsys):
    from lm4lv_core.jobs import generate as generate_job

    append = generate_job.append_line

    def append_then_signal(f, rec):
        append(f, rec)
        if rec["index"] == 0:  # during the first batch (samples 0 and 1)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(generate_job, "append_line", append_then_signal)
    out = tmp_path / "out"
    code, log = lm4lv(monkeypatch, capsys, *_gen_args(gen, out))
    assert code == signals.EXIT_INTERRUPTED and "interrupted: 2 of 4 samples finished and kept" in log, log
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in results] == [0, 1]
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["0.png", "1.png"]
    monkeypatch.setattr(generate_job, "append_line", append)
    code, log = lm4lv(monkeypatch, capsys, *_gen_args(gen, out))
    assert code == 0 and "(2 generated, 2 already done)" in log, log


# ----------------------------------------------------------------------------- verified checkpoints
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(tiny_config, data, straight, tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny_config, data, out, stop_after=4, **KW)
    root = out / "checkpoints"
    assert ckpt.complete_steps(root) == [2, 4]
    rng = root / "step-4" / "rng-rank0.safetensors"
    rng.write_bytes(rng.read_bytes()[:-40])  # truncated
    # what killed runs leave behind: removed by the next run
    stale = [root / f"{TEMP_PREFIX}step-6", out / f"{TEMP_PREFIX}metrics.csv.x1y2.tmp"]
    stale[0].mkdir()
    stale[1].write_text("step")

    # no intact checkpoint at all: one line naming each, and the run is not started over
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    weights = broken / "checkpoints" / "step-2" / "trainable.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # same size, other content
    weights.write_bytes(bytes(raw))
    with pytest.raises(ConfigError) as e:
        run(tiny_config, data, broken, resume=True, **KW)
    msg = str(e.value)
    assert "no intact checkpoint" in msg and "\n" not in msg
    assert "step-4: rng-rank0.safetensors has" in msg and "step-2: trainable.safetensors does not match" in msg
    assert ckpt.step_dirs(broken / "checkpoints") == [2, 4]

    capsys.readouterr()
    run(tiny_config, data, out, resume=True, **KW)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step-4" in warnings[0] and "rng-rank0.safetensors" in warnings[0], err
    assert f"resumed from {root / 'step-2'}" in err
    assert_close(final_weights(out), final_weights(straight), 1e-6)
    assert [r["step"] for r in metrics(out)] == ["1", "2", "3", "4", "5", "6"]
    assert ckpt.newest_intact(root) == (root / "step-6", []) and ckpt.complete_steps(root) == [2, 4, 6]
    assert not any(p.exists() for p in stale)


def test_pruning_never_removes_the_newest_intact_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"

    def save(step: int, keep: int) -> None:
        ckpt.begin(root, step)
        (ckpt.tmp_dir(root, step) / "w.bin").write_bytes(bytes([step]) * 100)
        ckpt.commit(root, step, {"step": step}, keep=keep)

    for s in (2, 4, 6):
        save(s, keep=0)
    (root / "step-6" / "w.bin").write_bytes(b"short")  # damaged after it was written
    save(5, keep=1)  # e.g. a run resumed from step 4 saves step 5
    assert ckpt.step_dirs(root) == [5, 6]  # the damaged step 6 does not count as kept
    assert ckpt.newest_intact(root)[0] == root / "step-5"
    save(7, keep=2)
    assert ckpt.step_dirs(root) == [5, 6, 7] and not _temps(root)
    data = json.loads((root / "step-7" / "checksums.json").read_text())
    assert set(data["files"]) == {"w.bin", "state.json"} and data["files"]["w.bin"]["size"] == 100


# ----------------------------------------------------------------------------- full disk, unwritable folders
class _FullDisk:
    """A file on a full disk: opening works, every write fails with ENOSPC."""

    def __init__(self, f) -> None:
        self.f, self.name = f, f.name

    def write(self, b) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        pass

    @property
    def closed(self) -> bool:
        return self.f.closed

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def test_full_disk_while_saving_a_checkpoint(data, straight, tmp_path, monkeypatch, capsys):
    from lm4lv_core.util import fsutil

    def open_on_full_disk(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return _FullDisk(f) if "w" in mode and f"{TEMP_PREFIX}step-4" in str(path) else f

    monkeypatch.setattr(fsutil, "open", open_on_full_disk, raising=False)  # DeepSpeed's state files
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", data, "--out", out, "--max-steps", "6", "--save-every", "2",
            "--micro-batch", "2", "--preview-every", "100", "--keep-checkpoints", "0"]
    code, log = lm4lv(monkeypatch, capsys, *args)
    errors = _errors(log)
    assert code == 2 and len(errors) == 1, log
    assert errors[0] == (f"error: cannot write checkpoint {out.resolve() / 'checkpoints' / 'step-4'}: "
                         "No space left on device; the earlier checkpoints are intact")
    assert ckpt.step_dirs(out / "checkpoints") == [2] and not _temps(out)
    assert ckpt.newest_intact(out / "checkpoints") == (out.resolve() / "checkpoints" / "step-2", [])
    monkeypatch.undo()
    code, log = lm4lv(monkeypatch, capsys, *args, "--resume")
    assert code == 0, log
    assert_close(final_weights(out), final_weights(straight), 1e-6)


def _mount_tmpfs(d: Path, options: str) -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)],
                                                capture_output=True).returncode == 0


@pytest.fixture
def full_dir(tmp_path):
    """A folder on a 64 KiB file system (a real ENOSPC); only where root may mount a tmpfs."""
    d = tmp_path / "small"
    d.mkdir()
    if not _mount_tmpfs(d, "size=64k"):
        pytest.skip("needs root allowed to mount a tmpfs")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_failed_writes_keep_their_cause(full_dir):
    from PIL import Image
    from safetensors.torch import save_file

    from lm4lv_core.image.io import save_png

    big = torch.rand(64, 1024)
    noise = (torch.rand(256, 256, 3) * 255).byte().numpy()
    for write in (lambda: save_file({"a": big}, str(full_dir / "a.safetensors")),  # message text only
                  lambda: Image.fromarray(noise).save(full_dir / "b.png", format="PNG")):
        with pytest.raises(Exception) as e:
            write()
        assert write_failure(e.value) == os.strerror(errno.ENOSPC), repr(e.value)
    (full_dir / "b.png").unlink(missing_ok=True)  # Pillow's own half-written file
    with pytest.raises(OutputError, match=f"^cannot write {full_dir / 'c.pt'}: {os.strerror(errno.ENOSPC)}$"):
        torch_save({"a": big}, full_dir / "c.pt")  # torch itself only says "unexpected pos"
    (full_dir / "c.pt").unlink()
    with pytest.raises(OutputError, match=f"^cannot write {full_dir / 'd.png'}: {os.strerror(errno.ENOSPC)}$"):
        save_png(noise, full_dir / "d.png")
    assert sorted(p.name for p in full_dir.iterdir()) == []  # no temporary file left behind
    assert write_failure(RuntimeError("unexpected pos 704 vs 598")) is None


def test_make_data_on_a_full_disk_leaves_nothing(full_dir, data, monkeypatch, capsys):
    code, log = lm4lv(monkeypatch, capsys, "make-data", data.parent / "hq", "--out", full_dir / "ds", "-d", "noise")
    errors = _errors(log)
    assert code == 2 and errors == [f"error: cannot write the dataset {full_dir / 'ds'}: "
                                    f"{os.strerror(errno.ENOSPC)}"], log
    assert not list(full_dir.iterdir())


@pytest.fixture
def readonly_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if not _mount_tmpfs(d, "ro,size=1m"):
        pytest.skip("needs a non-root user, or root allowed to mount a read-only tmpfs")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_unwritable_output_folder_fails_before_any_work(readonly_dir, data, gen, monkeypatch, capsys):
    from lm4lv_core.engine import launch

    def no_work(*args, **kwargs):
        raise AssertionError("workers started")

    monkeypatch.setattr(launch, "run_job", no_work)
    for args in (["train", "--preset", "tiny", "--data", data, "--out", readonly_dir / "run"],
                 _gen_args(gen, readonly_dir / "gen"),
                 ["make-data", data.parent / "hq", "--out", readonly_dir / "dataset", "-d", "noise"]):
        code, log = lm4lv(monkeypatch, capsys, *args)
        errors = _errors(log)
        assert code == 2 and len(errors) == 1 and f"--out {readonly_dir}/" in errors[0], log
        assert "cannot write there" in errors[0]
    assert not list(readonly_dir.iterdir())


# ----------------------------------------------------------------------------- leftovers
def test_killed_generate_writer_leaves_nothing_after_the_next_run(gen, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, log = lm4lv(monkeypatch, capsys, *_gen_args(gen, out))
    assert code == 0, log
    # a worker killed while writing sample 1's image: a temporary file stays, the image is missing
    (out / "images" / "1.png").unlink()
    killed = ("import os, signal, sys\nfrom lm4lv_core.util.fsutil import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'\\x89PNG half')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", killed, str(out / "images" / "1.png")], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    left = _temps(out)
    assert len(left) == 1 and left[0].parent == out / "images" and left[0].name.startswith(f"{TEMP_PREFIX}1.png.")
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["0.png", "2.png", "3.png"]
    code, log = lm4lv(monkeypatch, capsys, *_gen_args(gen, out))
    assert code == 0 and "(1 generated, 3 already done)" in log, log
    assert not _temps(out)  # no temporary file, no lock
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0.png", "1.png", "2.png", "3.png"]


def test_make_data_removes_what_a_killed_run_left(data, tmp_path, monkeypatch, capsys):
    partial = tmp_path / f"{TEMP_PREFIX}ds.partial.x1y2"  # a killed build of ds
    (partial / "hq").mkdir(parents=True)
    (partial / "hq" / "0.png").write_bytes(b"half")
    lock = tmp_path / ".lm4lv-lock-ds"
    lock.write_text('{"pid": 1, "host": "gone"}')  # its lock file; nobody holds it
    other = tmp_path / f"{TEMP_PREFIX}other.partial.z"  # a build of another dataset: left alone
    other.mkdir()
    code, log = lm4lv(monkeypatch, capsys, "make-data", data.parent / "hq", "--out", tmp_path / "ds",
                      "-d", "noise", "--size", "32")
    assert code == 0, log
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ds", other.name])
    assert (tmp_path / "ds" / "manifest.json").is_file() and not _temps(tmp_path / "ds")


# ----------------------------------------------------------------------------- one run per folder
HOLDER = """
import sys, time
from lm4lv_core.util.runlock import hold
with hold(sys.argv[1], "train"), hold(sys.argv[2], "make-data", beside=True):
    print("ready", flush=True)
    time.sleep(600)
"""


def test_a_busy_folder_is_refused_and_a_killed_holder_frees_it(tiny_config, data, gen, tmp_path, monkeypatch,
                                                                capsys):
    busy, dataset = tmp_path / "busy", tmp_path / "dataset"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(busy), str(dataset)], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "ready"
        who = f"pid {holder.pid} on host {socket.gethostname()}"
        with pytest.raises(FolderBusy, match=who):
            run(tiny_config, data, busy, **KW)
        for args in (_gen_args(gen, busy),
                     ["ft-mae", data.parent / "hq", "--out", busy, "--preset", "tiny", "--lpips-weight", "0",
                      "--max-steps", "1"],
                     ["make-data", data.parent / "hq", "--out", dataset, "-d", "noise"]):
            code, log = lm4lv(monkeypatch, capsys, *args)
            errors = _errors(log)
            assert code == 2 and len(errors) == 1 and who in errors[0] and "another lm4lv" in errors[0], log
    finally:
        holder.kill()
        holder.wait()
    assert (busy / ".lm4lv-lock").exists()  # left by the killed holder, but not held any more
    with hold(busy, "train"), hold(dataset, "make-data", beside=True):
        assert json.loads((busy / ".lm4lv-lock").read_text())["pid"] == os.getpid()
    assert not (busy / ".lm4lv-lock").exists() and not (tmp_path / ".lm4lv-lock-dataset").exists()
