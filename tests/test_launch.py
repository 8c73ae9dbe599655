"""Launcher command lines and the in-process single worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lm4lv_core.errors import ConfigError
from lm4lv_core.engine.launch import launcher_command, launcher_env, run_job


def test_launcher_commands(tmp_path):
    job = tmp_path / "train-job.yaml"
    cmd = launcher_command("train", job, nproc=4, launcher="deepspeed", num_nodes=2, hostfile="hosts", master_port=1234)
    assert cmd[1:4] == ["-m", "deepspeed.launcher.runner", "--num_gpus"] and "4" in cmd
    assert cmd[cmd.index("--hostfile") + 1] == "hosts" and cmd[cmd.index("--num_nodes") + 1] == "2"
    assert cmd[-4:] == ["--module", "lm4lv_core.worker", "train", str(job)]
    cmd = launcher_command("generate", job, nproc=2, launcher="accelerate", master_port=1234)
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-4:] == ["-m", "lm4lv_core.worker", "generate", str(job)]
    with pytest.raises(ConfigError, match="deepspeed launcher"):
        launcher_command("train", job, nproc=2, launcher="accelerate", hostfile="hosts")
    if not os.environ.get("CUDA_VISIBLE_DEVICES"):
        assert launcher_env("accelerate").get("ACCELERATE_USE_CPU") == "true"


def test_single_worker_runs_in_process_with_rank_env(tmp_path):
    before = os.environ.get("WORLD_SIZE")
    seen = run_job("probe", {"out": str(tmp_path)}, nproc=1, job_dir=tmp_path)
    assert seen == {"rank": 0, "world_size": 1, "rank_sum": 0}
    assert os.environ.get("WORLD_SIZE") == before
    assert Path(tmp_path / "probe-job.yaml").is_file()
    with pytest.raises(ConfigError, match="--nproc"):
        run_job("probe", {"out": str(tmp_path)}, nproc=0, job_dir=tmp_path)
