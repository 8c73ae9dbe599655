"""A quiet console: third-party output goes to the job's log file, lm4lv's own lines to the console."""

from __future__ import annotations

import os

import pytest

from lm4lv_core.errors import LM4LVError
from lm4lv_core.engine.launch import run_job

NOISE = ("probe FutureWarning", "probe library log line", "probe raw fd line")


def test_in_process_job_keeps_third_party_output_in_the_log(tmp_path, capfd):
    log = tmp_path / "job.log"
    run_job("probe", {"out": str(tmp_path), "noise": True}, job_dir=tmp_path / "job", log_file=log)
    out, err = capfd.readouterr()
    assert "probe lm4lv line rank 0" in err
    for line in NOISE:
        assert line not in out + err
        assert line in log.read_text()
    # --verbose: on the console as well, and still in the log
    run_job("probe", {"out": str(tmp_path), "noise": True}, job_dir=tmp_path / "job", log_file=log, verbose=True)
    out, err = capfd.readouterr()
    assert "probe raw fd line" in err and "probe library log line" in err
    assert log.read_text().count("probe raw fd line") == 2


@pytest.mark.slow
def test_launched_workers_log_quietly_and_tracebacks_still_reach_the_user(tmp_path, capfd):
    log = tmp_path / "job.log"
    run_job("probe", {"out": str(tmp_path), "noise": True}, nproc=2, launcher="torchrun",
            job_dir=tmp_path / "job", log_file=log)
    out, err = capfd.readouterr()
    assert "probe lm4lv line rank 0" in err and "probe lm4lv line rank 1" in err
    text = log.read_text()
    for line in NOISE:
        assert line not in out + err and line in text
    with pytest.raises(LM4LVError, match="workers failed.*job.log"):
        run_job("probe", {"out": str(tmp_path), "crash": 1}, nproc=2, launcher="torchrun",
                job_dir=tmp_path / "job", log_file=log)
    out, err = capfd.readouterr()
    assert "worker rank 1 failed" in err and "Traceback" in err and "RuntimeError: probe crash on rank 1" in err
    assert "RuntimeError: probe crash on rank 1" in log.read_text()


def test_capture_ends_with_its_body_even_when_a_library_keeps_a_copy_of_stderr(tmp_path):
    """DeepSpeed's op probe leaks a dup of fd 2: the capture must not wait for that copy to close
    (it never does in this process), and keeps everything the body wrote."""
    import threading

    from lm4lv_core.util import logs

    leaked = []
    with logs.capture(tmp_path / "run.log"):
        leaked.append(os.dup(2))
        os.write(2, b"third-party line\n")
    try:
        assert not [t for t in threading.enumerate() if t.name == "lm4lv-log" and t.is_alive()]
        assert "third-party line" in (tmp_path / "run.log").read_text()
    finally:
        os.close(leaked[0])
