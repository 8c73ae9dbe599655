"""Memory measured inside the real commands, for benchmarks: set ``LM4LV_MEMORY_REPORT=DIR``.

Unset (the default) nothing is measured and nothing is written. Set, every worker of ``train`` and
``generate`` writes ``DIR/<kind>-rank<R>.json`` (replaced atomically as it grows):

* ``load``: resident memory before loading the model and its peak after (``VmHWM``, reset first
  through ``/proc/self/clear_refs`` where allowed; pages of memory-mapped safetensors count once
  touched), parameter bytes by dtype, frozen and trainable, and how many frozen parameters are not
  in the run's compute dtype;
* ``engine`` (train): parameter bytes by dtype once the engine has wrapped the model;
* ``step`` (train, the ``LM4LV_MEMORY_STEP``-th step of the job, default 2): bytes live when the
  backward starts and the peak during the step, both above what was live when the step began; on
  CUDA also ``max_memory_allocated``, the allocator's peak during the step, weights included.

How the step is measured: on CUDA from the caching allocator's statistics; on the CPU from
``torch.profiler``'s memory events (every allocation and free of the CPU allocator, in order),
whose running sum gives the exact peak of live tensor bytes, workspaces included. The profiler
starts one step early so that tensors of the previous step freed during the measured one (the
previous batch, outputs) count as freed; older blocks freed during the step would not (rare
in a training step).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ENV = "LM4LV_MEMORY_REPORT"
STEP_ENV = "LM4LV_MEMORY_STEP"
_report: dict[str, Any] = {}
_steps = [0]  # training steps started in this process


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def _write(kind: str) -> None:
    from . import dist
    from .fsutil import write_json_atomic

    folder = Path(os.environ[ENV])
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"{kind}-rank{dist.rank()}.json", _report)


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def parameter_bytes(module: nn.Module) -> dict[str, dict[str, int]]:
    """Bytes of parameters by dtype, split into frozen and trainable (each tensor counted once)."""
    out: dict[str, dict[str, int]] = {"frozen": {}, "trainable": {}}
    seen: set[int] = set()
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        part = out["trainable" if p.requires_grad else "frozen"]
        key = str(p.dtype).replace("torch.", "")
        n = getattr(p, "ds_numel", p.numel())  # ZeRO-3 keeps the full size in ds_numel
        part[key] = part.get(key, 0) + n * p.element_size()
    return out


class LoadMeter:
    """``meter = LoadMeter()`` before loading, ``meter.done(kind, model, dtype)`` after. Every job
    loads its model once, so a new ``LoadMeter`` also starts a new report (and step count)."""

    def __init__(self) -> None:
        self.on = enabled()
        if self.on:
            _report.clear()
            _steps[0] = 0
            self.reset = _reset_peak_rss()
            self.rss0, self.t0 = rss_bytes(), time.perf_counter()

    def done(self, kind: str, model: nn.Module, dtype: torch.dtype) -> None:
        if not self.on:
            return
        frozen_off = sum(p.numel() for p in model.parameters()
                         if not p.requires_grad and p.is_floating_point() and p.dtype != dtype)
        _report["load"] = {"rss_before": self.rss0, "peak_rss": peak_rss_bytes(), "peak_reset": self.reset,
                           "seconds": time.perf_counter() - self.t0, "compute_dtype": str(dtype).replace("torch.", ""),
                           "params": sum(p.numel() for p in model.parameters()),
                           "param_bytes": parameter_bytes(model), "frozen_params_not_compute_dtype": frozen_off}
        _write(kind)


def engine_done(model: nn.Module) -> None:
    """Parameter bytes once the training engine wrapped (and perhaps cast) the model."""
    if enabled():
        _report["engine"] = {"param_bytes": parameter_bytes(model)}
        _write("train")


class StepMeter:
    """Measures one training step: ``StepMeter()`` at the start of every step (it measures the
    ``LM4LV_MEMORY_STEP``-th of this process, default 2), ``.backward()`` before the first
    backward, ``.done()`` at the step's end.

    On the CPU the profiler already runs during the step before, so tensors of that step freed
    during the measured one (the previous batch, outputs) count as freed."""

    _prof = None  # the CPU profiler, started one step ahead

    def __init__(self) -> None:
        _steps[0] += 1
        target = int(os.environ.get(STEP_ENV, "2"))
        self.on = enabled() and _steps[0] == target
        self.marked = False
        self.at_backward: int | None = None
        if not enabled() or _steps[0] not in (target - 1, target):
            return
        from .dist import has_cuda

        self.cuda = has_cuda()
        if not self.cuda and StepMeter._prof is None:
            from torch.profiler import ProfilerActivity, profile

            StepMeter._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            StepMeter._prof.__enter__()
        if not self.on:
            return
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _mark("lm4lv::step")
        self.t0 = time.perf_counter()

    def backward(self) -> None:
        if not self.on or self.marked:
            return
        self.marked = True
        if self.cuda:
            torch.cuda.synchronize()
            self.at_backward = torch.cuda.memory_allocated() - self.base
        else:  # the live bytes at this mark are read from the profile in done()
            _mark("lm4lv::backward")

    def done(self) -> None:
        if not self.on:
            return
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - self.base
            forward = self.at_backward
            extra = {"max_memory_allocated": torch.cuda.max_memory_allocated(), "device": torch.cuda.get_device_name()}
        else:
            StepMeter._prof.__exit__(None, None, None)
            forward, peak = _profile_peaks(StepMeter._prof)
            StepMeter._prof = None
            extra = {"device": "cpu"}
        _report["step"] = {"activation_bytes": forward, "peak_bytes": peak, "measured_step": _steps[0],
                           "seconds": time.perf_counter() - self.t0, "peak_rss": peak_rss_bytes(), **extra}
        _write("train")


def _mark(name: str) -> None:
    with torch.profiler.record_function(name):
        pass


def _profile_peaks(prof) -> tuple[int | None, int]:
    """Bytes live at the ``lm4lv::backward`` mark and at the peak after the ``lm4lv::step`` mark,
    both above the bytes live at the step mark (running sum of the profiler's memory events)."""
    events = prof.profiler.kineto_results.events()
    marks = {name: min((e.start_ns() for e in events if e.name() == name), default=None)
             for name in ("lm4lv::step", "lm4lv::backward")}
    start, bwd = marks["lm4lv::step"] or 0, marks["lm4lv::backward"]
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = 0
    base = at_bwd = peak = None
    for t, nbytes in mem:
        if base is None and t >= start:
            base = peak = live
        if bwd is not None and at_bwd is None and t >= bwd:
            at_bwd = live
        live += nbytes
        if base is not None:
            peak = max(peak, live)
    base = live if base is None else base
    at_bwd = live if at_bwd is None and bwd is not None else at_bwd
    return (None if at_bwd is None else at_bwd - base), (peak if peak is not None else live) - base
