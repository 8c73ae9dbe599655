"""The backend-independent training loop.

Data order: for epoch ``e`` the dataset is permuted with ``seed + e`` and padded by wrap-around to a
whole number of global batches (``micro_batch × grad_accum × world_size``). Global batch ``k`` is the
slice ``[k·G, (k+1)·G)``; micro-step ``j`` of rank ``r`` takes its ``micro_batch`` samples at
``k·G + (j·world + r)·micro_batch``. So a run with more workers and the same global batch sees the
same samples per step, and a resumed run continues exactly where the checkpoint was taken.

Stopping on request (:mod:`lm4lv_core.util.signals`): every rank adds its stop flag to the per-step
all-reduce of the losses, so all ranks see the same verdict after the same step; they save one
checkpoint there and raise :class:`Interrupted`.

Non-finite steps: that all-reduce comes before the update, so every rank sees a NaN / inf loss
part of any rank and the optimizer refuses that step (as it refuses non-finite gradients, see
``backends``): the weights and optimizer state stay, the batch is consumed, the schedule goes on,
``skipped_steps`` in ``metrics.csv`` counts it. No checkpoint (nor ``final/``) is written at a
skipped step or from non-finite weights, so pruning keeps the newest finite checkpoint; after
``max_skipped_steps`` skipped steps in a row the run stops with :class:`Diverged`.
"""

from __future__ import annotations

import csv
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import resume
from ..data.dataset import CarryErrors, carrying_errors, raise_carried
from ..util import dist, logs, memreport, signals
from ..errors import ConfigError, Diverged, Interrupted, OutputError
from ..util.finite import nonfinite_names
from ..util.fsutil import TEMP_PREFIX, write_failure, write_json_atomic, writing
from ..precision import compute_dtype
from .backends import Backend, make_backend
from .config import TrainConfig
from .schedule import chained_lambda, warmup_steps_for
from .task import TrainTask

METRICS_FILE = "metrics.csv"


def epoch_order(n: int, epoch: int, seed: int, global_batch: int) -> list[int]:
    """All sample indices of one epoch, padded by wrap-around to whole global batches."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    steps = math.ceil(n / global_batch)
    total = steps * global_batch
    return (perm * math.ceil(total / n))[:total]


def rank_batches(order: list[int], micro: int, accum: int, world: int, rank: int) -> list[list[int]]:
    """The micro-batches of ``rank`` for one epoch, in order."""
    g = micro * accum * world
    out = []
    for k in range(len(order) // g):
        for j in range(accum):
            start = k * g + (j * world + rank) * micro
            out.append(order[start:start + micro])
    return out


class Trainer:
    """Runs ``task`` with ``cfg`` in run directory ``run_dir`` (one instance per worker).
    ``identity``: the job's options a resumed run must keep (:mod:`.resume`), recorded in every
    checkpoint; ``labels`` names them in refusals."""

    def __init__(self, task: TrainTask, cfg: TrainConfig, run_dir: str | Path,
                 identity: dict[str, Any] | None = None, labels: dict[str, str] | None = None) -> None:
        self.task = task
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.backend: Backend = make_backend(cfg)
        self.reporter = None  # trackers of --report-to (rank 0, while training)
        self.identity = dict(identity or {})
        self.labels = labels or {}
        self.skipped_steps = 0  # steps skipped for a non-finite loss or gradient, over the whole run
        self.streak: list[int] = []  # the steps skipped in a row up to now
        self.streak_parts: list[str] = []  # what was non-finite in them
        self.last_saved: int | None = None  # the newest checkpoint's step (all of them hold finite weights)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.backend.setup()
        self.rank, self.world = dist.rank(), dist.world_size()
        torch.manual_seed(cfg.seed)
        load = memreport.LoadMeter()
        model = self.task.build_model()
        load.done("train", model, compute_dtype(cfg.precision))
        self.dataset = self.task.dataset()
        n = len(self.dataset)
        self.global_batch = cfg.micro_batch * cfg.grad_accum * self.world
        self.steps_per_epoch = math.ceil(n / self.global_batch)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        self.identity[resume.WORLD] = self.world
        self.step = 0
        found = self._checkpoint_to_resume() if cfg.resume else None
        if found is None:
            self.task.initialize(model)  # e.g. --init-from: never over a checkpoint a run resumes from
        self.segments = self._schedule_segments(found[1] if found else None)
        self.warmup_steps = warmup_steps_for(cfg.lr_schedule, self.segments[0][1], cfg.warmup_ratio)
        self.backend.wrap(model, chained_lambda(cfg.lr_schedule, self.segments, cfg.warmup_ratio))
        memreport.engine_done(self.backend.module)
        self.module = self.backend.module
        self.task.prepare(self.module, self.dataset, self.backend.device)
        if found:
            self._load(*found)
        if dist.is_main():
            self._write_run_info()

    def _geometry(self) -> dict[str, Any]:
        c = self.cfg
        return {"world_size": self.world, "micro_batch": c.micro_batch, "grad_accum": c.grad_accum,
                "engine": c.engine, "zero_stage": c.zero_stage, "seed": c.seed, "dataset_size": len(self.dataset)}

    def _checkpoint_to_resume(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest intact checkpoint and its state, checked against this run's options."""
        # rank 0 verifies the checksums (newest first); every rank loads the same checkpoint
        found, problems = ckpt.newest_intact(self.ckpt_root) if dist.is_main() else (None, [])
        found, problems = dist.broadcast_object((str(found) if found else None, problems))
        if dist.is_main():
            for problem in problems:
                logs.say(f"warning: skipping damaged checkpoint {problem}")
        if found is None:
            if problems:
                raise ConfigError(f"--resume: no intact checkpoint in {self.ckpt_root} ({'; '.join(problems)})")
            if dist.is_main():
                logs.say(f"no complete checkpoint in {self.ckpt_root}: starting from step 0")
            return None
        last = Path(found)
        state = ckpt.read_state(last)
        if "identity" in state:
            resume.check(state["identity"], self.identity, str(last), self.labels)
        else:  # written before checkpoints recorded their options: the batch geometry at least
            diff = {k: (state["geometry"].get(k), v) for k, v in self._geometry().items()
                    if state["geometry"].get(k) != v}
            if diff:
                raise ConfigError(f"--resume from {last}: the run differs from the checkpoint in "
                                  + ", ".join(f"{k} (checkpoint {a}, now {b})" for k, (a, b) in diff.items()))
        resume.check_length(int(state["step"]), self.total_steps, str(last))
        return last, state

    def _schedule_segments(self, state: dict[str, Any] | None) -> list[tuple[int, int]]:
        """The run's schedule segments (``schedule.chained_lambda``): one more when a resumed run
        ends at another step than its checkpoint planned."""
        if state is None:
            return [(0, self.total_steps)]
        segments = [(int(a), int(b)) for a, b in state.get("schedule") or [(0, state["total_steps"])]]
        step, planned = int(state["step"]), segments[-1][1]
        if planned != self.total_steps:
            if len(segments) > 1 and segments[-1][0] == step:
                segments.pop()  # changed again before any step of the last change ran
            segments.append((step, self.total_steps))
            if dist.is_main():
                logs.say(f"note: the run now ends at step {self.total_steps} (planned: {planned}); the learning "
                         f"rate goes on from its value at step {step} ({self.cfg.lr_schedule} schedule)")
        return segments

    def _load(self, last: Path, state: dict[str, Any]) -> None:
        self.backend.load(last)
        ckpt.load_rng(last / f"rng-rank{self.rank}.safetensors")
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.last_saved = self.step
        if dist.is_main():
            _truncate_metrics(self.run_dir / METRICS_FILE, self.step)
            _truncate_metrics(self.run_dir / "data_order.csv", self.step, header=False)
            logs.say(f"resumed from {last} (step {self.step} of {self.total_steps})")

    def _write_run_info(self) -> None:
        write_json_atomic(self.run_dir / "run.json", {
            **self._geometry(), "launcher": self.cfg.launcher or self.cfg.engine,
            "device": str(self.backend.device), "process_group": dist.backend_name() if self.world > 1 else None,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps, "schedule_segments": self.segments,
            "trainable_param_count": sum(p.numel() for _, p in self.backend.trainable),
            "optimizer_param_count": self.backend.optimizer_param_count()})

    # ------------------------------------------------------------------ loop
    def batches(self, epoch: int, skip_steps: int):
        c = self.cfg
        order = epoch_order(len(self.dataset), epoch, c.seed, self.global_batch)
        mbs = rank_batches(order, c.micro_batch, c.grad_accum, self.world, self.rank)[skip_steps * c.grad_accum:]
        # a loader process's lm4lv error comes back as the batch and is raised here as it was
        loader = torch.utils.data.DataLoader(
            CarryErrors(self.dataset), batch_sampler=mbs, collate_fn=carrying_errors(self.task.collate),
            num_workers=c.num_workers,
            generator=torch.Generator().manual_seed(c.seed + epoch),  # never draws from the global RNG
            worker_init_fn=signals.ignore_interrupts)
        return iter(loader)

    def train(self) -> dict[str, Any]:
        self.setup()
        c, task, be = self.cfg, self.task, self.backend
        stop_at = min(self.total_steps, self.step + c.stop_after) if c.stop_after else self.total_steps
        names = task.metric_names
        progress = _Progress(self.total_steps, self.step) if dist.is_main() else None
        self.reporter = _reporter(self.run_dir, c, self.step) if dist.is_main() else None
        try:
            while self.step < stop_at:
                epoch, k = divmod(self.step, self.steps_per_epoch)
                it = self.batches(epoch, k)
                for _ in range(k, self.steps_per_epoch):
                    if self.step >= stop_at:
                        break
                    t0 = time.perf_counter()
                    meter = memreport.StepMeter()  # measures one step with LM4LV_MEMORY_REPORT set
                    lr = be.lr()
                    sums = torch.zeros(len(names))
                    ids: list[int] = []
                    for j in range(c.grad_accum):
                        batch = raise_carried(next(it)).to(be.device)
                        ids += task.batch_ids(batch)
                        boundary = j == c.grad_accum - 1
                        with be.no_sync(boundary), be.autocast():
                            out = task.loss(be.forward, batch)
                        meter.backward()
                        be.backward(out["loss"])
                        sums += torch.stack([out[n].detach().float().cpu() for n in names]) / c.grad_accum
                        if not boundary:
                            be.step(False)
                    # the losses of every rank and the stop flag, before the update: every rank
                    # skips a non-finite step and stops after the same step alike
                    sums = torch.cat([sums, torch.tensor([float(signals.requested())])])
                    means = dist.all_reduce_mean(sums.to(be.device) if be.device.type == "cuda" else sums).cpu()
                    stop, means = bool(means[-1] > 0) and self.step + 1 < stop_at, means[:-1]
                    bad = [n for n, v in zip(names, means.tolist()) if not math.isfinite(v)]
                    outcome = be.step(True, skip=bool(bad))
                    meter.done()
                    self.step += 1
                    self._count_skip(outcome.nonfinite, bad)
                    row = {"step": self.step, **{n: float(v) for n, v in zip(names, means)}, "lr": lr,
                           "samples/s": self.global_batch / (time.perf_counter() - t0),
                           "skipped_steps": self.skipped_steps}
                    self._log(row, ids, progress)
                    if len(self.streak) >= c.max_skipped_steps:
                        raise self._diverged()
                    if c.preview_every and self.step % c.preview_every == 0:
                        self.preview()
                    saved = False
                    if self.step % c.save_every == 0 or self.step == stop_at or stop:
                        saved = self._save_unless_skipped()
                    if stop:
                        raise Interrupted(f"interrupted at step {self.step}; continue with --resume" if saved else
                                          f"interrupted at step {self.step}, whose loss was non-finite, so the newest "
                                          f"checkpoint stays step {self.last_saved}; continue with --resume")
        finally:
            if progress:
                progress.close()
            if self.reporter:
                self.reporter.close()
        finished = self.step >= self.total_steps
        if finished:
            if self.streak:  # the last steps' losses were non-finite: their weights are no result
                raise self._diverged()
            self.save_final()
        dist.barrier()
        return {"step": self.step, "total_steps": self.total_steps, "finished": finished,
                "world_size": self.world, "skipped_steps": self.skipped_steps}

    def _count_skip(self, skipped: bool, parts: list[str]) -> None:
        """Count a step skipped for a non-finite loss (``parts``: the loss parts) or gradient."""
        if not skipped:
            self.streak, self.streak_parts = [], []
            return
        self.skipped_steps += 1
        self.streak.append(self.step)
        what = parts or ["gradient"]
        self.streak_parts += [p for p in what if p not in self.streak_parts]
        if dist.is_main():
            logs.say(f"warning: step {self.step} skipped: non-finite {', '.join(what)} (weights unchanged; "
                     f"{len(self.streak)} in a row, the run stops at {self.cfg.max_skipped_steps})")

    def _diverged(self, weights: list[str] | None = None) -> Diverged:
        c = self.cfg
        if weights:
            what = f"non-finite weights at step {self.step} ({', '.join(weights[:3])})"
        else:
            steps = f"step {self.streak[0]}" if len(self.streak) == 1 else f"steps {self.streak[0]}-{self.streak[-1]}"
            what = f"non-finite {', '.join(self.streak_parts)} at {steps} (skipped, --max-skipped-steps " \
                   f"{c.max_skipped_steps})"
            if self.step >= self.total_steps and len(self.streak) < c.max_skipped_steps:
                what += ", the run's last steps: final/ not written"
        newest = (f"the newest checkpoint {ckpt.step_dir(self.ckpt_root, self.last_saved)} holds finite weights"
                  if self.last_saved is not None else "no checkpoint was written")
        return Diverged(f"training diverged: {what}; {newest}; lower --lr (now {c.lr:g}) or clip gradients with "
                        f"--grad-clip (now {c.grad_clip:g}) and start again")

    def _log(self, row: dict[str, Any], ids: list[int], progress) -> None:
        if self.cfg.record_order:
            all_ids = dist.all_gather_objects(ids)
            if dist.is_main():
                order = self.run_dir / "data_order.csv"
                with writing(order), open(order, "a", encoding="utf-8") as f:
                    for r, rid in enumerate(all_ids):
                        f.write(f"{row['step']},{r},{' '.join(map(str, rid))}\n")
        if not dist.is_main():
            return
        path = self.run_dir / METRICS_FILE
        new = not path.exists()
        with writing(path), open(path, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        if self.reporter:
            self.reporter.scalars(row)
        if progress:
            progress.update(row)

    # ------------------------------------------------------------------ outputs
    def preview(self) -> None:
        ids = self.task.preview_items(self.dataset, self.cfg.preview_samples)
        if not ids:
            return
        batch = self.task.preview_batch(self.dataset, ids).to(self.backend.device)
        path = self.run_dir / "previews" / f"step-{self.step}.png" if dist.is_main() else None
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad(), self.backend.autocast():
                self.task.preview(self.module, batch, path, self.backend.gathered)
        finally:
            self.module.train(was_training)
        if path is not None and self.reporter:
            self.reporter.image(path, self.step)

    def _save_unless_skipped(self) -> bool:
        """Save a checkpoint, except at a step whose loss was non-finite (its weights just failed)."""
        if self.streak:
            if dist.is_main():
                logs.say(f"warning: no checkpoint at step {self.step}: its loss was non-finite "
                         f"(the newest stays step {self.last_saved})")
            return False
        self.save()
        return True

    def save(self) -> None:
        weights = self.backend.full_trainable_state_dict()  # (the same full copy on every rank)
        bad = nonfinite_names(weights)
        if bad:
            raise self._diverged(weights=bad)
        tmp = ckpt.tmp_dir(self.ckpt_root, self.step)
        try:
            if dist.is_main():
                ckpt.begin(self.ckpt_root, self.step)
            dist.barrier()
            self.backend.save(tmp, weights)
            ckpt.save_rng(tmp / f"rng-rank{self.rank}.safetensors")
            dist.barrier()
            if dist.is_main():
                epoch, k = divmod(self.step, self.steps_per_epoch)
                ckpt.commit(self.ckpt_root, self.step,
                            {"step": self.step, "epoch": epoch, "step_in_epoch": k, "total_steps": self.total_steps,
                             "schedule": self.segments, "skipped_steps": self.skipped_steps,
                             "geometry": self._geometry(), "identity": self.identity},
                            keep=self.cfg.keep_checkpoints)
        except Exception as e:
            cause = write_failure(e)
            if cause is None:
                raise
            if self.world == 1:  # (with several workers the next run removes it)
                shutil.rmtree(tmp, ignore_errors=True)
            raise OutputError(f"cannot write checkpoint {ckpt.step_dir(self.ckpt_root, self.step)}: {cause}; "
                              "the earlier checkpoints are intact", cause) from None
        self.last_saved = self.step
        if dist.is_main():
            self._plot()
        dist.barrier()

    def save_final(self) -> None:
        weights = self.backend.full_state_dict(self.task.saved_parameter_names(self.module))
        bad = nonfinite_names(weights)
        if bad:
            raise self._diverged(weights=bad)
        if dist.is_main():
            final, tmp = self.run_dir / "final", self.run_dir / f"{TEMP_PREFIX}final"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                with writing(final):
                    self.task.save_final(self.module, weights, tmp)
                    if final.exists():
                        for entry in final.iterdir():  # a file the user put there stays in the new final/
                            if not (tmp / entry.name).exists() and not entry.name.startswith(TEMP_PREFIX):
                                entry.replace(tmp / entry.name)
                        old = self.run_dir / f"{TEMP_PREFIX}final-old"
                        final.replace(old)
                        shutil.rmtree(old)
                    tmp.replace(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self._plot()

    def _plot(self) -> None:
        from .plots import plot_metrics

        try:
            plot_metrics(self.run_dir / METRICS_FILE, self.run_dir / "loss.png")
        except Exception as e:  # noqa: BLE001 - a plot must never stop training
            logs.say(f"warning: loss.png not written ({e})")
        try:
            from ..report.run_page import write_run_report

            write_run_report(self.run_dir, METRICS_FILE)
        except Exception as e:  # noqa: BLE001 - a report must never stop training
            logs.say(f"warning: report.html not written ({e})")


def _reporter(run_dir: Path, cfg: TrainConfig, step: int):
    from .reporting import Reporter, parse_report_to

    names = parse_report_to(cfg.report_to)
    return Reporter(run_dir, names, resume_step=step) if names else None


def _truncate_metrics(path: Path, step: int, header: bool = True) -> None:
    """Drop CSV rows (first column: step) after ``step``, written after the checkpoint a run resumes from."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    head, rows = (lines[:1], lines[1:]) if header else ([], lines)
    keep = head + [ln for ln in rows if ln.split(",", 1)[0].isdigit() and int(ln.split(",", 1)[0]) <= step]
    path.write_text("".join(keep), encoding="utf-8")


class _Progress:
    """Rich progress bar with the latest losses (rank 0 only)."""

    def __init__(self, total: int, start: int) -> None:
        from ..util.progress import progress_bar

        # progress and status go to the console's stderr: stdout stays free for results (e.g. a benchmark's JSON)
        self.bar = progress_bar("[bold]train", total, completed=start, transient=False, info=True).start()

    def update(self, row: dict[str, Any]) -> None:
        info = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("step",) and isinstance(v, float))
        self.bar.update(row["step"], info=info)

    def close(self) -> None:
        self.bar.close()
