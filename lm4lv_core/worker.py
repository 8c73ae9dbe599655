"""Entry point of every launched worker: ``python -m lm4lv_core.worker KIND JOB.yaml``.

Launchers (``deepspeed``, ``accelerate launch``, ``torchrun``) start this module once per
process; it reads the job file written by the parent command and calls the job's function.
A single worker runs the same function in-process, without a launcher.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any, Callable

from .config import load_yaml
from .errors import ConfigError, LM4LVError

# job kind → "module:function"; each function takes the job dict.
JOBS: dict[str, str] = {
    "train": "lm4lv_core.engine.run:train_job",
    "generate": "lm4lv_core.generate_job:generate_job",
    "ft-mae": "lm4lv_core.mae:ft_mae_job",
    "recon-mae": "lm4lv_core.mae:recon_mae_job",
    "probe": "lm4lv_core.launch:probe_job",  # reports what each worker saw (launcher checks)
}


def job_function(kind: str) -> Callable[[dict[str, Any]], Any]:
    if kind not in JOBS:
        raise ConfigError(f"unknown job kind {kind!r}; valid: {', '.join(JOBS)}")
    module, fn = JOBS[kind].split(":")
    return getattr(importlib.import_module(module), fn)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lm4lv-worker")
    parser.add_argument("kind", choices=sorted(JOBS))
    parser.add_argument("job", help="job YAML written by the lm4lv command")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)  # added by deepspeed
    args = parser.parse_args(argv)
    from . import logs

    logs.attach_console()  # lm4lv's own lines to the user's console, the rest stays in the job's log
    try:
        job_function(args.kind)(load_yaml(args.job))
        # leave together: a worker exiting while another still uses the process group aborts it
        from . import dist

        dist.barrier()
        dist.destroy()
    except LM4LVError as e:
        # the parent (lm4lv_core.launch.run_job) reports this message once all workers exit
        import os
        import sys
        from pathlib import Path

        job = Path(args.job)
        rank = int(os.environ.get("RANK", "0"))
        job.with_name(f"{job.stem}.error.rank{rank}").write_text(str(e), encoding="utf-8")
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        # an unexpected failure: its traceback reaches the user, not only the log
        import os
        import traceback

        if logs.redirected():  # else the traceback below reaches the console anyway
            logs.console_file().write(f"worker rank {os.environ.get('RANK', '0')} failed:\n"
                                      f"{traceback.format_exc()}")
            logs.console_file().flush()
        raise


if __name__ == "__main__":
    main()
