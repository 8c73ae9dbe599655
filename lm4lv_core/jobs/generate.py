"""``lm4lv generate``: the parent checks the job and sets up the output folder
(:mod:`lm4lv_core.data.outputs`), every worker generates its share of the data file.

Correctness under several workers, kills and re-runs:

* every rank reads the finished records, then (after a barrier, before anyone writes) deals the
  unfinished samples round-robin: the same list on every rank, so each has exactly one owner and
  a resumed run shares the remaining work evenly;
* each worker writes an image atomically, then appends its record to its own part file; rank 0
  merges all records into ``results.jsonl`` after a barrier;
* a stop request (SIGTERM / Ctrl-C, :mod:`lm4lv_core.util.signals`) ends each worker after its current
  batch; finished samples are merged and kept, and a re-run generates the rest.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelConfig, from_dict, to_dict
from ..data.format import Sample, load_checked
from ..data.outputs import (PARTS, RESULTS, append_line, finished_records, image_names, manifest, merge_results,
                            output_stems, prepare_out, sample_hash)
from ..defaults import ATTN_AUTO, GENERATE_BATCH_SIZE, JOB_DIR
from ..engine import launch
from ..engine.launch import Workers, register_job
from ..engine.model_source import find_model
from ..errors import ConfigError, Interrupted
from ..precision import FP32, precision
from ..model.generate import GenerationConfig
from ..util.finite import require_finite
from ..util.progress import rank0_progress

LOG_FILE = "generate.log"


def new_attempt() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"


@dataclass(kw_only=True)
class GenerateJob:
    """What every ``generate`` worker receives (paths absolute, ``model`` a saved model folder)."""

    model: str
    data: str
    out: str
    image_root: str | None = None
    batch_size: int = GENERATE_BATCH_SIZE
    precision: str = FP32
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    attempt: str = field(default_factory=new_attempt)  # names this run's part files
    compile: bool = False
    attn_implementation: str = ATTN_AUTO  # auto: what transformers picks for the LLM's family
    model_config: ModelConfig | None = None  # a training checkpoint's model (its run's config.yaml)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        precision(self.precision)  # an unknown name is a one-line error
        require_finite(self.generation, ("temperature", "top_p"))
        if isinstance(self.model_config, dict):
            self.model_config = from_dict(ModelConfig, self.model_config, source="generate job: model_config")


class _StopAfterBatch(Exception):
    """Raised after a finished batch when a stop was requested."""



# ---------------------------------------------------------------------------- the job
@dataclass
class GenerateSummary:
    """Samples finished before and after a ``generate`` run, of ``total``; ``dropped``: training
    samples whose last answer was dropped to be generated."""

    before: int
    after: int
    total: int
    dropped: int
    results: Path


def generate(run: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
             image_root: str | os.PathLike | None = None, batch_size: int = GENERATE_BATCH_SIZE,
             precision: str = FP32, generation: GenerationConfig | None = None,
             workers: Workers | None = None, overwrite: bool = False, compile: bool = False,
             attn_implementation: str = ATTN_AUTO, verbose: bool = False, on_note=None,
             html: str | os.PathLike | None = None) -> GenerateSummary:
    """Parent side of ``lm4lv generate``: check the options, the model and the data, set up the
    output folder, run the workers and count what is finished. ``on_note(text)`` receives notes
    for the user (e.g. answers dropped from training samples); ``html``: the generation's
    comparison page (:mod:`.generate_page`)."""
    from ..util.runlock import hold

    if html:
        from ..report.html import check_page_target

        check_page_target(html, overwrite)

    gen = generation or GenerationConfig()
    source = find_model(run)
    if source.note and on_note:
        on_note(source.note)
    saved = source.model
    gen.resize = gen.resize or saved.resize
    job = GenerateJob(model=str(source.path), data=str(Path(data).resolve()), out=str(Path(out).resolve()),
                      image_root=str(Path(image_root).resolve()) if image_root else None, batch_size=batch_size,
                      precision=precision, generation=gen, compile=compile, attn_implementation=attn_implementation,
                      model_config=source.config)
    workers = (workers or Workers()).resolve()
    _check_device(job)
    tiling = _check_tiling(saved, gen)
    samples = load_checked(job.data, image_root=job.image_root, mode="generate")
    if tiling is not None:
        from ..model.tiled import check_tile_samples

        check_tile_samples(samples)
    bad = next((s for s in samples if s.has_query), None) if not saved.query else None
    if bad is not None:
        raise ConfigError(f"{job.data}: sample {bad.index}: its prompt holds <query>, but the model in "
                          f"{source.path} was trained without <query> (it has no learnable query)")
    dropped = sum(s.answer_dropped for s in samples)
    if dropped and on_note:
        on_note(f"note: {dropped} of {len(samples)} samples in {job.data} end with an answer (training format); "
                "each last answer is dropped and generated")
    out = Path(job.out)
    node = workers.node if workers.per_node else None  # several nodes: node 0 sets up the shared folder
    # one run per folder (per node); removes temporary files of killed runs
    with hold(out, "generate", node=node, shared=(JOB_DIR,)), launch.on_node(workers, out / JOB_DIR, out / LOG_FILE):
        if not node:
            prepare_out(out, manifest(job.model, job.data, job.precision, to_dict(job.generation)), overwrite, JOB_DIR)
        counts = launch.run_job("generate", job, job_dir=out / JOB_DIR, workers=workers, log_file=out / LOG_FILE,
                                verbose=verbose)
    if html:
        from .generate_page import generation_page

        generation_page(html, out, job.data, job.image_root)
    return GenerateSummary(counts["skipped"], counts["finished"], len(samples), dropped, out / RESULTS)


def _check_tiling(saved: ModelConfig, gen: GenerationConfig):
    """``--tile`` / ``--tile-overlap`` checked against the model before anything is written."""
    from ..model.tiled import config_tiling

    return config_tiling(saved, gen)


def _check_device(job: GenerateJob) -> None:
    """fp16 and flash attention need a GPU; ``--compile`` needs a working compiler."""
    launch.require_gpu_for(job.precision)
    if job.attn_implementation or job.compile:
        import torch

        from ..model.compiled_decode import check_compile_available
        from ..model.loading import check_attn_implementation
        from ..precision import compute_dtype

        if job.attn_implementation:
            check_attn_implementation(job.attn_implementation, dtype=compute_dtype(job.precision))
        if job.compile:
            check_compile_available(torch.device("cuda" if launch.has_cuda() else "cpu"))


@register_job("generate", GenerateJob)
def generate_job(job: GenerateJob) -> dict[str, int]:
    """Worker entry: generate this rank's unfinished samples; rank 0 merges the results.
    Returns counts ``{"generated", "skipped", "finished", "total"}``: ``generated`` of this rank; on
    rank 0 ``skipped`` = samples finished before this run, ``finished`` = after it.
    """
    from ..model.generate import generate_samples, output_image
    from ..precision import compute_dtype
    from ..image.io import oriented_size, save_png
    from ..model.lm4lv import LM4LV
    from ..util import dist, memreport, signals

    dist.init_distributed()
    rank, world = dist.rank(), dist.world_size()
    out, cfg = Path(job.out), job.generation
    samples = load_checked(job.data, image_root=job.image_root, mode="generate", check_files=False)
    stems = output_stems(samples)
    done = finished_records(out, samples, stems)
    dist.barrier()  # every rank has read the same records before any rank writes new ones
    todo = [s for s in samples if s.index not in done]
    mine = todo[rank::world]  # unfinished work is shared evenly, also on a resumed run
    skipped = len(done) if rank == 0 else 0
    finished = 0
    stopped = bool(mine) and signals.requested()
    if mine and not stopped:
        dtype = compute_dtype(job.precision)
        load = memreport.LoadMeter()  # measures only with LM4LV_MEMORY_REPORT set
        model = LM4LV.from_pretrained(job.model, dtype=dtype, attn_implementation=job.attn_implementation,
                                      config=job.model_config)
        load.done("generate", model, dtype)
        model = model.to(dist.device()).eval()
        part = out / PARTS / f"rank-{rank}-{job.attempt}.jsonl"
        part.parent.mkdir(parents=True, exist_ok=True)
        label = "generate" + (f" (rank 0 of {world})" if world > 1 else "")
        if cfg.tile is not None:  # at native resolution, in tiles
            stopped = _generate_tiled(model, mine, cfg, job, stems, part, rank, world)
        else:
            with open(part, "a", encoding="utf-8") as f, rank0_progress(label, len(mine), show=rank == 0) as advance:
                def write(chunk: list[Sample], outs) -> None:
                    for s, o in zip(chunk, outs):
                        names = image_names(stems[s.index], len(o.images))
                        size = oriented_size(s.images[0]) if s.images and o.images else None
                        for name, img in zip(names, o.images):
                            save_png(output_image(img, size, cfg, model), out / name)
                        rec = {"index": s.index, "inputs": list(s.images), "outputs": names, "text": o.text,
                               "worker": rank, "sample": sample_hash(s)}
                        rec.update({k: v for k, v in s.extra if k not in rec})
                        append_line(f, rec)
                    advance(len(chunk))
                    if signals.requested():
                        raise _StopAfterBatch

                try:
                    generate_samples(model, mine, cfg, batch_size=job.batch_size, on_batch=write, compile=job.compile)
                except _StopAfterBatch:
                    stopped = True
    dist.barrier()
    stopped = any(dist.all_gather_objects(stopped))
    if rank == 0:
        finished = merge_results(out, samples)
    dist.barrier()
    if stopped and rank == 0:
        raise Interrupted(f"interrupted: {finished} of {len(samples)} samples finished and kept; "
                          "run the same command again to generate the rest")
    return {"generated": len(mine), "skipped": skipped, "finished": finished, "total": len(samples)}


def _generate_tiled(model, mine: list[Sample], cfg: GenerationConfig, job: GenerateJob, stems, part: Path,
                    rank: int, world: int) -> bool:
    """``generate --data --tile``: this rank's samples restored at their own resolution, tiles of
    many samples batched together; each sample's record is written when its last tile is in.
    Returns whether a stop was requested."""
    from PIL import Image

    from ..image.io import save_png
    from ..model.tiled import TileProgress, generate_tiled, model_tiling, tile_count
    from ..util import signals

    out = Path(job.out)
    tiling = model_tiling(model, cfg)
    label = "generate" + (f" (rank 0 of {world})" if world > 1 else "")
    with open(part, "a", encoding="utf-8") as f, \
            TileProgress(label, tile_count([s.images[0] for s in mine], tiling), len(mine), show=rank == 0) as bar:
        def write(i: int, s: Sample, pixels) -> None:
            names = image_names(stems[s.index], 1)
            save_png(Image.fromarray(pixels), out / names[0])
            rec = {"index": s.index, "inputs": list(s.images), "outputs": names, "text": "<image>",
                   "worker": rank, "sample": sample_hash(s)}
            rec.update({k: v for k, v in s.extra if k not in rec})
            append_line(f, rec)

        def after_batch(tiles: int, images: int) -> None:
            bar.advance(tiles, images)
            if signals.requested():
                raise _StopAfterBatch

        try:
            generate_tiled(model, mine, cfg, tiling, batch_size=job.batch_size, on_image=write,
                           on_batch=after_batch, compile=job.compile)
        except _StopAfterBatch:
            return True
    return False


# ---------------------------------------------------------------------------- restoring image files
@dataclass(kw_only=True)
class RestoreJob:
    """What every worker of ``lm4lv generate --input`` receives: the images still to restore
    (``items``: ``RestoreItem`` fields), written under ``out`` (paths absolute)."""

    model: str
    out: str
    prompt: str
    items: list[dict] = field(default_factory=list)
    total: int = 0  # images of the whole run, finished ones included
    batch_size: int = GENERATE_BATCH_SIZE
    precision: str = FP32
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    compile: bool = False
    attn_implementation: str = ATTN_AUTO
    model_config: ModelConfig | None = None  # a training checkpoint's model (its run's config.yaml)
    on_error: str = "stop"  # skip: an image that fails in a worker is left out and reported back

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.on_error not in ("stop", "skip"):
            raise ConfigError(f"--on-error must be one of stop, skip, got {self.on_error!r}")
        precision(self.precision)
        if isinstance(self.model_config, dict):
            self.model_config = from_dict(ModelConfig, self.model_config, source="restore job: model_config")


@dataclass
class RestoreSummary:
    """Images finished before and after a ``generate --input`` run, of ``total``, under ``out``."""

    before: int
    after: int
    total: int
    out: Path
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) left out by on_error="skip"


def restore_inputs(run: str | os.PathLike, inputs: list[str | os.PathLike], out: str | os.PathLike, *,
                   prompt: str | None = None, batch_size: int = GENERATE_BATCH_SIZE, precision: str = FP32,
                   generation: GenerationConfig | None = None, workers: Workers | None = None,
                   overwrite: bool = False, compile: bool = False, attn_implementation: str | None = None,
                   html: str | os.PathLike | None = None,
                   verbose: bool = False, on_note=None, on_error: str = "stop") -> RestoreSummary:
    """Parent side of ``lm4lv generate --input``: restore image files and folders into ``out``
    (mirrored paths, see :func:`lm4lv_core.data.outputs.plan_restore`) with ``prompt``, else the
    run's recorded restoration prompt (:func:`lm4lv_core.model.restore.restore_prompt`); re-runs skip
    restored images, ``overwrite`` redoes them.
    Every input is checked first (readable, decodable in this machine's memory): ``on_error="stop"``
    refuses the job naming the bad files, ``"skip"`` restores the rest and lists them in
    ``OUT/failures.csv`` (``RestoreSummary.failures``). An image that passes that check but fails in
    a worker (e.g. a file cut off in its pixel data) stops the job under ``"stop"``; under ``"skip"``
    it gets no output and joins the list (the workers hand their failures back with their result).
    ``on_note(text)`` receives notes for the user (e.g. which checkpoint restores)."""
    from ..data.format import find_image_problems
    from ..data.outputs import prepare_restore_out, plan_restore, restore_manifest
    from ..model.restore import image_config, restore_prompt, restore_samples
    from ..util.runlock import hold

    gen = image_config(generation)
    source = find_model(run)
    if source.note and on_note:
        on_note(source.note)
    saved = source.model
    gen.resize = gen.resize or saved.resize
    out = Path(out).resolve()
    job = RestoreJob(model=str(source.path), out=str(out), prompt=restore_prompt(saved.restore_prompt, prompt),
                     batch_size=batch_size, precision=precision, generation=gen, compile=compile,
                     attn_implementation=attn_implementation, model_config=source.config, on_error=on_error)
    _check_device(job)
    _check_tiling(saved, gen)
    workers = (workers or Workers()).resolve()
    if workers.per_node:
        raise ConfigError("generate --input runs on one node (--nproc workers); for several nodes give the "
                          "images as a --data file")
    if on_error not in ("stop", "skip"):
        raise ConfigError(f"--on-error must be one of stop, skip, got {on_error!r}")
    if html:
        from ..report.html import check_page_target

        check_page_target(html, overwrite)
    items = plan_items = plan_restore(inputs, out)
    skip = on_error == "skip"
    problems = find_image_problems(restore_samples(items, job.prompt), limit=len(items) if skip else 10)
    failures: list[tuple[str, str]] = []
    if problems and not skip:  # "sample K: PATH: cause" -> "PATH: cause"
        more = " (the first 10)" if len(problems) >= 10 else ""
        raise ConfigError(f"--input: {len(problems)} unreadable image(s){more}: "
                          + "; ".join(p.split(": ", 1)[1] for p in problems))
    if problems:
        by_key = {str(it.key): it for it in items}
        for prob in problems:  # "sample K: PATH: cause"
            key, _, rest = prob.removeprefix("sample ").partition(": ")
            it = by_key.get(key)
            if it is not None and rest.startswith(it.src + ": "):
                failures.append((it.src, rest[len(it.src) + 2:]))
        bad = {p for p, _ in failures}
        items = [it for it in items if it.src not in bad]
    with hold(out, "generate"):
        new = restore_manifest(job.model, job.precision, to_dict(gen), job.prompt, [str(p) for p in inputs])
        todo = prepare_restore_out(out, new, items, overwrite, (JOB_DIR, LOG_FILE, FAILURES_FILE))
        if failures:
            from .evaluate import write_failures

            write_failures(out / FAILURES_FILE, failures)
        else:
            (out / FAILURES_FILE).unlink(missing_ok=True)
        job.items, job.total = [vars(it) for it in todo], len(items)
        if todo:
            result = launch.run_job("restore", job, job_dir=out / JOB_DIR, workers=workers,
                                    log_file=out / LOG_FILE, verbose=verbose)
            failed = [(src, reason) for src, reason in (result or {}).get("failures", [])]
            if failed:  # images that failed in the workers, with those the check left out, in input order
                order = {it.src: it.key for it in plan_items}
                failures = sorted(failures + failed, key=lambda f: order.get(f[0], len(order)))
                from .evaluate import write_failures

                write_failures(out / FAILURES_FILE, failures)
    after = sum((out / it.dst).is_file() for it in items)
    if html:
        from .generate_page import restoration_page

        restoration_page(html, out, items)
    return RestoreSummary(len(items) - len(todo), after, len(plan_items), out, failures)


FAILURES_FILE = "failures.csv"  # generate --input --on-error skip: path,reason of the inputs left out


@register_job("restore", RestoreJob)
def restore_job(job: RestoreJob) -> dict:
    """Worker entry: restore this rank's share of ``job.items`` (round-robin); returns this
    rank's count ``{"restored"}`` and the images every rank left out under ``on_error="skip"``
    (``{"failures": [[path, reason], ...]}``, merged on every rank: rank 0's result reaches the parent)."""
    from ..data.outputs import RestoreItem
    from ..model.lm4lv import LM4LV
    from ..model.restore import restore_items
    from ..precision import compute_dtype
    from ..util import dist, memreport, signals

    dist.init_distributed()
    rank, world = dist.rank(), dist.world_size()
    items = [RestoreItem(**d) for d in job.items]
    mine = items[rank::world]
    stopped = bool(mine) and signals.requested()
    failures: list[list[str]] = []
    if mine and not stopped:
        dtype = compute_dtype(job.precision)
        load = memreport.LoadMeter()
        model = LM4LV.from_pretrained(job.model, dtype=dtype, attn_implementation=job.attn_implementation,
                                      config=job.model_config)
        load.done("generate", model, dtype)
        model = model.to(dist.device()).eval()
        label = "restore" + (f" (rank 0 of {world})" if world > 1 else "")
        tiled = job.generation.tile is not None
        if tiled:  # progress in tiles, and images finished
            from ..model.tiled import TileProgress, model_tiling, tile_count

            progress = TileProgress(label, tile_count([it.src for it in mine], model_tiling(model, job.generation)),
                                    len(mine), show=rank == 0)
        else:
            progress = rank0_progress(label, len(mine), show=rank == 0, rate=True)
        with progress as bar:
            advance = bar.advance if tiled else bar

            def after_batch(*n: int) -> None:
                advance(*n)
                if signals.requested():
                    raise _StopAfterBatch

            def failed(it: RestoreItem, reason: str) -> None:
                failures.append([it.src, reason])

            try:
                restore_items(model, mine, job.out, job.prompt, cfg=job.generation, batch_size=job.batch_size,
                              compile=job.compile, on_batch=after_batch, on_tiles=True,
                              on_failure=failed if job.on_error == "skip" else None)
            except _StopAfterBatch:
                stopped = True
    dist.barrier()
    outcomes = dist.all_gather_objects((stopped, failures))  # every rank's: rank 0 returns them all
    stopped = any(s for s, _ in outcomes)
    if stopped and rank == 0:
        out = Path(job.out)
        done = job.total - len(items) + sum((out / it.dst).is_file() for it in items)
        raise Interrupted(f"interrupted: {done} of {job.total} images restored and kept; "
                          "run the same command again to restore the rest")
    return {"restored": len(mine) - len(failures), "failures": [f for _, fs in outcomes for f in fs]}
