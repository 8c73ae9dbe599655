"""Build LM4LV restoration datasets: clean images + degradations -> PNG pairs + JSON.

Layout of ``DATA_DIR`` (relative paths of the clean images are kept, extensions become
``.png``)::

    hq/<rel>.png                  clean image after the size policy
    lq/<degradation>/<rel>.png    degraded image, one folder per --degradation
    test/hq/..., test/lq/...      only with a separate test folder (``test_dir``)
    train.json, test.json         samples in the LM4LV JSON format, absolute paths
    manifest.json                 every parameter, the seed and package versions

Size policy (``size > 0``), chosen by ``resize``: ``stretch`` (the default, as the reference)
resizes the image to ``size x size`` whatever its aspect ratio; ``crop`` resizes the shorter side
to ``size`` and keeps the centre ``size x size`` square. Both use Pillow's bicubic filter
(antialiased when shrinking); ``size = 0`` keeps the original size. Degradations are applied
after this.

Reproducibility: the generator of each (image, degradation) is seeded from the seed, the
image's output path and the degradation index, so outputs are byte-identical whatever the
number of workers. The output is built in a hidden sibling folder (``.lm4lv-tmp-NAME.partial.*``)
and renamed into place at the end; on any error (a full disk included) that folder is removed and
``DATA_DIR`` is untouched. While it runs, ``.lm4lv-lock-NAME`` beside ``DATA_DIR`` keeps a second
make-data out of the same folder; the next run removes what a killed one left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import platform
import shutil
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from .. import __version__
from ..defaults import DEFAULT_PROMPT, SIZE_POLICY  # noqa: F401 (SIZE_POLICY: re-exported)
from .configs import MakeDataConfig  # noqa: F401 (its config, re-exported)
from ..image.degrade import Pipeline, parse_spec
from ..errors import ConfigError, LM4LVError
from ..util.fsutil import JsonStream, temp_dir, user_entries, write_json_atomic, writing
from ..image.io import (RESIZE_POLICIES, check_resize, require_images, load_rgb, save_png,
                      to_square)

OUR_ENTRIES = ("hq", "lq", "test", "train.json", "test.json", "manifest.json", "failures.csv")
PARTIAL_PREFIX = ".lm4lv-partial-"  # PARENT/.lm4lv-partial-NAME: a dataset being built, kept when interrupted
PARTIAL_SETTINGS = ".lm4lv-settings.json"
# bytes per pixel of one image in flight (uint8 copies and the float working copies of degradations)
BYTES_PER_PIXEL = 3 * 8 * 3
_SPLIT_TAG = 0x5B1A


@dataclass
class MakeDataResult:
    out: Path
    mode: str
    n_images: int
    n_train: int
    n_test: int
    degradations: list[str]
    unmatched_lq: list[str] = field(default_factory=list)
    unmatched_hq: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) under on_error="skip"
    resumed: int = 0  # images an interrupted run had finished, not made again


# --------------------------------------------------------------------------- per image


def apply_size_policy(img: Image.Image, size: int, resize: str = "stretch") -> np.ndarray:
    """``img`` at ``size x size`` by the size policy ``resize`` (stretch | crop); 0 = unchanged."""
    return np.asarray(to_square(img, size, resize), dtype=np.uint8)


def image_rng(seed: int, key: str, index: int) -> np.random.Generator:
    """Generator for one (image, degradation): independent of processing order."""
    words = np.frombuffer(hashlib.sha256(key.encode("utf-8")).digest()[:16], dtype="<u4")
    return np.random.default_rng(np.random.SeedSequence([seed, *map(int, words), index]))


@dataclass(frozen=True)
class _Job:
    src: Path
    key: str           # output path relative to the root, e.g. "hq/a/b.png" -> "a/b.png"
    prefix: str        # "" or "test/"
    root: Path         # folder being built
    size: int
    seed: int
    pipelines: tuple[tuple[str, Pipeline], ...]
    resize: str = "stretch"
    skip_errors: bool = False

    def outputs(self) -> list[Path]:
        return [self.root / f"{self.prefix}hq" / self.key,
                *(self.root / f"{self.prefix}lq" / slug / self.key for slug, _ in self.pipelines)]


def _process(jobs: list[_Job]) -> list[tuple[str, str]]:
    """Make the outputs of ``jobs`` (one image in memory at a time; jobs whose outputs all exist,
    from an interrupted run, are skipped); returns the ``(path, reason)`` of failed images when
    errors are skipped (their partial outputs removed)."""
    from ..util.memory import named_errors

    failed = []
    for job in jobs:
        outs = job.outputs()
        if all(o.is_file() for o in outs):
            continue
        try:
            with named_errors("make-data", job.src):
                hq = apply_size_policy(load_rgb(job.src), job.size, job.resize)
                save_png(hq, outs[0])
                for i, ((slug, pipe), dst) in enumerate(zip(job.pipelines, outs[1:])):
                    lq = pipe(hq, image_rng(job.seed, job.prefix + job.key, i))
                    save_png(lq, dst)
        except LM4LVError as e:
            if not job.skip_errors:
                raise
            for o in outs:
                o.unlink(missing_ok=True)
            msg, p = str(e), str(job.src)
            failed.append((p, msg[len(p) + 2:] if msg.startswith(p + ": ") else msg))
    return failed


def _run_jobs(jobs: "_Jobs", workers: int,
              progress: Callable[[int, int], None] | None) -> list[tuple[str, str]]:
    """Run jobs in this process or in ``workers`` spawned processes (a bounded window of
    chunks in flight); the first error cancels the rest and is re-raised. Returns the failures
    of jobs that skip errors."""
    total, done = len(jobs), 0
    failed: list[tuple[str, str]] = []
    step = max(1, min(16, total // (workers * 4))) if workers > 1 else 1
    chunks = (jobs[i:i + step] for i in range(0, total, step))
    if workers == 1 or total <= step:
        for chunk in chunks:
            failed += _process(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
        return failed
    # spawn: never fork a parent that may run threads (progress bar, torch)
    from ..plugins import load_environment

    # (each process loads the plugins of LM4LV_PLUGINS: a plugin's degradations are known there too)
    pool = ProcessPoolExecutor(min(workers, -(-total // step)), mp_context=mp.get_context("spawn"),
                               initializer=load_environment)
    try:
        pending: deque = deque()
        it = iter(chunks)
        for chunk in it:
            pending.append((len(chunk), pool.submit(_process, chunk)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            n, fut = pending.popleft()
            failed += fut.result()
            done += n
            if progress:
                progress(done, total)
            nxt = next(it, None)
            if nxt is not None:
                pending.append((len(nxt), pool.submit(_process, nxt)))
    except BrokenProcessPool:
        raise RuntimeError("make-data worker processes died; when calling make_data with "
                           "workers > 1 from a script, put the call under "
                           "`if __name__ == '__main__':`") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return failed


# --------------------------------------------------------------------------- helpers


def _check_out(cfg: MakeDataConfig) -> None:
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise LM4LVError(f"--out {out} exists and is not a folder")
    if out.is_dir() and user_entries(out):
        if not cfg.overwrite:
            raise LM4LVError(f"--out {out} is not empty; choose a new folder or pass --overwrite "
                             "to replace a dataset made by lm4lv make-data")
        if not (out / "manifest.json").is_file():
            raise LM4LVError(f"--out {out} has no manifest.json, so it was not made by lm4lv "
                             "make-data; refusing to overwrite it")


@contextlib.contextmanager
def _staging(out: Path, settings: dict[str, Any] | None = None) -> Iterator[Path]:
    """The hidden sibling ``PARENT/.lm4lv-partial-NAME`` of ``out`` to build the dataset in, moved
    into ``out`` (see :func:`_commit`) when the block ends. On an error it is removed and ``out``
    is untouched; on an interruption (Ctrl-C, SIGTERM, a kill) it stays, and the next run with
    the same ``settings`` continues it (finished images are not made again)."""
    from ..util.fsutil import remove_stale_temps

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{PARTIAL_PREFIX}{out.name}"
    record = tmp / PARTIAL_SETTINGS
    if tmp.exists():
        try:
            same = settings is not None and json.loads(record.read_text(encoding="utf-8")) == settings
        except (OSError, ValueError):
            same = False
        if same:
            remove_stale_temps(tmp)
        else:
            shutil.rmtree(tmp)
    if not tmp.exists():
        tmp.mkdir()
        if settings is not None:
            write_json_atomic(record, settings)
    try:
        yield tmp
        record.unlink(missing_ok=True)
        _commit(tmp, out)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` into ``out``; only lm4lv's own entries are replaced."""
    if not out.exists() or not any(out.iterdir()):
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        return
    trash = temp_dir(out.parent, f"{out.name}.old")
    for name in OUR_ENTRIES:
        if (out / name).exists():
            os.replace(out / name, trash / name)
    for child in sorted(tmp.iterdir()):
        os.replace(child, out / child.name)
    tmp.rmdir()
    shutil.rmtree(trash, ignore_errors=True)


def _split(keys: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Which of the sorted ``keys`` are test images (a boolean mask): a seeded permutation; at
    least one image per split when there are two or more."""
    n = len(keys)
    n_test = int(round(fraction * n))
    if n > 1 and fraction > 0:
        n_test = max(1, n_test)
    if n > 1 and fraction < 1:
        n_test = min(n - 1, n_test)
    perm = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_TAG])).permutation(n)
    mask = np.zeros(n, dtype=bool)
    mask[perm[:n_test]] = True
    return mask


def _sample(prompt: str, lq: Path, hq: Path, test: bool) -> dict[str, Any]:
    s: dict[str, Any] = {
        "image": [str(lq)] if test else [str(lq), str(hq)],
        "conversations": [{"from": "human", "value": prompt},
                          {"from": "gpt", "value": "" if test else "<image>"}],
        "task_type": "conversation",
    }
    if test:
        s["target"] = str(hq)
    return s


def _versions() -> dict[str, str]:
    import PIL
    import scipy

    return {"lm4lv": __version__, "python": platform.python_version(),
            "numpy": np.__version__, "pillow": PIL.__version__, "scipy": scipy.__version__}


@dataclass
class _Sources:
    """The clean images of a folder, sorted by output key (``a/b.png``): relative paths as strings
    (``rels[i]`` is the same object as ``keys[i]`` when they are equal), so a folder of 100 000
    images costs a few MiB."""

    root: Path
    keys: list[str]
    rels: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def _collect(root: Path, what: str) -> _Sources:
    from ..image.io import list_relative

    if not root.is_dir():
        raise LM4LVError(f"{what} {root}: not a folder")
    rels = list_relative(root)
    if not rels:
        require_images(root, what)  # its one-line error
    by_key: dict[str, str] = {}
    for r in rels:
        key = os.path.splitext(r)[0] + ".png"
        if key in by_key:
            raise LM4LVError(f"{root}: {by_key[key]} and {r} would both be written as {key}; rename one")
        by_key[key] = key if key == r else r  # equal: keep one string object for both
    del rels
    keys = sorted(by_key)
    return _Sources(root, keys, [by_key[k] for k in keys])


class _Jobs:
    """The jobs of a dataset in order (train images, then the test folder's), made on demand from
    :class:`_Sources`: ``jobs[i:j]`` is a list of :class:`_Job`."""

    def __init__(self, parts: list[tuple[_Sources, str]], tmp: Path, size: int, seed: int,
                 pipelines: tuple[tuple[str, Pipeline], ...], resize: str, skip: bool) -> None:
        self.parts, self.args = parts, (tmp, size, seed, pipelines, resize, skip)
        self.bounds = np.cumsum([0] + [len(src) for src, _ in parts])

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def job(self, i: int) -> _Job:
        k = int(np.searchsorted(self.bounds, i, side="right")) - 1
        src, prefix = self.parts[k]
        j = i - int(self.bounds[k])
        return _Job(src.root / src.rels[j], src.keys[j], prefix, *self.args)

    def __getitem__(self, sl: slice) -> list[_Job]:
        return [self.job(i) for i in range(*sl.indices(len(self)))]

    def __iter__(self) -> Iterator[_Job]:
        return (self.job(i) for i in range(len(self)))


# --------------------------------------------------------------------------- entry points


def make_data(cfg: MakeDataConfig,
              progress: Callable[[int, int], None] | None = None) -> MakeDataResult:
    """Build the dataset described by ``cfg`` into ``cfg.out`` (see the module docstring)."""
    if cfg.pairing:
        return pair_data(cfg)
    with _holding(cfg):
        return _degrade_data(cfg, progress)


def pair_data(cfg: MakeDataConfig) -> MakeDataResult:
    """Pairing mode: reference existing LQ/HQ images (paired by relative path / stem)."""
    with _holding(cfg):
        return _pair_data(cfg)


@contextlib.contextmanager
def _holding(cfg: MakeDataConfig) -> Iterator[None]:
    """The dataset folder's run lock (a second make-data into it fails at once); a full disk or an
    unwritable folder becomes one error line naming the dataset."""
    from ..util.runlock import hold

    with hold(cfg.out, "make-data", beside=True), writing(cfg.out, f"the dataset {cfg.out}"):
        yield


def _degrade_data(cfg: MakeDataConfig, progress: Callable[[int, int], None] | None) -> MakeDataResult:
    pipes = [parse_spec(s) for s in cfg.degradations]
    slugs = [p.slug for p in pipes]
    dupes = {s for s in slugs if slugs.count(s) > 1}
    if dupes:
        raise ConfigError(f"degradation given twice: {', '.join(sorted(dupes))}")
    train_src = _collect(cfg.clean_dir, "CLEAN_DIR")
    test_src = _collect(cfg.test_dir, "--test-dir") if cfg.test_dir else None
    _check_out(cfg)
    test_mask = (np.zeros(len(train_src), dtype=bool) if cfg.test_dir
                 else _split(train_src.keys, cfg.test_fraction, cfg.seed))
    if cfg.size:  # an absurd --size is refused before anything is written
        from ..util.memory import check_allocation

        check_allocation(cfg.size * cfg.size * BYTES_PER_PIXEL * cfg.workers,
                         f"make-data --size {cfg.size}: one {cfg.size}x{cfg.size} image per worker "
                         f"({cfg.workers} worker(s))")
    settings = {"clean_dir": str(cfg.clean_dir), "test_dir": str(cfg.test_dir), "size": cfg.size,
                "seed": cfg.seed, "resize": cfg.resize, "degradations": [p.spec for p in pipes],
                "version": __version__}
    skip = cfg.on_error == "skip"
    with _staging(cfg.out, settings) as tmp:
        parts = [(train_src, "")] + ([(test_src, "test/")] if test_src is not None else [])
        jobs = _Jobs(parts, tmp, cfg.size, cfg.seed, tuple(zip(slugs, pipes)), cfg.resize, skip)
        resumed = sum(all(o.is_file() for o in job.outputs()) for job in jobs) if any(tmp.iterdir()) else 0
        failures = _run_jobs(jobs, cfg.workers, progress)
        bad = {p for p, _ in failures}
        if failures:
            write_failures(tmp / "failures.csv", failures)
            if len(bad) >= len(jobs):
                raise LM4LVError(f"make-data: every one of the {len(bad)} image(s) failed; the first: "
                                 f"{failures[0][0]}: {failures[0][1]}")

        def made(test: bool) -> Iterator[tuple[str, str]]:
            """(prefix, key) of the images made into the train (or test) split, in order."""
            for src, prefix in parts:
                for j, key in enumerate(src.keys):
                    if (bool(prefix) or (src is train_src and test_mask[j])) != test:
                        continue
                    if bad and str(src.root / src.rels[j]) in bad:
                        continue
                    yield prefix, key

        def samples(test: bool) -> Iterator[dict[str, Any]]:
            for prefix, key in made(test):
                hq = cfg.out / f"{prefix}hq" / key
                for slug in slugs:
                    yield _sample(cfg.prompt, cfg.out / f"{prefix}lq" / slug / key, hq, test)

        n_test_imgs = sum(1 for _ in made(True))
        n_imgs = len(jobs) - len(bad)
        n_train, n_test = (n_imgs - n_test_imgs) * len(slugs), n_test_imgs * len(slugs)
        write_json_atomic(tmp / "train.json", JsonStream(samples(False)))
        write_json_atomic(tmp / "test.json", JsonStream(samples(True)))
        manifest = {
            "tool": "lm4lv make-data", "mode": "degrade", "clean_dir": str(cfg.clean_dir),
            "test_dir": str(cfg.test_dir) if cfg.test_dir else None, "size": cfg.size,
            "size_policy": (RESIZE_POLICIES[cfg.resize] if cfg.size else "original size kept"),
            "seed": cfg.seed,
            "test_fraction": None if cfg.test_dir else cfg.test_fraction, "prompt": cfg.prompt,
            "degradations": [{"spec": s, "canonical": p.spec, "folder": f"lq/{p.slug}",
                              "steps": [{"name": st.name, "params": st.params()}
                                        for st in p.steps]}
                             for s, p in zip(cfg.degradations, pipes)],
            "counts": {"images": n_imgs, "train_images": n_imgs - n_test_imgs,
                       "test_images": n_test_imgs, "train_samples": n_train,
                       "test_samples": n_test},
            "versions": _versions(),
            "resize": cfg.resize,
        }
        write_json_atomic(tmp / "manifest.json", manifest)
    return MakeDataResult(cfg.out, "degrade", n_imgs, n_train, n_test, slugs, failures=failures,
                          resumed=resumed)


def write_failures(path: Path, failures: list[tuple[str, str]]) -> None:
    """``failures.csv``: ``path,reason`` of every image left out under ``--on-error skip``."""
    from ..jobs.evaluate import write_failures as write

    write(path, failures)


def _pair_data(cfg: MakeDataConfig) -> MakeDataResult:
    assert cfg.lq_dir is not None and cfg.hq_dir is not None
    from ..image.io import pair_relative

    pairs, only_lq, only_hq = pair_relative(cfg.lq_dir, cfg.hq_dir)
    if not pairs:
        raise LM4LVError(f"no image of --lq {cfg.lq_dir} pairs with one of --hq {cfg.hq_dir} "
                         f"by relative path or name ({len(only_lq)} LQ and {len(only_hq)} HQ "
                         "images unpaired)")
    for _, rl, rh in pairs:
        for p in (cfg.lq_dir / rl, cfg.hq_dir / rh):
            try:
                with Image.open(p) as im:
                    im.verify()
            except Exception as e:  # noqa: BLE001 - any decoder error means unreadable
                raise LM4LVError(f"{p}: cannot read image ({e})") from None
    _check_out(cfg)
    test_mask = _split([k for k, _, _ in pairs], cfg.test_fraction, cfg.seed)
    n_test = int(test_mask.sum())

    def samples(test: bool) -> Iterator[dict[str, Any]]:
        for (_, rl, rh), is_test in zip(pairs, test_mask):
            if bool(is_test) == test:
                yield _sample(cfg.prompt, cfg.lq_dir / rl, cfg.hq_dir / rh, test)

    with _staging(cfg.out) as tmp:
        write_json_atomic(tmp / "train.json", JsonStream(samples(False)))
        write_json_atomic(tmp / "test.json", JsonStream(samples(True)))
        write_json_atomic(tmp / "manifest.json", {
            "tool": "lm4lv make-data", "mode": "pair", "lq_dir": str(cfg.lq_dir),
            "hq_dir": str(cfg.hq_dir), "seed": cfg.seed, "test_fraction": cfg.test_fraction,
            "prompt": cfg.prompt,
            "counts": {"pairs": len(pairs), "train_samples": len(pairs) - n_test,
                       "test_samples": n_test},
            "unpaired_lq": only_lq, "unpaired_hq": only_hq, "versions": _versions()})
    return MakeDataResult(cfg.out, "pair", len(pairs), len(pairs) - n_test, n_test, [],
                          only_lq, only_hq)
