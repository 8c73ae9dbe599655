"""Entry point of every launched worker: ``python -m lm4lv_core.worker KIND JOB.yaml``.

Launchers (``deepspeed``, ``accelerate launch``, ``torchrun``) start this module once per
process; it reads the typed job the parent command wrote (``lm4lv_core.engine.launch.run_job``)
and runs the function registered for ``KIND``. A single worker runs that function in-process,
without a launcher or this module.

Failures: an lm4lv error is left beside the job file for the parent to report as one line; an
unexpected one is marked there too (``crash_file``) and its traceback shown. A worker whose own
failure follows another worker's report (typically its process group losing that peer) keeps
its traceback in the job's log, so the user sees the cause, not its echoes.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys

from dataclasses import fields

from .config import freeze, from_dict, load_yaml
from .engine.launch import JOBS
from .errors import LM4LVError
from .jobs import ft_mae, generate, recon_mae, train  # noqa: F401  (registers the command jobs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lm4lv-worker")
    parser.add_argument("kind", help="registered job kind (train, ft-mae, generate, restore, recon-mae, probe)")
    parser.add_argument("job", help="job YAML written by the lm4lv command")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)  # added by deepspeed
    args = parser.parse_args(argv)
    import os
    from pathlib import Path

    from .engine.launch import interrupted_file, result_file, stop_file
    from .errors import Interrupted
    from .util import dist, logs, signals
    from .util.fsutil import write_failure, write_json_atomic

    logs.attach_console()  # lm4lv's own lines to the user's console, the rest stays in the job's log
    # the parent starts the launcher with these blocked (so that a signal to every process of a job
    # does not make the launcher kill its workers); a worker stops on them at its next safe point
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.SIGNALS)
    job = Path(args.job)
    rank = int(os.environ.get("RANK", "0"))
    # the lm4lv parent forwards its signals as a file beside this node's job file (it lists every
    # node's in the environment; a worker polls them all); a signal sent to this worker itself
    # (e.g. to every process of a cluster job) stops it as well
    os.environ.setdefault(signals.STOP_FILE_ENV, str(stop_file(job)))
    with signals.handling(announce=False):
        try:
            stopped, result = None, None
            try:
                from .plugins import load_environment

                load_environment()  # the parent's plugins (it exports them in LM4LV_PLUGINS)
                spec = JOBS.get(args.kind)
                job_obj = from_dict(spec.job_type, load_yaml(args.job), source=args.job)
                for f in fields(job_obj):  # the parent resolved the job: workers read it as it is
                    freeze(getattr(job_obj, f.name))
                result = spec.run(job_obj)
            except Interrupted as e:
                stopped = str(e)
            # every worker learns whether any stopped on request and rank 0's return value (what an
            # in-process run returns), so that the parent of every node reports the same outcome;
            # and they leave together: a worker exiting while another still uses the process group aborts it
            outcomes = dist.all_gather_objects((stopped, result))
            stopped = stopped or next((s for s, _ in outcomes if s), None)
            if stopped:  # stopped with the progress saved: the parent reports it and exits 75
                interrupted_file(job, rank).write_text(stopped, encoding="utf-8")
            elif int(os.environ.get("LOCAL_RANK", rank)) == 0 and outcomes[0][1] is not None:
                write_json_atomic(result_file(job), outcomes[0][1])
            dist.barrier()
            dist.destroy()
        except Exception as e:
            if isinstance(e, LM4LVError) or (isinstance(e, OSError) and write_failure(e) is not None):
                msg = str(e) if isinstance(e, LM4LVError) else f"cannot write {e.filename or ''}: {write_failure(e)}"
                _report(job, rank, msg)
                sys.exit(2)
            if _peer_failed_first(job, rank):
                # most likely this rank's share of another worker's failure (its process group
                # connection closed): that worker's report is the one the user gets
                _log_traceback(rank)
                sys.exit(2)
            if _lost_peer(e):  # another node went away: its record (or the parent) tells why
                why = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0]).split(". ")[0][:160]
                logs.console_file().write(f"worker rank {rank}: lost the connection to the other workers ({why})\n")
                logs.console_file().flush()
                sys.exit(1)
            _mark_crash(job, rank, e)
            _show_traceback(rank)
            raise


PEER_WAIT_S = 5.0  # how long a failing worker looks for another worker's earlier report


def _peer_failed_first(job, rank: int) -> bool:
    """Whether another worker has reported an error or a crash (beside the job file)."""
    import time

    from .engine.launch import crash_file, error_file
    from .util import dist

    world = dist.world_size()
    if world <= 1:
        return False
    deadline = time.monotonic() + PEER_WAIT_S
    while True:
        if any(f(job, r).exists() for r in range(world) if r != rank for f in (error_file, crash_file)):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _mark_crash(job, rank: int, e: BaseException) -> None:
    """Tell the other workers (and the parent) that this rank failed first, unexpectedly."""
    from .engine.launch import crash_file

    try:
        crash_file(job, rank).write_text(f"{type(e).__name__}: {e}".splitlines()[0], encoding="utf-8")
    except OSError:
        pass


def _log_traceback(rank: int) -> None:
    """A failure that follows another worker's: its traceback goes to the job's log only."""
    import traceback

    print(f"worker rank {rank} stopped after another worker failed:\n{traceback.format_exc()}",
          file=sys.stderr, flush=True)


_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
         "Socket Timeout", "connection refused")


def _lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another worker went away."""
    import torch.distributed as tdist

    if isinstance(e, getattr(tdist, "DistNetworkError", ())):
        return True
    return isinstance(e, RuntimeError) and any(m.lower() in str(e).lower() for m in _LOST)


def _show_traceback(rank: int) -> None:
    """An unexpected failure: its traceback reaches the user, not only the log."""
    import traceback

    from .util import logs

    if logs.redirected():  # else the traceback reaches the console anyway
        logs.console_file().write(f"worker rank {rank} failed:\n{traceback.format_exc()}")
        logs.console_file().flush()


def _report(job, rank: int, msg: str) -> None:
    """Leave ``msg`` for the parent (lm4lv_core.engine.launch.run_job reports it once all workers exit)."""
    from .engine.launch import error_file

    try:
        error_file(job, rank).write_text(msg, encoding="utf-8")
    except OSError:
        pass  # e.g. the disk is full: the message below is all the user gets
    print(f"error: {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
