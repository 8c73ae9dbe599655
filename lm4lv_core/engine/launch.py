"""Start the workers of a job with a real launcher, or in-process for a single worker.

Every command that can run on several processes (train, generate, ft-mae, ...) writes its job as
YAML and calls :func:`run_job`. Workers run ``python -m lm4lv_core.worker KIND JOB.yaml``:

* one worker on one node: the job function runs in this process, with ``RANK=0``,
  ``WORLD_SIZE=1``, ``LOCAL_RANK=0``, ``MASTER_ADDR`` and a free ``MASTER_PORT`` set for its
  duration (DeepSpeed needs them, otherwise it looks for MPI);
* several workers: ``deepspeed --num_gpus N --master_port P [--hostfile H --num_nodes M]
  --module lm4lv_core.worker ...``, or ``accelerate launch --multi_gpu --num_processes N
  --main_process_port P -m lm4lv_core.worker ...`` (with ``ACCELERATE_USE_CPU=true`` when there is
  no GPU: without it accelerate silently starts independent processes), or ``torchrun``;
* several nodes, one launcher per node (``--num-nodes M --node-rank R --master-addr HOST``, or
  what :mod:`lm4lv_core.engine.cluster` reads from an ``srun`` step): every node runs the same
  ``lm4lv`` command; ``torchrun`` meets at ``HOST:P`` (c10d rendezvous hosted by node 0) and
  ``accelerate launch`` with ``--num_machines M --machine_rank R --main_process_ip HOST``. The
  DeepSpeed engine uses torchrun there (its own launcher reaches other nodes only over ssh with
  ``--hostfile``). The job folder is on the shared filesystem: each node writes its own job file,
  log, stop request and result (``*.nodeR.*``); worker errors are named by rank, and the nodes watch
  each other's records (:mod:`lm4lv_core.util.nodes`) so that a lost node stops the others within
  ``--node-timeout`` with a message naming it.

A worker that fails with an lm4lv error writes its message beside the job file; :func:`run_job`
raises it as one :class:`LM4LVError` once the launcher has exited.

With a ``log_file``, everything but lm4lv's own lines (third-party warnings, launcher and
DeepSpeed INFO lines) goes to that file instead of the console (see :mod:`lm4lv_core.util.logs`);
``verbose`` shows it on the console as well. Tracebacks of failing workers still reach the console.

A job stopped on request (:mod:`lm4lv_core.util.signals`) leaves ``KIND-job.interrupted.rankR``; :func:`run_job` raises it as
:class:`Interrupted`. The launcher runs in its own session: a signal to this process is forwarded
to the workers as the stop file ``KIND-job.stop``; a second one kills the launcher and workers.
The launcher starts with SIGINT/SIGTERM/SIGHUP blocked (the workers unblock them): a scheduler
that signals every process of a job (SLURM) stops the workers through their own handlers, and
the launcher does not kill them mid-step.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

from ..config import from_dict, save_yaml
from ..defaults import LAUNCHERS, NODE_TIMEOUT
from ..errors import ConfigError, Interrupted, LM4LVError
from ..registry import Registry
from ..util import nodes, signals
from ..util.dist import has_cuda
from .cluster import Workers  # noqa: F401  (where a job runs; imported from here by the commands)

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_gpu_for(precision: str) -> None:
    """fp16 runs only on a GPU (no fp16 matrix kernels or loss scaling on the CPU)."""
    if precision == "fp16" and not has_cuda():
        raise ConfigError("--precision fp16 needs a GPU; use bf16 (or fp32) on the CPU")


def launcher_command(kind: str, job_path: Path, *, nproc: int, launcher: str, num_nodes: int = 1,
                     hostfile: str | None = None, master_port: int | None = None, node_rank: int | None = None,
                     master_addr: str | None = None, node_timeout: float = NODE_TIMEOUT) -> list[str]:
    """The command line that starts ``nproc`` workers per node for ``kind``: on this node, on all
    nodes of ``hostfile`` (deepspeed), or on this node as node ``node_rank`` of ``num_nodes`` that
    meet at ``master_addr:master_port`` (torchrun, accelerate; the same command on every node)."""
    port = str(master_port or free_port())
    worker = ["lm4lv_core.worker", kind, str(job_path)]
    py = sys.executable
    if launcher == "deepspeed":
        if node_rank is not None and num_nodes > 1:
            raise ConfigError("--launcher deepspeed reaches other nodes only over ssh (--hostfile); for one "
                              "launcher per node use --launcher torchrun")
        cmd = [py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", port]
        if hostfile:
            cmd += ["--hostfile", str(hostfile)]
        if num_nodes > 1:
            cmd += ["--num_nodes", str(num_nodes)]
        return cmd + ["--module"] + worker
    if hostfile:
        raise ConfigError(f"--hostfile needs the deepspeed launcher; with {launcher}, start the command on every "
                          "node with --num-nodes, --node-rank and --master-addr (or under srun)")
    if num_nodes > 1 and (node_rank is None or not master_addr):
        raise ConfigError(f"--num-nodes {num_nodes} with the {launcher} launcher needs --node-rank and --master-addr")
    wait = str(max(1, int(node_timeout)))
    if launcher == "accelerate":
        cmd = [py, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc * num_nodes),
               "--num_machines", str(num_nodes), "--main_process_port", port, "--mixed_precision", "no",
               "--dynamo_backend", "no"]
        if num_nodes > 1:  # torch's static rendezvous: node 0 hosts it, ranks follow --machine_rank
            cmd += ["--machine_rank", str(node_rank), "--main_process_ip", str(master_addr),
                    "--rdzv_conf", f"timeout={wait}"]
        return cmd + ["-m"] + worker
    if launcher == "torchrun":
        cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        if num_nodes > 1:  # c10d rendezvous hosted by node 0, every node waits for the others up to the timeout
            host = "1" if node_rank == 0 else "0"
            cmd += ["--nnodes", str(num_nodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{master_addr}:{port}",
                    "--rdzv_id", f"lm4lv-{kind}", "--rdzv_conf",
                    f"is_host={host},join_timeout={wait},read_timeout={wait}", "--max_restarts", "0"]
        else:
            cmd += ["--master_port", port]
        return cmd + ["-m"] + worker
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


def job_file(job_dir: Path, kind: str, node: int = 0) -> Path:
    """The job file of ``kind`` that this node's workers read (``KIND-job.nodeR.yaml`` on node R > 0)."""
    return Path(job_dir) / (f"{kind}-job.yaml" if not node else f"{kind}-job.node{node}.yaml")


def node_file(path: str | os.PathLike, node: int) -> Path:
    """A per-node file beside ``path``: ``train.log`` stays on node 0, ``train.node1.log`` on node 1."""
    path = Path(path)
    return path if not node else path.with_name(f"{path.stem}.node{node}{path.suffix}")


def _run_stem(job_path: Path) -> str:
    """The stem that all nodes' files of one job share (``train-job`` of ``train-job.node1.yaml``)."""
    return re.sub(r"\.node\d+$", "", Path(job_path).stem)


def error_file(job_path: Path, rank: int) -> Path:
    """Where worker ``rank`` writes the message of an lm4lv error that stopped it."""
    return job_path.with_name(f"{_run_stem(job_path)}.error.rank{rank}")


def crash_file(job_path: Path, rank: int) -> Path:
    """Where worker ``rank`` notes an unexpected failure (other workers then keep theirs quiet)."""
    return job_path.with_name(f"{_run_stem(job_path)}.crash.rank{rank}")


def result_file(job_path: Path) -> Path:
    """Where the first worker of a node leaves the job function's return value of rank 0 (JSON)."""
    return job_path.with_name(f"{job_path.stem}.result.json")


def interrupted_file(job_path: Path, rank: int) -> Path:
    """Where worker ``rank`` writes the message of a stop on request (:class:`Interrupted`)."""
    return job_path.with_name(f"{_run_stem(job_path)}.interrupted.rank{rank}")


def stop_file(job_path: Path) -> Path:
    """The file whose existence asks the workers of ``job_path`` (this node's) to stop at their next
    safe point; the workers of the other nodes follow them (the ranks agree on the stop)."""
    return job_path.with_name(f"{job_path.stem}.stop")


def nodes_folder(job_dir: str | os.PathLike) -> Path:
    """Where the nodes of a multi-node job keep their records (:mod:`lm4lv_core.util.nodes`)."""
    return Path(job_dir) / "nodes"


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
    for f in sorted(job_path.parent.glob(f"{_run_stem(job_path)}.{kind}.rank*")):
        try:
            msg = f.read_text(encoding="utf-8").strip()
        except OSError:  # removed meanwhile (another node starting over)
            continue
        if msg and msg not in msgs:
            msgs.append(msg)
    return msgs


@dataclass
class _Node:
    """This node of a command in progress (see :func:`on_node`)."""

    workers: Workers
    presence: nodes.Presence | None = None
    watch: nodes.Watch | None = None


_ACTIVE: dict[str, _Node] = {}  # job folder -> this node while a command runs there
POLL_S = 1.0  # how often a launching parent looks at the other nodes


@contextlib.contextmanager
def on_node(workers: Workers, job_dir: str | os.PathLike,
            log_file: str | os.PathLike | None = None) -> Iterator[Workers]:
    """Run the block as this node of ``workers`` (yielded resolved, see :meth:`Workers.resolve`).

    Says once what was taken from SLURM (also into this node's ``log_file``). With one launcher
    per node, this node keeps its record in ``job_dir/nodes`` (on the shared filesystem) from
    here to the end, where it writes its outcome, and :func:`run_job` inside the block watches the
    other nodes' records. Enter it once the run folder is locked; a nested call for the same
    ``job_dir`` reuses the outer one."""
    from ..util import logs

    key = str(Path(job_dir).absolute())
    if key in _ACTIVE:
        yield _ACTIVE[key].workers
        return
    w = workers.resolve()
    if w.detected:
        logs.say(w.detected)
        if log_file:
            with contextlib.suppress(OSError):
                logs.note(node_file(log_file, w.node), w.detected)
    node = _Node(w)
    if w.per_node:
        interval = max(0.5, min(5.0, w.node_timeout / 10))
        node.presence = nodes.Presence(nodes_folder(job_dir), w.node, interval)
        node.presence.start()
        node.watch = nodes.Watch(nodes_folder(job_dir), w.node, w.num_nodes, interval)
    _ACTIVE[key] = node
    outcome: tuple = ("done", "")
    try:
        yield w
    except Interrupted as e:
        outcome = ("interrupted", str(e))
        raise
    except LM4LVError as e:
        outcome = ("error", str(e), getattr(e, "node", None) if isinstance(e, nodes.NodeLost) else None)
        raise
    except KeyboardInterrupt:
        outcome = ("aborted", "aborted by a second signal")
        raise
    except BaseException as e:
        outcome = ("failed", f"{type(e).__name__}: {e}")
        raise
    finally:
        del _ACTIVE[key]
        if node.presence is not None:
            node.presence.finish(*outcome)


def run_job(kind: str, job: Any, *, job_dir: str | os.PathLike, workers: Workers | None = None,
            log_file: str | os.PathLike | None = None, verbose: bool = False, **where: Any) -> Any:
    """Run the registered job ``kind`` on ``workers`` (or ``Workers(**where)``).

    ``job`` is the kind's typed job (a plain dict is read into it). It is written once to
    ``job_dir/KIND-job.yaml`` (``KIND-job.nodeR.yaml`` on node R of several), which launched
    workers read back; a single worker on a single node runs in-process on the same object.
    Returns the job function's return value (of rank 0, read back as JSON from launched
    workers). Raises :class:`LM4LVError` when a worker fails or another node is lost.
    ``log_file``: where third-party output goes (``NAME.nodeR.log`` on node R).
    """
    spec = JOBS.get(kind)
    if isinstance(job, dict):
        job = from_dict(spec.job_type, job, source=f"{kind} job")
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    with on_node(workers or Workers(**where), job_dir, log_file) as w:
        return _run(kind, spec, job, job_dir, w, node_file(log_file, w.node) if log_file else None, verbose)


def _run(kind: str, spec: JobSpec, job: Any, job_dir: Path, w: Workers, log_file: Path | None, verbose: bool) -> Any:
    """Write the job file, then run the job in this process (one worker) or through the launcher."""
    from ..util import logs

    job_path = _write_job(kind, job, job_dir, w, log_file)
    if w.in_process:
        # a process group the job creates (world size 1) stays for later jobs of this process:
        # DeepSpeed caches its groups, so destroying and re-creating it would break a second run
        quiet = logs.capture(log_file, verbose) if log_file else contextlib.nullcontext()
        with single_worker_env(w.master_port), signals.handling(), quiet:
            return spec.run(job)
    return _launched(kind, job_path, job_dir, w, log_file, verbose)


def _write_job(kind: str, job: Any, job_dir: Path, w: Workers, log_file: Path | None) -> Path:
    """Clear what an earlier run of this job left (error, interrupted, stop and result files), write
    the job file and note the run in the log; returns the job file."""
    from ..util import logs

    job_path = job_file(job_dir, kind, w.node)
    for f in job_dir.glob(f"{_run_stem(job_path)}.*.rank*"):  # an earlier run's error_file / interrupted_file
        f.unlink(missing_ok=True)
    stop_file(job_path).unlink(missing_ok=True)
    result_file(job_path).unlink(missing_ok=True)
    save_yaml(job, job_path)
    if log_file:
        import datetime

        logs.note(log_file, f"{kind} job, {w.nproc} worker(s) per node on {w.num_nodes} node(s)"
                            + (f", this is node {w.node} (meeting at {w.master_addr}:{w.master_port})"
                               if w.per_node else "")
                            + f", started {datetime.datetime.now().isoformat(timespec='seconds')}")
    return job_path


def _launched(kind: str, job_path: Path, job_dir: Path, w: Workers, log_file: Path | None, verbose: bool) -> Any:
    """Run the job's workers through the launcher and wait for them; their result (rank 0's)."""
    from ..util import logs

    launcher = w.launcher_name()
    cmd = launcher_command(kind, job_path, nproc=w.nproc, launcher=launcher, num_nodes=w.num_nodes,
                           hostfile=w.hostfile, master_port=w.master_port,
                           node_rank=w.node_rank if w.per_node else None, master_addr=w.master_addr,
                           node_timeout=w.node_timeout)
    node = _ACTIVE.get(str(job_dir.absolute()))
    watch = node.watch if node is not None else None
    stop = stop_file(job_path)
    pipe = f"console.node{w.node}.pipe" if w.node else "console.pipe"
    relay = logs.launched(log_file, job_dir, verbose, pipe) if log_file else contextlib.nullcontext((None, {}))
    with relay as (out, relay_env):
        # every node's stop request (this node's first): a worker stops on any of them
        others = [stop_file(job_file(job_dir, kind, r)) for r in range(w.num_nodes) if w.per_node and r != w.node]
        env = {**launcher_env(launcher), **relay_env,
               signals.STOP_FILE_ENV: os.pathsep.join(str(f) for f in [stop, *others])}
        proc = _start_launcher(cmd, env, out, launcher)
        rc, lost = _wait_for(proc, stop, watch, w.node_timeout)
    stop.unlink(missing_ok=True)
    return _outcome(kind, job_path, w, rc, lost, launcher, node, log_file if log_file and relay_env else None)


def _start_launcher(cmd: list[str], env: dict[str, str], out, launcher: str) -> subprocess.Popen:
    """Start the launcher in its own session: a terminal's Ctrl-C reaches only this process, which
    forwards it as a stop request; and SIGINT/SIGTERM/SIGHUP blocked in the launcher (inherited, the
    workers unblock them), so a signal sent to every process of the job reaches the workers, not the
    launcher, which would kill its workers mid-step."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals.SIGNALS)
    try:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out is not None else None,
                                start_new_session=True)
    except FileNotFoundError as e:
        raise LM4LVError(f"cannot start the {launcher} launcher ({e})") from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _wait_for(proc: subprocess.Popen, stop: Path, watch, node_timeout) -> tuple[int | None, Any]:
    """Wait for the launcher, forwarding stop requests and aborts; ``(exit code, lost)`` where
    ``lost`` is another node that ended badly or went silent (its workers are then killed)."""
    lost = None
    try:
        with signals.handling(on_stop=lambda: _request_stop(stop),
                              on_abort=lambda: _kill_tree(proc, wait=False)):
            while True:
                try:
                    return proc.wait(timeout=POLL_S if watch is not None else None), lost
                except subprocess.TimeoutExpired:
                    lost = watch.problem(node_timeout)
                    if lost:  # another node ended badly or went silent: do not wait for our workers
                        _kill_tree(proc)
                        return proc.returncode, lost
    except BaseException:
        _kill_tree(proc)
        raise


def _outcome(kind: str, job_path: Path, w: Workers, rc: int | None, lost, launcher: str, node,
             output: Path | None) -> Any:
    """The launched job's result, or the error its workers, the launcher or another node reported
    (``output``: the log file holding the workers' output, ``None`` when it was shown)."""
    from ..util import logs

    errors = _worker_errors(job_path)
    if errors:
        raise LM4LVError("; ".join(errors))
    stopped = _worker_errors(job_path, "interrupted")
    if stopped:
        raise Interrupted(stopped[0])
    if lost:
        raise nodes.NodeLost(f"{lost[1]}; stopped the {kind} workers of node {w.node}", lost[0])
    result = result_file(job_path)
    if rc != 0 and result.is_file():
        # written after every worker finished the job (their last collective): only leaving failed
        logs.say(f"warning: the {kind} workers{f' of node {w.node}' if w.per_node else ''} crashed while exiting "
                 f"(launcher {launcher} exit code {rc}) after finishing the job; "
                 + (f"see {output}" if output else "see the output above"))
    elif rc != 0:
        failed = f"{kind} workers failed (launcher {launcher} exit code {rc})"
        watch = node.watch if node is not None else None
        if watch is not None:  # a broken run: find out whether another node was lost or ended badly
            node.presence.set_state(nodes.STOPPING, f"its {failed}")
            found = watch.explain(w.node_timeout)
            errors = _worker_errors(job_path)  # other nodes' workers' messages may have arrived meanwhile
            if errors:
                raise LM4LVError("; ".join(errors))
            if found:
                raise nodes.NodeLost(f"{'; '.join(m for _, m in found)}; the {kind} workers of node {w.node} "
                                     "stopped with it", found[0][0])
            failed += f" on node {w.node} (the nodes meet at {w.master_addr}:{w.master_port})"
        crash = _worker_errors(job_path, "crash")
        where = f"the workers' full output is in {output}" if output else "see the output above"
        raise LM4LVError(f"{failed}" + (f"; first: {crash[0]}" if crash else "") + f"; {where}")
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
