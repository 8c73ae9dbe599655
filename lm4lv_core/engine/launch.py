"""Start the workers of a job with a real launcher, or in-process for a single worker.

Every command that can run on several processes (train, generate, ft-mae, ...) writes its job as
YAML and calls :func:`run_job`. Workers run ``python -m lm4lv_core.worker KIND JOB.yaml``:

* one worker on one node: the job function runs in this process, with ``RANK=0``,
  ``WORLD_SIZE=1``, ``LOCAL_RANK=0``, ``MASTER_ADDR`` and a free ``MASTER_PORT`` set for its
  duration (DeepSpeed needs them, otherwise it looks for MPI);
* several workers: ``deepspeed --num_gpus N --master_port P [--hostfile H --num_nodes M]
  --module lm4lv_core.worker ...``, or ``accelerate launch --multi_gpu --num_processes N
  --main_process_port P -m lm4lv_core.worker ...`` (with ``ACCELERATE_USE_CPU=true`` when there is
  no GPU: without it accelerate silently starts independent processes), or ``torchrun``.

A worker that fails with an lm4lv error writes its message beside the job file; :func:`run_job`
raises it as one :class:`LM4LVError` once the launcher has exited.

With a ``log_file``, everything but lm4lv's own lines (third-party warnings, launcher and
DeepSpeed INFO lines) goes to that file instead of the console (see :mod:`lm4lv_core.util.logs`);
``verbose`` shows it on the console as well. Tracebacks of failing workers still reach the console.

A job stopped on request (:mod:`lm4lv_core.util.signals`) leaves ``KIND-job.interrupted.rankR``; :func:`run_job` raises it as
:class:`Interrupted`. The launcher runs in its own session: a signal to this process is forwarded
to the workers as the stop file ``KIND-job.stop``; a second one kills the launcher and workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

from ..config import from_dict, save_yaml
from ..defaults import ENGINES, LAUNCHERS
from ..errors import ConfigError, Interrupted, LM4LVError
from ..registry import Registry
from ..util import signals
from ..util.dist import has_cuda

J = TypeVar("J")


@dataclass(frozen=True)
class JobSpec(Generic[J]):
    """A job kind: the typed job its workers receive and the function they run on it."""

    name: str
    job_type: type[J]
    run: Callable[[J], Any]


JOBS: Registry[JobSpec] = Registry("job kind")


def register_job(name: str, job_type: type) -> Callable[[Callable], Callable]:
    """``@register_job("train", TrainJob)`` on the function every worker of ``name`` runs."""

    def deco(fn: Callable) -> Callable:
        JOBS.register(name)(JobSpec(name, job_type, fn))
        return fn

    return deco


@dataclass
class Workers:
    """Where a job runs: ``nproc`` workers on each of ``num_nodes`` nodes, started by ``launcher``
    (default: the engine's own). One worker on one node runs in-process."""

    nproc: int = 1
    engine: str = "deepspeed"
    launcher: str | None = None
    num_nodes: int = 1
    hostfile: str | None = None
    master_port: int | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.launcher is not None and self.launcher not in LAUNCHERS:
            raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if self.nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {self.nproc}")
        if self.num_nodes < 1:
            raise ConfigError(f"--num-nodes must be >= 1, got {self.num_nodes}")

    @property
    def in_process(self) -> bool:
        return self.nproc == 1 and self.num_nodes == 1 and not self.hostfile

    def launcher_name(self) -> str:
        return self.launcher or self.engine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def error_file(job_path: Path, rank: int) -> Path:
    """Where worker ``rank`` writes the message of an lm4lv error that stopped it."""
    return job_path.with_name(f"{job_path.stem}.error.rank{rank}")


def crash_file(job_path: Path, rank: int) -> Path:
    """Where worker ``rank`` notes an unexpected failure (other workers then keep theirs quiet)."""
    return job_path.with_name(f"{job_path.stem}.crash.rank{rank}")


def require_gpu_for(precision: str) -> None:
    """fp16 runs only on a GPU (no fp16 matrix kernels or loss scaling on the CPU)."""
    if precision == "fp16" and not has_cuda():
        raise ConfigError("--precision fp16 needs a GPU; use bf16 (or fp32) on the CPU")


def launcher_command(kind: str, job_path: Path, *, nproc: int, launcher: str, num_nodes: int = 1,
                     hostfile: str | None = None, master_port: int | None = None) -> list[str]:
    """The command line that starts ``nproc`` workers per node for ``kind``."""
    port = str(master_port or free_port())
    worker = ["lm4lv_core.worker", kind, str(job_path)]
    py = sys.executable
    if launcher == "deepspeed":
        cmd = [py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", port]
        if hostfile:
            cmd += ["--hostfile", str(hostfile)]
        if num_nodes > 1:
            cmd += ["--num_nodes", str(num_nodes)]
        return cmd + ["--module"] + worker
    if hostfile or num_nodes > 1:
        raise ConfigError(f"--hostfile/--num-nodes need the deepspeed launcher; with {launcher}, "
                          "start the command on every node with its own launcher")
    if launcher == "accelerate":
        cmd = [py, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--main_process_port", port, "--mixed_precision", "no",
               "--dynamo_backend", "no"]
        return cmd + ["-m"] + worker
    if launcher == "torchrun":
        return [py, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", port, "-m"] + worker
    raise ConfigError(f"unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")


def launcher_env(launcher: str) -> dict[str, str]:
    env = dict(os.environ)
    if not has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
        if launcher == "accelerate":
            env["ACCELERATE_USE_CPU"] = "true"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@contextlib.contextmanager
def single_worker_env(master_port: int | None = None) -> Iterator[None]:
    """``RANK=0 WORLD_SIZE=1 ...`` for an in-process worker; the old values come back after."""
    new = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port or free_port())}
    if not has_cuda():
        new["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def result_file(job_path: Path) -> Path:
    """Where rank 0 of launched workers leaves the job function's return value (JSON)."""
    return job_path.with_name(f"{job_path.stem}.result.json")


def interrupted_file(job_path: Path, rank: int) -> Path:
    """Where worker ``rank`` writes the message of a stop on request (:class:`Interrupted`)."""
    return job_path.with_name(f"{job_path.stem}.interrupted.rank{rank}")


def stop_file(job_path: Path) -> Path:
    """The file whose existence asks the workers of ``job_path`` to stop at their next safe point."""
    return job_path.with_name(f"{job_path.stem}.stop")


def _kill_tree(proc: subprocess.Popen, wait: bool = True) -> None:
    """SIGKILL the launcher and every process below it (workers may sit in sessions of their own)."""
    import psutil

    try:
        procs = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        procs = []
    for p in [*procs, proc]:
        with contextlib.suppress(Exception):
            p.kill()
    if wait:  # (not inside a signal handler that interrupted proc.wait: it holds the wait lock)
        with contextlib.suppress(Exception):
            proc.wait(timeout=30)


def _request_stop(path: Path) -> None:
    try:
        path.touch()
    except OSError as e:
        print(f"warning: could not write the stop request {path} ({e.strerror}); send the signal again "
              "to abort at once", file=sys.stderr, flush=True)


def _worker_errors(job_path: Path, kind: str = "error") -> list[str]:
    msgs = []
    for f in sorted(job_path.parent.glob(f"{job_path.stem}.{kind}.rank*")):
        msg = f.read_text(encoding="utf-8").strip()
        if msg and msg not in msgs:
            msgs.append(msg)
    return msgs


def run_job(kind: str, job: Any, *, job_dir: str | os.PathLike, workers: Workers | None = None,
            log_file: str | os.PathLike | None = None, verbose: bool = False, **where: Any) -> Any:
    """Run the registered job ``kind`` on ``workers`` (or ``Workers(**where)``).

    ``job`` is the kind's typed job (a plain dict is read into it). It is written once to
    ``job_dir/KIND-job.yaml``, which launched workers read back; a single worker on a single node
    runs in-process on the same object. Returns the job function's return value (of rank 0, read
    back as JSON from launched workers). Raises
    :class:`LM4LVError` when a worker fails. ``log_file``: where third-party output goes.
    """
    from ..util import logs

    w = workers or Workers(**where)
    spec = JOBS.get(kind)
    if isinstance(job, dict):
        job = from_dict(spec.job_type, job, source=f"{kind} job")
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    job_path = job_dir / f"{kind}-job.yaml"
    stop = stop_file(job_path)
    for f in job_dir.glob(f"{job_path.stem}.*.rank*"):  # an earlier run's error_file / interrupted_file
        f.unlink()
    stop.unlink(missing_ok=True)
    result_file(job_path).unlink(missing_ok=True)
    save_yaml(job, job_path)
    if log_file:
        import datetime

        logs.note(log_file, f"{kind} job, {w.nproc} worker(s) per node on {w.num_nodes} node(s), started "
                            f"{datetime.datetime.now().isoformat(timespec='seconds')}")
    if w.in_process:
        # a process group the job creates (world size 1) stays for later jobs of this process:
        # DeepSpeed caches its groups, so destroying and re-creating it would break a second run
        quiet = logs.capture(log_file, verbose) if log_file else contextlib.nullcontext()
        with single_worker_env(w.master_port), signals.handling(), quiet:
            return spec.run(job)
    launcher = w.launcher_name()
    cmd = launcher_command(kind, job_path, nproc=w.nproc, launcher=launcher, num_nodes=w.num_nodes,
                           hostfile=w.hostfile, master_port=w.master_port)
    relay = logs.launched(log_file, job_dir, verbose) if log_file else contextlib.nullcontext((None, {}))
    with relay as (out, relay_env):
        try:
            # own session: a terminal's Ctrl-C reaches only this process, which forwards it as a stop
            # request (launchers would kill their workers on SIGINT/SIGTERM)
            proc = subprocess.Popen(cmd, env={**launcher_env(launcher), **relay_env}, stdout=out,
                                    stderr=subprocess.STDOUT if out is not None else None,
                                    start_new_session=True)
        except FileNotFoundError as e:
            raise LM4LVError(f"cannot start the {launcher} launcher ({e})") from None
        try:
            with signals.handling(on_stop=lambda: _request_stop(stop),
                                  on_abort=lambda: _kill_tree(proc, wait=False)):
                rc = proc.wait()
        except BaseException:
            _kill_tree(proc)
            raise
    stop.unlink(missing_ok=True)
    errors = _worker_errors(job_path)
    if errors:
        raise LM4LVError("; ".join(errors))
    stopped = _worker_errors(job_path, "interrupted")
    if stopped:
        raise Interrupted(stopped[0])
    if rc != 0:
        where = f"the workers' full output is in {log_file}" if log_file and relay_env else "see the output above"
        crash = _worker_errors(job_path, "crash")
        raise LM4LVError(f"{kind} workers failed (launcher {launcher} exit code {rc}"
                         + (f"; first: {crash[0]}" if crash else "") + f"); {where}")
    result = result_file(job_path)
    return json.loads(result.read_text(encoding="utf-8")) if result.is_file() else None


@dataclass
class ProbeJob:
    """A cheap job that checks a launcher really started connected workers (and what they saw)."""

    out: str
    fail: str | None = None  # every worker fails with this lm4lv error
    crash: int | None = None  # this rank raises an unexpected error
    noise: bool = False  # write third-party style output (warnings, logging, raw fd)


@register_job("probe", ProbeJob)
def probe_job(job: ProbeJob) -> dict[str, int]:
    """Join the process group and write ``probe-rankN.json`` (rank, world size, all-reduced sum)
    into ``job.out``."""
    import torch

    from ..util import dist

    dist.init_distributed()
    total = dist.all_reduce_mean(torch.tensor([float(dist.rank())])) * dist.world_size()
    seen = {"rank": dist.rank(), "world_size": dist.world_size(), "rank_sum": int(total.item())}
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"probe-rank{seen['rank']}.json").write_text(json.dumps(seen), encoding="utf-8")
    if job.fail:
        raise LM4LVError(job.fail)
    if job.crash is not None and dist.rank() == job.crash:
        raise RuntimeError(f"probe crash on rank {dist.rank()}")
    if job.noise:  # third-party style output: a warning, a logging line, a C-level write
        import logging
        import warnings

        warnings.warn("probe FutureWarning", FutureWarning, stacklevel=1)
        logging.getLogger("probe.lib").warning("probe library log line")
        os.write(2, b"probe raw fd line\n")
        from ..util import logs

        logs.say(f"probe lm4lv line rank {dist.rank()}")
    return seen
