"""Typed configs that round-trip through YAML. Validation happens in ``__post_init__``."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .defaults import (ATTN_AUTO, ATTN_IMPLEMENTATIONS, GENERATION_MODES, OUTPUT_SIZES, RESIZE_MODES, TILE_AUTO,
                       TOKEN_SELECT)
from .errors import ConfigError
from .util.finite import require_finite
from .util.fsutil import write_text_atomic

C = TypeVar("C")

TEMPLATES = ("default", "vicuna_v1.1", "llama2", "simple", "chat_template")  # rendered by data/sequence.py


# option panels of the help (``lm4lv train --help``), in this order
PANELS = ("Data", "Model", "Vision", "What trains", "LoRA", "Training", "Generation", "Tiles", "Scoring", "Launch",
          "Output")


def option(default: Any = dataclasses.MISSING, doc: str = "", *, panel: str = "", flags: str | None = None,
           shows: str | None = None, cli: bool = True, may_change: bool = False, run_only: bool = False,
           name: str | None = None, factory: Any = None, min: int | float | None = None,
           required: bool = False) -> Any:
    """A config field and its option, declared once: ``doc`` is its one-line help; the command-line
    flag (``--field-name``, or ``flags`` such as ``"--train-adapter/--freeze-adapter"``), the help's
    ``[default]`` (the default itself, or ``shows`` when it is decided at run time), the help panel,
    what ``--config`` accepts and what ``--resume`` compares are derived from it. ``cli=False``: a
    recorded field no option sets; ``may_change``: a resumed run may change it; ``run_only``: never
    taken from a saved run's config; ``name``: the option's name when it differs from the field's;
    ``min``: the least value the command line accepts; ``required``: the command line must give it.
    ``flags`` may add a short alias after a space (``"--out -o"``)."""
    md = {"doc": doc, "panel": panel, "flags": flags, "shows": shows, "cli": cli, "may_change": may_change,
          "run_only": run_only, "name": name, "min": min, "required": required}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


# options several commands take: one declaration each (a fresh field for every config that takes it)
def workers_option(default: int | None, shows: str | None = None) -> Any:
    """``--workers``: processes working in parallel (make-data, eval)."""
    return option(default, "Processes working in parallel; the results do not depend on it.", panel="Launch",
                  shows=shows)


def on_error_option() -> Any:
    """``--on-error``: what an image that cannot be read or processed does (make-data, eval)."""
    return option("stop", "stop: the first image that cannot be read or processed is one error and the command "
                  "stops; skip: do the rest, list the failures in failures.csv beside the outputs, exit 3.",
                  panel="Launch")


def overwrite_option(what: str) -> Any:
    """``--overwrite``: replace ``what`` an earlier run of the command wrote (make-data, eval, quickstart)."""
    return option(False, f"Replace {what}.", panel="Output", flags="--overwrite")


def declared(cls: type, *, cli_only: bool = False) -> list[dataclasses.Field]:
    """The fields of ``cls`` declared with :func:`option` (``cli_only``: those an option sets)."""
    return [f for f in fields(cls) if "doc" in f.metadata and (f.metadata["cli"] or not cli_only)]


def option_name(f: dataclasses.Field) -> str:
    return f.metadata.get("name") or f.name


class Frozen:
    """A config that can be frozen once resolved: setting a field of a frozen config (or of a
    config inside it) raises, so everything downstream of resolution reads the same record.
    ``copy.deepcopy`` of a frozen config is frozen; :func:`thawed` gives a changeable copy."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"{type(self).__name__} is resolved and frozen: {name} cannot change "
                                 "(change a copy from lm4lv_core.config.thawed)")
        object.__setattr__(self, name, value)


def _each_config(obj: Any, fn) -> None:
    """``fn(config)`` for every config in ``obj`` (itself, its fields, lists and dicts), innermost first."""
    if isinstance(obj, Frozen):
        for f in fields(obj):  # type: ignore[arg-type]
            _each_config(getattr(obj, f.name), fn)
        fn(obj)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _each_config(v, fn)
    elif isinstance(obj, dict):
        for v in obj.values():
            _each_config(v, fn)


def freeze(obj: Any) -> Any:
    """Freeze ``obj`` and every config inside it (fields, lists, dicts); returns ``obj``."""
    _each_config(obj, lambda c: c.__dict__.__setitem__("_frozen", True))
    return obj


def is_frozen(obj: Any) -> bool:
    return bool(getattr(obj, "__dict__", {}).get("_frozen"))


def thawed(obj: C) -> C:
    """A changeable deep copy of ``obj`` (a config, frozen or not)."""
    import copy

    out = copy.deepcopy(obj)
    _each_config(out, lambda c: c.__dict__.pop("_frozen", None))
    return out


@dataclass
class ModuleSpec(Frozen):
    """A registered vision part: its registry ``name`` and constructor keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoraConfig(Frozen):
    """LoRA on the LLM; each field is the option ``--lora``, ``--lora-r``, ... of ``lm4lv train``."""

    enabled: bool = option(False, "Add LoRA adapters to the LLM.", panel="LoRA", flags="--lora/--no-lora",
                           name="lora")
    r: int = option(8, "LoRA rank.", panel="LoRA", name="lora_r")
    alpha: int = option(16, "LoRA alpha.", panel="LoRA", name="lora_alpha")
    dropout: float = option(0.05, "LoRA dropout.", panel="LoRA", name="lora_dropout")
    # a string is a regular expression over full module names, as PEFT reads it
    target_modules: list[str] | str | None = option(
        None, "Comma-separated LLM module names.", panel="LoRA", name="lora_targets",
        shows="the LLM family's: PEFT's default targets, e.g. q_proj,v_proj for Llama; else every linear layer")

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

    llm: str = option(doc="The causal LM folder (a hub id is resolved to its snapshot folder).", cli=False)
    encoder: ModuleSpec = option(doc="The vision encoder (a registry spec).", cli=False)
    decoder: ModuleSpec | None = option(None, "The vision decoder; None: text answers only.", cli=False)
    adapter: ModuleSpec | None = option(
        None, "Input adapter: linear | mlp | lowrank | identity read features; embedding reads codes.",
        panel="Vision", shows="the family's: linear for features, embedding for codes")
    deadapter: ModuleSpec | None = option(
        None, "Output adapter: linear | mlp | lowrank | identity | pseudo_inverse (inverts a linear adapter).",
        panel="Vision", shows="linear")
    num_task_tokens: int = option(10, "K learnable task embeddings per <task>.", panel="Model")
    template: str = option("default", " | ".join(TEMPLATES) + ".", panel="Model")
    system_prompt: str | None = option(None, "System message before the conversation.", panel="Model",
                                       shows="none, as the reference")
    gpt_prefix: str = option("", "Prefix added to every gpt answer, masked from the loss.", panel="Model")
    num_visual_tokens: int | None = option(
        None, "Keep N of each image's visual tokens (understanding; a truncated model cannot paint).",
        panel="Vision", shows="all")
    token_select: str = option("first", "Which N tokens --num-visual-tokens keeps: first (a leading run) | "
                               "strided (evenly spread).", panel="Vision")
    vision_loss: str | None = option(None, "feature_mse (the paper's) | pixel_l1 (through the decoder) | code_ce "
                                     "(codes).", panel="Vision", shows="the family's")
    vision_loss_weight: float = option(1.0, "Weight of the vision loss.", panel="Vision")
    text_loss_weight: float = option(1.0, "Weight of the text loss on gpt tokens.", panel="Model")
    train_adapter: bool = option(True, "Train the input adapter.", panel="What trains",
                                 flags="--train-adapter/--freeze-adapter")
    train_deadapter: bool = option(True, "Train the output adapter.", panel="What trains",
                                   flags="--train-deadapter/--freeze-deadapter")
    train_encoder: bool = option(False, "Train the vision encoder.", panel="What trains",
                                 flags="--train-encoder/--freeze-encoder")
    train_decoder: bool = option(False, "Train the vision decoder.", panel="What trains",
                                 flags="--train-decoder/--freeze-decoder")
    lora: LoraConfig = option(doc="LoRA on the LLM (the --lora options).", cli=False, factory=LoraConfig)
    resize: str = option("stretch", "How images reach the model's square size: stretch (as the reference) | crop "
                         "(centre square); recorded for generate.", panel="Data")
    hub: dict[str, Any] = option(doc="Parts given as Hugging Face ids: {part: {id, revision, commit, path}}.",
                                 cli=False, factory=dict)
    restore_prompt: str | None = option(None, "The data's restoration prompt, recorded for generate --input.",
                                        cli=False)
    attn_implementation: str = option(ATTN_AUTO, "The LLM's attention: auto (sdpa where the LLM's family has it, "
                                      "else eager) | sdpa | eager | flash_attention_2.", panel="Model")
    query: bool = option(False, "A learnable query of N embeddings (<query> in the data): images in one pass.",
                         cli=False)
    train_query: bool = option(True, "Train the learnable query of <query> answers.", panel="What trains",
                               flags="--train-query/--freeze-query")
    plugins: list[dict[str, Any]] = option(doc="Plugins the run loaded (module names; a file's path and sha256).",
                                           cli=False, factory=list)

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


@dataclass
class ModelSources:
    """Where the model's parts come from: the model options of ``train`` and ``import-reference``
    (not recorded themselves: they resolve to the model config's folders and specs)."""

    preset: str | None = option(None, "Tiny offline model preset (tiny, tiny-gpt2, tiny-64, tiny-224; tiny-vq: "
                                "VQGAN codes; tiny-sdvae: latent VAE).", panel="Model")
    llm: str | None = option(None, "Causal LM: a folder or a Hugging Face id org/name[@revision] (fetched into "
                             "the HF cache).", panel="Model")
    mae: str | None = option(None, "MAE (ViTMAEForPreTraining): a folder or a Hugging Face id "
                             "org/name[@revision]; short for --encoder mae:X --decoder mae:X.", panel="Vision")
    mae_decoder: str | None = option(None, "MAE folder or Hugging Face id for the decoder.", panel="Vision",
                                     shows="--mae")
    vision_config: str | None = option(None, "YAML naming encoder / decoder / adapters ({name, kwargs} entries, or "
                                       "the reference's {target, params} form).", panel="Vision")
    encoder: str | None = option(None, "Vision encoder FAMILY:SOURCE or package.module:Class:SOURCE, e.g. "
                                 "mae:facebook/vit-mae-large, vqgan-codes:./vq-f16, clip:ID, timm:NAME[:CHECKPOINT] "
                                 "(see docs/vision.md).", panel="Vision")
    decoder: str | None = option(None, "Vision decoder FAMILY:SOURCE, or none (text answers only).", panel="Vision",
                                 shows="the encoder's family when it decodes")


def parse_tile(value) -> int | str | None:
    """``--tile``: ``None`` / ``0`` / ``off`` (no tiles), ``auto`` or a positive pixel count."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "0", "off", "none"):
            return None
        if text == TILE_AUTO:
            return TILE_AUTO
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"--tile must be a number of pixels or auto, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"--tile must be a number of pixels or auto, got {value!r}")
    return value or None


@dataclass
class GenerationConfig:
    """Decoding options. ``temperature == 0`` is greedy decoding.

    ``mode``: ``image`` forces every answer to start with ``<Img>`` and stops after that image
    (the reference's image-only mode); ``text`` lets the model write text and images freely;
    ``auto`` uses ``image`` for samples whose prompt holds ``<task>`` (restoration data) and
    ``text`` for the others (e.g. captioning).

    ``resize``: size policy of the input images (``stretch`` | ``crop``; ``None`` = the model's
    own, recorded at training). ``output_size``: ``input`` writes each generated image at the
    size of its sample's first input image (see :func:`lm4lv_core.image.io.restored_size`),
    ``model`` at the model's square size; it applies where images are written (``restore``, the
    ``generate`` job), not to the tensors ``generate_samples`` returns.

    ``query``: a model trained with ``<query>`` reads image-only answers from its learnable query
    in one forward pass (``False``: one visual token per step, as a model without it).

    ``tile`` / ``tile_overlap``: restore each input at its own resolution in overlapping tiles
    (:mod:`lm4lv_core.model.tiled`); ``None``: the resize path.
    """

    max_new_tokens: int = option(64, "Most sampled text tokens per answer (images not counted).",
                                 panel="Generation")
    temperature: float = option(0.0, "0 = greedy.", panel="Generation")
    top_k: int = option(0, "Sample among the k most likely tokens (0 = all).", panel="Generation")
    top_p: float = option(1.0, "Nucleus sampling threshold.", panel="Generation")
    seed: int = option(0, "Seed of text sampling (per sample, independent of batching).", panel="Generation")
    mode: str = option("auto", "image: answers start with <Img> and stop after the image; text: free text and "
                       "images; auto: image when the prompt holds <task>.", panel="Generation")
    resize: str | None = option(None, "How inputs reach the model's size: stretch | crop.", panel="Data",
                                shows="the run's, recorded at training")
    output_size: str = option("input", "input: images at the input image's size (crop: its centre square's); "
                              "model: at the model's square size.", panel="Output")
    query: bool = option(True, "A model trained with <query>: read each image-only answer from its learnable "
                         "query in one forward pass (--no-query: one visual token per step).", panel="Generation",
                         flags="--query/--no-query")
    tile: int | str | None = option(None, "Restore each input image at its own resolution in N px tiles (auto: the "
                                    "vision family's size), blended over their overlaps; --batch-size then counts "
                                    "tiles.", panel="Tiles", shows="off: resize to the model's size and back")
    tile_overlap: int | None = option(None, "With --tile: pixels neighbouring tiles share.", panel="Tiles",
                                      shows="a quarter of the tile, whole patches")

    def __post_init__(self) -> None:
        self.tile = parse_tile(self.tile)
        if self.tile_overlap is not None and self.tile_overlap < 0:
            raise ConfigError(f"--tile-overlap must be >= 0, got {self.tile_overlap}")
        if self.tile is not None and self.output_size == "model":
            raise ConfigError("--output-size model does not apply with --tile (tiled images keep their input's size)")
        if self.max_new_tokens < 0:
            raise ConfigError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.mode not in GENERATION_MODES:
            raise ConfigError(f"--mode must be one of {', '.join(GENERATION_MODES)}, got {self.mode!r}")
        if self.resize is not None and self.resize not in RESIZE_MODES:
            raise ConfigError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.output_size not in OUTPUT_SIZES:
            raise ConfigError(f"--output-size must be one of {', '.join(OUTPUT_SIZES)}, got {self.output_size!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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
