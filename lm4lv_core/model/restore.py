"""Restoring images with a loaded model — the one restoration every entry point builds on.

Each image becomes a one-turn conversation, the restoration prompt (``<image>`` = the image)
answered in image-only mode (:func:`restore_images`): in batches of whole images, or with
``GenerationConfig.tile`` at the image's own resolution in tiles (:mod:`.tiled`). The restored
image comes out at the input's size (see ``GenerationConfig.output_size``).

* :func:`restore`: PIL images in, PIL images out;
* :func:`restore_folder`: every image of a folder (recursively) into a mirrored folder, as
  ``lm4lv generate --input`` does on each of its workers (:func:`restore_items`): in the input's
  format family (:func:`lm4lv_core.data.outputs.restored_name`), atomically, so an output that
  exists is finished.

The prompt is the same everywhere (:func:`restore_prompt`): the one given, else the model's
recorded restoration prompt (``ModelConfig.restore_prompt``), else lm4lv's default
(:data:`lm4lv_core.defaults.DEFAULT_PROMPT`, the prompt ``lm4lv data`` writes).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..data.format import IMAGE_TOKEN, Sample, parse_sample
from ..data.outputs import RestoreItem, plan_restore
from ..defaults import DEFAULT_PROMPT, GENERATE_BATCH_SIZE
from ..errors import ConfigError, LM4LVError
from .generate import GenerationConfig, generate_samples, output_image


def restore_prompt(model_prompt: str | None, prompt: str | None = None) -> str:
    """The prompt to restore with: ``prompt`` if given, else the model's recorded one
    (``ModelConfig.restore_prompt``); it must hold exactly one ``<image>``. A model that recorded
    none (its data held no restoration sample) needs one given: guessing could restore with a
    prompt it never learnt."""
    chosen = prompt if prompt is not None else model_prompt
    if chosen is None:
        raise ConfigError("this model has no recorded restoration prompt (its training data held no sample "
                          "'<image> ... <task>' answered by an image); pass --prompt (Python: prompt=), "
                          f"e.g. --prompt '{DEFAULT_PROMPT}'")
    if chosen.count(IMAGE_TOKEN) != 1:
        raise ConfigError(f"--prompt must hold exactly one {IMAGE_TOKEN} (the image to restore), got {chosen!r}")
    return chosen


def image_config(cfg: GenerationConfig | None) -> GenerationConfig:
    """``cfg`` in image-only mode (``auto`` becomes ``image``; ``text`` cannot restore)."""
    cfg = cfg or GenerationConfig()
    if cfg.mode == "text":
        raise ConfigError("--mode text cannot restore images (--input writes one image per input); "
                          "use --mode image or auto")
    return dataclasses.replace(cfg, mode="image")


def prompt_samples(images: Sequence[tuple[int, str]], prompt: str, source: str) -> list[Sample]:
    """One generation sample per ``(key, image path)``: ``prompt`` with that image, keyed by ``key``."""
    return [parse_sample({"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}],
                          "image": [src]}, key, source=source) for key, src in images]


def restore_samples(items: Sequence[RestoreItem], prompt: str) -> list[Sample]:
    """One generation sample per item: ``prompt`` with the item's image, keyed by ``item.key``."""
    return prompt_samples([(it.key, it.src) for it in items], prompt, "--input")


def restore_images(model, samples: Sequence[Sample], cfg: GenerationConfig | None = None, *,
                   on_image: Callable[[Sample, object], None], batch_size: int = GENERATE_BATCH_SIZE,
                   loader=None, size_of: Callable[[Sample], tuple[int, int]] | None = None, compile: bool = False,
                   on_batch: Callable[[int, int], None] | None = None) -> None:
    """The restoration: each sample's image restored (image-only generation, the model in eval mode
    meanwhile) and handed to ``on_image(sample, PIL image)`` at the size ``cfg.output_size`` asks for.

    ``loader(path)`` reads an input image (default: the file); ``size_of(sample)`` is its input's
    (width, height) (default: read from the file's header). With ``cfg.tile`` each image is
    restored at its own resolution in tiles (``batch_size`` then counts tiles).
    ``on_batch(tiles, images)``: after each batch, how many tiles it held (its images when not
    tiled) and how many images it finished."""
    from ..image.io import oriented_size

    cfg = image_config(cfg)
    size_of = size_of or (lambda s: oriented_size(s.images[0]))
    was_training = model.training
    model.eval()
    try:
        if cfg.tile is not None:  # at native resolution, tiles of many images batched together
            from PIL import Image

            from .tiled import generate_tiled, model_tiling

            generate_tiled(model, samples, cfg, model_tiling(model, cfg), batch_size=batch_size, loader=loader,
                           on_image=lambda i, s, px: on_image(s, Image.fromarray(px)), compile=compile,
                           on_batch=on_batch)
            return

        def finish(chunk: list[Sample], outs) -> None:
            for s, o in zip(chunk, outs):
                if not o.images:
                    raise ConfigError(f"{s.images[0]}: the model produced no image")
                on_image(s, output_image(o.images[0], size_of(s), cfg, model))
            if on_batch is not None:
                on_batch(len(chunk), len(chunk))

        generate_samples(model, samples, cfg, batch_size=batch_size, loader=loader, on_batch=finish, compile=compile)
    finally:
        model.train(was_training)


def restore(model, images, prompt: str | None = None, *, batch_size: int = GENERATE_BATCH_SIZE,
            cfg: GenerationConfig | None = None):
    """Restore PIL images with a loaded model; returns PIL images (:func:`restore_images`).

    ``prompt`` is the human turn; its ``<image>`` is the input image (default: :func:`restore_prompt`).
    With ``cfg.output_size`` ``input`` (the default) each result has its input's size (under ``crop``:
    the centre square's footprint), with ``model`` the model's square size. With ``cfg.tile`` each
    image is restored at its own resolution in tiles (``batch_size`` counts tiles).
    """
    prompt = restore_prompt(model.config.restore_prompt, prompt)
    table = {f"mem:{i}": img for i, img in enumerate(images)}
    result: dict[int, object] = {}
    restore_images(model, prompt_samples(list(enumerate(table)), prompt, "restore"), cfg,
                   on_image=lambda s, img: result.__setitem__(s.index, img), batch_size=batch_size,
                   loader=lambda p: table[p].convert("RGB"), size_of=lambda s: table[s.images[0]].size)
    return [result[i] for i in range(len(images))]


def restore_items(model, items: Sequence[RestoreItem], out: str | os.PathLike, prompt: str, *,
                  cfg: GenerationConfig | None = None, batch_size: int = GENERATE_BATCH_SIZE,
                  compile: bool = False, on_batch: Callable[..., None] | None = None, on_tiles: bool = False,
                  on_failure: Callable[[RestoreItem, str], None] | None = None) -> None:
    """Restore ``items`` into ``out`` (:func:`restore_images`), batch by batch; ``on_batch(n)`` is
    called after each batch's ``n`` images are written (with ``cfg.tile`` and ``on_tiles``:
    ``on_batch(tiles, images)``, the batch's tiles and the images it finished).

    ``on_failure(item, reason)``: an image that fails on its own (an :class:`LM4LVError` naming its
    file, e.g. a file that passed the header check but does not decode) is left out, with no output,
    and the rest restored (see :func:`_restore_skipping`); without it the first failure stops the
    restoration."""
    out = Path(out)
    tiled = cfg is not None and cfg.tile is not None
    after = None
    if on_batch is not None:
        after = (lambda tiles, images: on_batch(tiles, images)) if on_tiles and tiled else \
            (lambda tiles, images: on_batch(images))
    if on_failure is not None:
        _restore_skipping(model, items, out, prompt, cfg=cfg, batch_size=batch_size, compile=compile,
                          on_batch=after, on_failure=on_failure)
        return
    _restore_into(model, items, out, prompt, cfg=cfg, batch_size=batch_size, compile=compile, on_batch=after)


def _restore_into(model, items: Sequence[RestoreItem], out: Path, prompt: str, *, cfg, batch_size: int,
                  compile: bool, on_batch, loader=None, on_written: Callable[[RestoreItem], None] | None = None):
    """:func:`restore_images` of ``items``, each written atomically to ``out/item.dst``."""
    from ..image.io import save_image

    by_key = {it.key: it for it in items}

    def write(s: Sample, img) -> None:
        it = by_key[s.index]
        save_image(img, out / it.dst)
        if on_written is not None:
            on_written(it)

    restore_images(model, restore_samples(items, prompt), cfg, batch_size=batch_size, compile=compile,
                   on_image=write, on_batch=on_batch, loader=loader)


def failure_reason(e: BaseException, src: str) -> str:
    """The cause of an image's failure without the ``sample K:`` and ``PATH:`` the message starts
    with (the path is the ``path`` column of ``failures.csv``)."""
    import re

    msg = re.sub(r"^sample \d+: ", "", str(e))
    return msg.removeprefix(f"{src}: ")


def _restore_skipping(model, items: Sequence[RestoreItem], out: Path, prompt: str, *, cfg, batch_size: int,
                      compile: bool, on_batch, on_failure: Callable[[RestoreItem, str], None]) -> None:
    """:func:`restore_items` leaving out the images that fail on their own.

    The images are restored in the usual batches; when an :class:`LM4LVError` stops them:

    * raised while reading an image (it passed the header check but does not decode): that image
      fails, and the restoration starts again with the images not yet written;
    * raised elsewhere (e.g. while bringing a restored image to its input's size): the first
      ``batch_size`` images not yet written (those of the failing batch) are restored one by one;
      one whose error names its file fails, any other error stops the restoration (it is not the
      image's: e.g. a model that cannot paint).

    Written images are never restored again; ``on_batch`` counts each image once (the tiles of a
    half-restored image count again when it is restored again)."""
    from ..image.io import load_rgb

    written: set[int] = set()
    state = {"reading": None, "reported": 0}

    def loader(path: str):
        state["reading"] = path
        img = load_rgb(path)
        state["reading"] = None
        return img

    def report(tiles: int, images: int) -> None:
        state["reported"] += images
        if on_batch is not None:
            on_batch(tiles, images)

    def attempt(group: Sequence[RestoreItem]) -> None:
        state["reading"] = None
        _restore_into(model, group, out, prompt, cfg=cfg, batch_size=batch_size, compile=compile,
                      on_batch=report, loader=loader, on_written=lambda it: written.add(it.key))

    def catch_up() -> None:
        """Count the images written in a batch that failed before it was counted."""
        if len(written) > state["reported"]:
            report(0, len(written) - state["reported"])

    remaining = list(items)
    while remaining:
        try:
            attempt(remaining)
            return
        except LM4LVError as e:
            catch_up()
            bad = [it for it in remaining if it.src == state["reading"] and it.key not in written]
            if bad:  # this image does not decode: leave it out, go on with the rest
                for it in bad:
                    on_failure(it, failure_reason(e, it.src))
                remaining = [it for it in remaining if it.key not in written and it.src != bad[0].src]
                continue
        remaining = [it for it in remaining if it.key not in written]
        suspects, remaining = remaining[:batch_size], remaining[batch_size:]
        for it in suspects:
            try:
                attempt([it])
            except LM4LVError as e:
                if it.src not in str(e):
                    raise  # not this image's own failure
                on_failure(it, failure_reason(e, it.src))
            catch_up()


@dataclass
class RestoreCount:
    """Images of a restoration: ``restored`` now, ``skipped`` (their outputs existed), ``total``;
    ``failures``: ``(path, reason)`` of the images left out under ``on_error="skip"``."""

    restored: int
    skipped: int
    total: int
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def restore_folder(model, src: str | os.PathLike | Sequence[str | os.PathLike], dst: str | os.PathLike, *,
                   prompt: str | None = None, overwrite: bool = False, batch_size: int = GENERATE_BATCH_SIZE,
                   cfg: GenerationConfig | None = None, on_error: str = "stop") -> RestoreCount:
    """Restore the images of ``src`` (a folder, searched recursively, an image, or a list of them)
    into ``dst``, mirroring their relative paths (:func:`lm4lv_core.data.outputs.plan_restore`).

    ``prompt``: the human turn (default: :func:`restore_prompt`). Images whose output exists are
    skipped unless ``overwrite``. ``cfg.tile``: restore each image at its own resolution in tiles
    (``batch_size`` then counts tiles). ``on_error``: ``stop`` (the first image that fails raises
    an ``LM4LVError`` naming it) or ``skip`` (it is left out, with no output, and listed in
    ``RestoreCount.failures``). Returns the counts.
    """
    if on_error not in ("stop", "skip"):
        raise ConfigError(f"on_error must be one of stop, skip, got {on_error!r}")
    prompt = restore_prompt(model.config.restore_prompt, prompt)
    sources = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    items = plan_restore(sources, dst)
    todo = items if overwrite else [it for it in items if not (Path(dst) / it.dst).is_file()]
    failures: list[tuple[str, str]] = []
    on_failure = (lambda it, reason: failures.append((it.src, reason))) if on_error == "skip" else None
    restore_items(model, todo, dst, prompt, cfg=image_config(cfg), batch_size=batch_size, on_failure=on_failure)
    return RestoreCount(len(todo) - len(failures), len(items) - len(todo), len(items), failures)
