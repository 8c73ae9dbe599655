"""The LM4LV JSON data format: parse, validate, and check image files.

A file is a JSON list of samples::

    {"task_type": "conversation" | "simple",
     "conversations": [{"from" | "role": "human" | "gpt" | "none", "value": "... <image> ... <task>"}],
     "image": "path" | ["path", ...]}

Images are consumed in the order of the ``<image>`` and ``<query>`` placeholders across all turns.
``<query>`` (only in gpt or none turns) stands for an image the model generates in one forward
pass from learnable query embeddings; its image is the target. Relative image paths are resolved
against ``image_root`` (by default the folder of the JSON file).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import DataError

IMAGE_TOKEN = "<image>"
TASK_TOKEN = "<task>"
QUERY_TOKEN = "<query>"  # the learnable visual query: an image generated in one forward pass
ROLES = ("human", "gpt", "none")
QUERY_ROLES = ("gpt", "none")  # where <query> may stand


def image_count(value: str) -> int:
    """Images a turn's value takes from the sample's ``image`` list (``<image>`` and ``<query>``)."""
    return value.count(IMAGE_TOKEN) + value.count(QUERY_TOKEN)
TASK_TYPES = ("conversation", "simple")


@dataclass(frozen=True)
class Turn:
    role: str
    value: str


@dataclass(frozen=True)
class Sample:
    index: int
    task_type: str
    turns: tuple[Turn, ...]
    images: tuple[str, ...]
    extra: tuple[tuple[str, Any], ...] = ()
    answer_dropped: bool = False  # a training sample whose last answer was dropped for generation

    @property
    def is_generation_prompt(self) -> bool:
        """True when the last turn is an empty gpt turn (the model continues from there)."""
        return self.turns[-1].role == "gpt" and self.turns[-1].value == ""

    def image_turns(self) -> list[str]:
        """The role of the turn each image belongs to, in image order."""
        roles: list[str] = []
        for t in self.turns:
            roles += [t.role] * image_count(t.value)
        return roles

    @property
    def has_query(self) -> bool:
        """Whether a turn holds ``<query>`` (the model needs its learnable query)."""
        return any(QUERY_TOKEN in t.value for t in self.turns)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update({"image": list(self.images),
                  "conversations": [{"from": t.role, "value": t.value} for t in self.turns],
                  "task_type": self.task_type})
        return d


def parse_sample(obj: Any, index: int, *, image_root: str | os.PathLike | None = None,
                 source: str = "data") -> Sample:
    """Parse one sample; raise ``DataError`` naming ``source``, the sample index and the problem."""
    where = f"{source}: sample {index}"

    def fail(msg: str) -> DataError:
        return DataError(f"{where}: {msg}")

    if not isinstance(obj, dict):
        raise fail(f"expected an object, got {type(obj).__name__}")
    task_type = obj.get("task_type", "conversation")
    if task_type not in TASK_TYPES:
        raise fail(f"task_type must be one of {'|'.join(TASK_TYPES)}, got {task_type!r}")
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise fail("'conversations' must be a non-empty list of turns")
    turns = []
    for j, t in enumerate(convs):
        if not isinstance(t, dict):
            raise fail(f"turn {j} must be an object with 'from'/'role' and 'value'")
        role = t.get("role", t.get("from"))
        if role is None:
            raise fail(f"turn {j} has no 'role' or 'from' key")
        if role not in ROLES:
            raise fail(f"turn {j} has unknown role {role!r}; expected one of {'|'.join(ROLES)}")
        value = t.get("value")
        if not isinstance(value, str):
            raise fail(f"turn {j} 'value' must be a string")
        if QUERY_TOKEN in value and role not in QUERY_ROLES:
            raise fail(f"turn {j}: {QUERY_TOKEN} stands for an image the model generates, so it belongs in a "
                       f"gpt or none turn, not a {role} turn; use {IMAGE_TOKEN} for an input image")
        turns.append(Turn(role, value))
    if turns[0].role not in ("human", "none"):
        raise fail(f"the first turn must be 'human' or 'none', got {turns[0].role!r}")
    images = obj.get("image", obj.get("images", []))
    if images is None:
        images = []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise fail("'image' must be a path or a list of paths")
    n_placeholders = sum(image_count(t.value) for t in turns)
    if n_placeholders != len(images):
        what = f"{IMAGE_TOKEN}/{QUERY_TOKEN}" if any(QUERY_TOKEN in t.value for t in turns) else IMAGE_TOKEN
        raise fail(f"{n_placeholders} {what} placeholder(s) but {len(images)} image path(s)")
    root = Path(image_root) if image_root is not None else None
    resolved = tuple(str(root / p) if root is not None and not os.path.isabs(p) else p for p in images)
    extra = tuple((k, v) for k, v in obj.items()
                  if k not in ("task_type", "conversations", "image", "images"))
    return Sample(index, task_type, tuple(turns), resolved, extra)


def load_samples(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None) -> list[Sample]:
    """Read and parse a data file. Image paths are not checked here (see ``check_images``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: the file holds no samples")
    root = image_root if image_root is not None else path.parent
    return [parse_sample(obj, i, image_root=root, source=str(path)) for i, obj in enumerate(data)]


def check_for_training(samples: Iterable[Sample], source: str = "data") -> None:
    """Every sample must have something to learn: a non-empty gpt turn (or a none turn, which the
    ``default`` template trains as the reference does)."""
    for s in samples:
        if not any(t.role in ("gpt", "none") and t.value for t in s.turns):
            raise DataError(f"{source}: sample {s.index}: no non-empty 'gpt' (or 'none') turn to learn from")


def as_generation_prompt(s: Sample) -> Sample:
    """The sample as a generation prompt. A training sample (its last turn is a gpt answer) loses that
    answer and the images it holds, as the reference's batch generation does; generation then
    writes the answer anew."""
    last = s.turns[-1]
    if last.role != "gpt" or not last.value:
        return s
    n = image_count(last.value)
    images = s.images[:len(s.images) - n]
    return dataclasses.replace(s, turns=s.turns[:-1] + (Turn("gpt", ""),), images=images, answer_dropped=True)


def find_image_problems(samples: Iterable[Sample], limit: int = 10) -> list[str]:
    """Open every image once (header only) and list up to ``limit`` problems with sample indices."""
    from PIL import Image

    from ..util.memory import DECODE_BYTES_PER_PIXEL, available_bytes, gib

    have = available_bytes()
    problems: list[str] = []
    seen: dict[str, str | None] = {}
    for s in samples:
        for p in s.images:
            if p not in seen:
                err = None
                if not os.path.isfile(p):
                    err = "file not found"
                else:
                    try:
                        with Image.open(p) as im:
                            w, h = im.size
                            im.verify()
                        need = w * h * DECODE_BYTES_PER_PIXEL  # from the header: checked before decoding
                        if have is not None and need > have:
                            err = (f"decoding this {w}x{h} image needs about {gib(need)} of memory, more than "
                                   f"the {gib(have)} available on this machine")
                    except Exception as e:  # noqa: BLE001 - any decoder error is a bad image
                        err = f"unreadable image ({e.__class__.__name__}: {e})"
                seen[p] = err
            if seen[p]:
                problems.append(f"sample {s.index}: {p}: {seen[p]}")
                if len(problems) >= limit:
                    return problems
    return problems


def load_checked(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                 mode: str = "train", check_files: bool = True, limit: int = 10) -> list[Sample]:
    """Load a data file and validate it for ``mode`` (``train`` | ``generate``). In ``generate`` mode
    samples are generation prompts (``as_generation_prompt``: training samples lose their last answer).

    With ``check_files`` every image is opened once; the first ``limit`` problems are reported
    together in one ``DataError`` (with sample indices), before any work starts.
    """
    samples = load_samples(path, image_root=image_root)
    if mode == "train":
        check_for_training(samples, str(path))
    elif mode == "generate":
        samples = [as_generation_prompt(s) for s in samples]
    else:
        raise ValueError(f"unknown mode {mode!r}")
    if check_files:
        problems = find_image_problems(samples, limit=limit)
        if problems:
            more = " (first problems shown)" if len(problems) >= limit else ""
            raise DataError(f"{path}: {len(problems)} image problem(s){more}: " + "; ".join(problems))
    return samples
