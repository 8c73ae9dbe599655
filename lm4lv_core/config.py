"""Typed configs that round-trip through YAML. Validation happens in ``__post_init__``."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .defaults import ATTN_AUTO, ATTN_IMPLEMENTATIONS, RESIZE_MODES, TOKEN_SELECT
from .errors import ConfigError
from .util.finite import require_finite
from .util.fsutil import write_text_atomic

C = TypeVar("C")

TEMPLATES = ("default", "vicuna_v1.1", "llama2", "simple", "chat_template")  # rendered by data/sequence.py


class Frozen:
    """A config that can be frozen once resolved: setting a field of a frozen config (or of a
    config inside it) raises, so everything downstream of resolution reads the same record.
    ``copy.deepcopy`` of a frozen config is frozen; :func:`thawed` gives a changeable copy."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"{type(self).__name__} is resolved and frozen: {name} cannot change "
                                 "(change a copy from lm4lv_core.config.thawed)")
        object.__setattr__(self, name, value)


def freeze(obj: Any) -> Any:
    """Freeze ``obj`` and every config inside it (fields, lists, dicts); returns ``obj``."""
    if isinstance(obj, Frozen):
        for f in fields(obj):  # type: ignore[arg-type]
            freeze(getattr(obj, f.name))
        obj.__dict__["_frozen"] = True
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            freeze(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            freeze(v)
    return obj


def is_frozen(obj: Any) -> bool:
    return bool(getattr(obj, "__dict__", {}).get("_frozen"))


def thawed(obj: C) -> C:
    """A changeable deep copy of ``obj`` (a config, frozen or not)."""
    import copy

    out = copy.deepcopy(obj)
    _thaw(out)
    return out


def _thaw(obj: Any) -> None:
    if isinstance(obj, Frozen):
        obj.__dict__.pop("_frozen", None)
        for f in fields(obj):  # type: ignore[arg-type]
            _thaw(getattr(obj, f.name))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _thaw(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            _thaw(v)


@dataclass
class ModuleSpec(Frozen):
    """A registered vision part: its registry ``name`` and constructor keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoraConfig(Frozen):
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # None: the LLM family's default (PEFT's per-architecture table; see model/families.py), recorded
    # by the run; a string is a regular expression over full module names, as PEFT reads it
    target_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = [str(t) for t in self.target_modules]
            if not self.target_modules:
                raise ConfigError("lora.target_modules is empty; leave it out for the LLM family's default")
        if self.r <= 0:
            raise ConfigError(f"lora.r must be > 0, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class ModelConfig(Frozen):
    """Where the frozen parts come from and what trains.

    ``resize`` is how images reach the encoder's square size (``stretch`` | ``crop``, see
    :data:`lm4lv_core.image.io.RESIZE_POLICIES`); generation uses the model's by default.

    ``llm`` is a Hugging Face causal-LM folder or hub id (``org/name[@revision]``). ``encoder`` /
    ``decoder`` / ``adapter`` / ``deadapter`` are registry specs (MAE folders or hub ids for the
    default ``mae`` encoder/decoder).

    ``restore_prompt`` is the human turn that asks this model to restore an image, recorded by
    training from its data (see :func:`lm4lv_core.tasks.lm4lv.restoration_prompt`); ``lm4lv
    generate --input`` uses it. ``None``: the training data held no restoration sample.
    """

    llm: str
    encoder: ModuleSpec
    decoder: ModuleSpec | None = None  # None: an understanding encoder, text answers only
    adapter: ModuleSpec | None = None  # None: the family's (linear for features, embedding for codes)
    deadapter: ModuleSpec | None = None  # None: linear (to a feature, or to logits over the codebook)
    num_task_tokens: int = 10
    template: str = "default"
    system_prompt: str | None = None
    gpt_prefix: str = ""
    num_visual_tokens: int | None = None  # keep N of each image's tokens (None: all; such a model cannot paint)
    token_select: str = "first"  # which N: first (a leading run) | strided (evenly spread)
    vision_loss: str | None = None  # None: the family's (feature_mse for features, code_ce for codes)
    vision_loss_weight: float = 1.0
    text_loss_weight: float = 1.0
    train_adapter: bool = True
    train_deadapter: bool = True
    train_encoder: bool = False
    train_decoder: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    resize: str = "stretch"  # size policy of every image (stretch, as the reference, or crop)
    # parts given as Hugging Face ids: {part: {id, revision, commit, path}} (see lm4lv_core.sources.hub)
    hub: dict[str, Any] = field(default_factory=dict)
    restore_prompt: str | None = None  # recorded by training (the data's restoration prompt)
    # the LLM's attention: auto (what transformers picks for the family; a run records the result) |
    # sdpa | eager | flash_attention_2
    attn_implementation: str = ATTN_AUTO
    # <query>: N learnable query embeddings (N = visual tokens per image) stand for an image the
    # model generates in one forward pass; set when the training data holds <query>
    query: bool = False
    train_query: bool = True  # train the query embeddings (--train-query / --freeze-query)
    # plugins the run loaded (lm4lv_core.plugins.records: module names; a file's path and sha256),
    # imported again wherever this config is read back
    plugins: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        from .plugins import restore

        restore(self.plugins)  # before any of its parts is looked up
        for part in ("encoder", "decoder", "adapter", "deadapter"):
            spec = getattr(self, part)
            if isinstance(spec, dict):
                setattr(self, part, ModuleSpec(**spec))
            elif isinstance(spec, str):  # a plain registry name
                setattr(self, part, ModuleSpec(spec))
        if isinstance(self.lora, dict):
            self.lora = LoraConfig(**self.lora)
        if self.num_task_tokens < 0:
            raise ConfigError(f"num_task_tokens must be >= 0, got {self.num_task_tokens}")
        if self.template not in TEMPLATES:
            raise ConfigError(f"unknown template {self.template!r}; valid: {', '.join(TEMPLATES)}")
        if self.token_select not in TOKEN_SELECT:
            raise ConfigError(f"--token-select must be one of {', '.join(TOKEN_SELECT)}, got {self.token_select!r}")
        if self.num_visual_tokens is not None and self.num_visual_tokens <= 0:
            raise ConfigError(f"num_visual_tokens must be > 0, got {self.num_visual_tokens}")
        # registry names (encoder, adapters, loss) are checked by vision.complete_config
        require_finite(self, ("vision_loss_weight", "text_loss_weight"))
        if self.vision_loss_weight < 0 or self.text_loss_weight < 0:
            raise ConfigError("loss weights must be >= 0")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"--attn-implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                              f"got {self.attn_implementation!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[C], data: dict[str, Any], *, source: str = "config") -> C:
    """Build a dataclass from a dict, rejecting unknown keys with a clear message. Fields typed
    as a dataclass (a job's ``train``, ``model``, ...) are built from their nested mappings."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    data = {k: from_dict(hints[k], v, source=f"{source}: {k}")
            if isinstance(v, dict) and isinstance(hints.get(k), type) and dataclasses.is_dataclass(hints[k]) else v
            for k, v in data.items()}
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def save_yaml(obj: Any, path: str | Path) -> None:
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data
