"""Several nodes the way clusters run them: one ``lm4lv`` command per node meeting at node 0.

Two "nodes" on this machine: two ``lm4lv train`` processes with ``--num-nodes 2 --node-rank 0/1
--master-addr 127.0.0.1`` (or SLURM's variables), one gloo worker each, sharing the run folder.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import write_pairs
from lm4lv_core.engine import checkpoint as ckpt
from lm4lv_core.engine.cluster import Workers, expand_nodelist, slurm_step
from lm4lv_core.engine.launch import launcher_command, node_file
from lm4lv_core.errors import ConfigError
from lm4lv_core.util import nodes
from lm4lv_core.util.fsutil import user_entries
from lm4lv_core.util.runlock import FolderBusy, hold
from test_train import assert_close, final_weights, metrics

LM4LV = Path(sys.executable).with_name("lm4lv")  # the installed console script, as on a cluster
STEPS = ["--preset", "tiny", "--micro-batch", "2", "--max-steps", "3", "--lr", "1e-2", "--save-every", "2",
         "--preview-every", "3"]
LONG = ["--preset", "tiny", "--micro-batch", "1", "--max-steps", "60", "--save-every", "100",
        "--preview-every", "100", "--keep-checkpoints", "0"]


# ----------------------------------------------------------------------------- SLURM's environment
def test_compressed_nodelists_expand_like_slurm():
    assert expand_nodelist("gpu[01-03,07]") == ["gpu01", "gpu02", "gpu03", "gpu07"]
    assert expand_nodelist("a[1-2],b3") == ["a1", "a2", "b3"]
    assert expand_nodelist("node[008-011]") == ["node008", "node009", "node010", "node011"]
    assert expand_nodelist("n[9-10]") == ["n9", "n10"]
    assert expand_nodelist("rack[1-2]-n[1-2],login") == ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2", "login"]
    assert expand_nodelist("single") == ["single"]
    for bad in ("gpu[01-03", "gpu[3-1]", "a,,b", "gpu[x]"):
        with pytest.raises(ConfigError, match="SLURM node list"):
            expand_nodelist(bad)


SRUN = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NNODES": "4", "SLURM_NODEID": "2",
        "SLURM_JOB_NODELIST": "gpu[01-03,07]", "SLURM_NTASKS": "4"}


def test_srun_step_sets_nodes_rank_address_and_port_flags_win():
    w = Workers(nproc=4).resolve(SRUN)
    assert (w.num_nodes, w.node_rank, w.master_addr, w.master_port) == (4, 2, "gpu01", 24242)
    assert w.per_node and w.world_size == 16 and w.launcher_name() == "torchrun"
    assert w.detected == ("SLURM job 4242: node 2 of 4 (gpu03; nodes gpu[01-03,07]), meeting at gpu01:24242")
    # the step's own variables come first; an explicit option wins over the environment
    step = {**SRUN, "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "a[1-2]", "SLURM_NODEID": "1",
            "SLURM_STEP_NUM_TASKS": "2"}
    w = Workers(engine="accelerate", master_addr="10.0.0.9", master_port=1234).resolve(step)
    assert (w.num_nodes, w.node_rank, w.master_addr, w.master_port) == (2, 1, "10.0.0.9", 1234)
    assert w.launcher_name() == "accelerate" and "--master-addr, --master-port as given" in w.detected
    assert Workers(num_nodes=1).resolve(SRUN).num_nodes == 1 and not Workers(num_nodes=1).resolve(SRUN).per_node
    # a batch script (no step) runs on its node alone and says so; --hostfile is DeepSpeed's own launch
    batch = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    w = Workers().resolve(batch)
    assert not w.per_node and w.in_process and "not started by srun" in w.detected
    assert slurm_step(batch) is None and slurm_step({}) is None
    assert not Workers(hostfile="hosts", num_nodes=2).resolve(SRUN).per_node


def test_node_setting_mistakes_are_one_line_errors():
    with pytest.raises(ConfigError, match="one task per node"):
        Workers().resolve({**SRUN, "SLURM_NTASKS": "16"})
    with pytest.raises(ConfigError, match="names 4 host"):
        Workers().resolve({**SRUN, "SLURM_NNODES": "3"})
    with pytest.raises(ConfigError, match=r"--num-nodes 2: give each node its --node-rank \(0 to 1\)"):
        Workers(num_nodes=2).resolve({})
    with pytest.raises(ConfigError, match="--node-rank must be below --num-nodes 2"):
        Workers(num_nodes=2, node_rank=2, master_addr="h").resolve({})
    with pytest.raises(ConfigError, match="--launcher torchrun"):
        Workers(num_nodes=2, node_rank=0, master_addr="h", launcher="deepspeed").resolve({})
    with pytest.raises(ConfigError, match="--hostfile"):
        Workers(hostfile="hosts", node_rank=1)


def test_launcher_commands_for_one_launcher_per_node(tmp_path):
    job = tmp_path / "train-job.node1.yaml"
    cmd = launcher_command("train", job, nproc=4, launcher="torchrun", num_nodes=2, node_rank=1,
                           master_addr="gpu01", master_port=24242, node_timeout=90)
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--rdzv_backend") + 1] == "c10d"
    assert cmd[cmd.index("--rdzv_endpoint") + 1] == "gpu01:24242"
    assert cmd[cmd.index("--rdzv_conf") + 1] == "is_host=0,join_timeout=90,read_timeout=90"
    cmd = launcher_command("train", job, nproc=4, launcher="accelerate", num_nodes=2, node_rank=1,
                           master_addr="gpu01", master_port=24242)
    assert [cmd[cmd.index(k) + 1] for k in ("--num_processes", "--num_machines", "--machine_rank",
                                            "--main_process_ip", "--main_process_port")] == ["8", "2", "1", "gpu01", "24242"]
    assert node_file(tmp_path / "train.log", 0) == tmp_path / "train.log"
    assert node_file(tmp_path / "train.log", 3) == tmp_path / "train.node3.log"


def test_the_nodes_of_one_run_share_its_folder_and_a_second_run_is_refused(tmp_path):
    out = tmp_path / "run"
    with hold(out, "train", node=1, shared=(".lm4lv",)):  # node 1 may come first
        (out / "train.node1.log").write_text("x")
        assert user_entries(out) == []  # node 0 still sees an empty run folder
        with hold(out, "train", node=0, shared=(".lm4lv",)):
            with pytest.raises(FolderBusy, match=r"train \(node 1\)"):
                with hold(out, "train", node=1):
                    pass
            with pytest.raises(FolderBusy):  # a single-node run into the same folder
                with hold(out, "train"):
                    pass


def test_node_records_tell_a_live_node_from_an_old_record(tmp_path):
    old = nodes.Presence(tmp_path, 1, interval=0.1)
    old.start()
    old.finish("error", "an earlier run's failure")
    watch = nodes.Watch(tmp_path, 0, 2, interval=0.1)
    assert watch.problem(timeout=5) is None  # an earlier run's record is not this run's node 1
    node, why = watch.problem(timeout=0)
    assert node == 1 and "did not start" in why and "earlier run's failure" in why
    peer = nodes.Presence(tmp_path, 1, interval=0.1)
    peer.start()
    time.sleep(0.3)
    assert watch.problem(timeout=5) is None
    peer.finish("error", "out of memory")
    assert watch.problem(timeout=5) == (1, f"node 1 (host {socket.gethostname()}, pid {os.getpid()}) stopped: "
                                           "error: out of memory")
    silent = nodes.Presence(tmp_path, 1, interval=0.1)
    silent.start()
    silent._stop.set()  # its heartbeat stops, as when the node dies
    time.sleep(0.3)
    assert watch.problem(timeout=5) is None
    [(node, why)] = watch.explain(timeout=5)
    assert node == 1 and why.startswith("lost node 1")
    follower = nodes.Presence(tmp_path, 1, interval=0.1)  # a node that stopped because of this one
    follower.start()
    time.sleep(0.3)
    follower.finish("error", "node 0 stopped: ...", because=0)
    assert watch.explain(timeout=5) == []


def test_node_mistakes_on_the_command_line_stop_before_any_work(tmp_path):
    data = write_pairs(tmp_path / "data", n=2)
    runs = {"flags": (["--num-nodes", "2"], {}),
            "srun": ([], {**SRUN, "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[1-2]",
                          "SLURM_NTASKS": "8"})}
    for name, (args, slurm) in runs.items():
        out = tmp_path / name
        r = subprocess.run([str(LM4LV), "train", "--preset", "tiny", "--data", str(data), "--out", str(out), *args],
                           cwd=tmp_path, env=_env(**slurm), capture_output=True, text=True, timeout=300)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1, r.stderr
        assert ("--num-nodes 2: give each node its --node-rank" if name == "flags" else
                "srun started 8 tasks on 2 node(s)") in errors[0]
        assert not out.exists()


# ----------------------------------------------------------------------------- two nodes on this machine
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _port() -> int:
    """A free port that is also SLURM's port of some job id (20000-29999)."""
    for port in range(20000 + os.getpid() % 9000, 30000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def _start(args: list, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([str(LM4LV), "train", *map(str, args)], cwd=cwd, env=env or _env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def two_nodes(args: list, cwd: Path, timeout: float = 400, envs=None) -> list[tuple[int, str]]:
    """Run node 1 and node 0 (``--node-rank`` appended unless ``envs`` gives each its SLURM
    variables); their exit codes and stderr."""
    procs = []
    for r in (1, 0):
        procs.append(_start(args + ([] if envs else ["--node-rank", r]), cwd, envs[r] if envs else None))
    out = []
    for p in reversed(procs):
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def _node_args(out: Path, data: Path, port: int, *extra) -> list:
    return ["--data", data, "--out", out, "--num-nodes", "2", "--master-addr", "127.0.0.1",
            "--master-port", port, *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("multinode") / "data", n=6)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The same job on one node with two workers."""
    out = tmp_path_factory.mktemp("ref") / "run"
    p = _start(["--data", data, "--out", out, *STEPS, "--nproc", "2", "--launcher", "torchrun"], out.parent)
    _, err = p.communicate(timeout=400)
    assert p.returncode == 0, err
    return out


def _losses(run: Path) -> list[float]:
    return [float(r[k]) for r in metrics(run) for k in ("loss", "text_loss", "vision_loss")]


@pytest.mark.slow
def test_torchrun_two_nodes_match_one_node_checkpoint_once_and_resume(data, reference, tmp_path):
    out, port = tmp_path / "run", _port()
    res = two_nodes(_node_args(out, data, port, *STEPS, "--launcher", "torchrun", "--stop-after", "2"), tmp_path)
    assert [c for c, _ in res] == [0, 0], res
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 2 and info["process_group"] == "gloo"
    assert ckpt.complete_steps(out / "checkpoints") == [2]
    step2 = ckpt.step_dir(out / "checkpoints", 2)
    assert ckpt.newest_intact(out / "checkpoints") == (step2, [])
    assert sorted(p.name for p in step2.glob("rng-rank*")) == ["rng-rank0.safetensors", "rng-rank1.safetensors"]
    assert [r["step"] for r in metrics(out)] == ["1", "2"]  # written once, by one node
    assert (out / "config.yaml").is_file() and not (out / "final").exists()
    assert "this is node 1" in (out / "train.node1.log").read_text() and "this is node 0" in (out / "train.log").read_text()
    assert not list(out.rglob(".lm4lv-tmp-*")) and not list(out.glob(".lm4lv-lock*"))
    # resume on the same number of nodes continues exactly
    res = two_nodes(_node_args(out, data, port, *STEPS, "--launcher", "torchrun", "--resume"), tmp_path)
    assert [c for c, _ in res] == [0, 0], res
    assert [r["step"] for r in metrics(out)] == ["1", "2", "3"]
    assert _losses(out) == pytest.approx(_losses(reference), rel=1e-5)
    assert_close(final_weights(out), final_weights(reference), 1e-6)


@pytest.mark.slow
def test_accelerate_under_srun_needs_no_node_flags(data, reference, tmp_path):
    out, port = tmp_path / "run", _port()
    slurm = {"SLURM_JOB_ID": str(port - 20000), "SLURM_STEP_ID": "0", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
             "SLURM_JOB_NODELIST": "127.0.0.[1-2]"}  # both loopback addresses of this machine
    envs = {r: _env(**slurm, SLURM_NODEID=str(r)) for r in (0, 1)}
    res = two_nodes(["--data", data, "--out", out, *STEPS, "--engine", "accelerate"], tmp_path, envs=envs)
    assert [c for c, _ in res] == [0, 0], res
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert _losses(out) == pytest.approx(_losses(reference), rel=1e-4)
    assert_close(final_weights(out), final_weights(reference), 1e-4)
    for r, (_, err) in enumerate(res):
        said = f"SLURM job {port - 20000}: node {r} of 2 (127.0.0.{r + 1}; nodes 127.0.0.[1-2]), meeting at 127.0.0.1:{port}"
        assert err.count(said) == 1, err
        assert said in node_file(out / "train.log", r).read_text()


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _wait_for_steps(out: Path, procs, steps: int = 2, limit: float = 300) -> None:
    deadline = time.time() + limit
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if (out / "metrics.csv").is_file() and len((out / "metrics.csv").read_text().splitlines()) > steps:
            return
        time.sleep(0.1)
    raise AssertionError([p.communicate(timeout=60) if p.poll() is not None else "running" for p in procs])


@pytest.mark.slow
def test_sigterm_to_every_process_of_one_node_stops_both_after_the_same_step(data, tmp_path):
    out, port = tmp_path / "run", _port()
    args = _node_args(out, data, port, *LONG, "--launcher", "torchrun")
    procs = [_start(args + ["--node-rank", r], tmp_path) for r in (1, 0)]
    try:
        _wait_for_steps(out, procs)
        for p in _tree(procs[0].pid):  # as SLURM signals a step: the lm4lv process, launcher and workers
            p.send_signal(signal.SIGTERM)
        res = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [c for c, _ in res] == [75, 75], res
    last = {re.fullmatch(r"interrupted at step (\d+); continue with --resume", err.strip().splitlines()[-1]).group(1)
            for _, err in res}
    assert len(last) == 1, res
    step = int(last.pop())
    assert 2 <= step < 60 and ckpt.complete_steps(out / "checkpoints") == [step]
    assert metrics(out)[-1]["step"] == str(step)


@pytest.mark.slow
def test_a_lost_node_stops_the_other_with_an_error_naming_it(data, tmp_path):
    out, port = tmp_path / "run", _port()
    args = _node_args(out, data, port, *LONG, "--engine", "accelerate", "--node-timeout", "20")
    procs = [_start(args + ["--node-rank", r], tmp_path) for r in (1, 0)]
    try:
        _wait_for_steps(out, procs)
        lost = procs[0].pid
        for p in _tree(lost):  # node 1 dies: every process on it at once
            p.kill()
        t0 = time.time()
        _, err = procs[1].communicate(timeout=120)
        waited = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == 2, err
    assert waited < 20 + 15, waited
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: lost node 1 (host {socket.gethostname()}, pid {lost})"), err
    assert "Traceback" not in err
