"""What lm4lv asks of an LLM family, answered from the family's own declarations, and the few
per-family quirks they do not cover, in one table.

lm4lv runs any Hugging Face causal LM through ``inputs_embeds`` and hidden states; what differs
between families is answered here:

* **attention** (``--attn-implementation auto``): what transformers itself picks when none is
  asked (``PreTrainedModel.get_correct_attn_implementation(None)``): ``sdpa`` where the model class
  declares ``_supports_sdpa``, else ``eager``; ``flash_attention_2`` only when asked;
* **LoRA targets** (``--lora`` without ``--lora-targets``): PEFT's own per-architecture table
  (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, what ``get_peft_model`` uses when no
  ``target_modules`` is given), completed by :data:`QUIRKS` for families PEFT does not list;
* **memory plan**: whether the plan's activation model was calibrated on the family's layers.

Token logits (soft-capping, logit scales) are read from the model's config in ``logits.py``.

To add a family quirk: one :class:`Quirks` entry in :data:`QUIRKS`, keyed by the config's
``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..defaults import ATTN_AUTO
from ..errors import ConfigError


@dataclass(frozen=True)
class Quirks:
    """What one family needs beyond what it declares. ``lora_targets``: default LoRA targets
    where PEFT's table has none; ``plan_calibrated``: the memory plan's activation model was
    measured on this family's layers (others are marked approximate)."""

    lora_targets: tuple[str, ...] = ()
    plan_calibrated: bool = False


QUIRKS: dict[str, Quirks] = {
    "llama": Quirks(plan_calibrated=True),
    "phi3": Quirks(lora_targets=("qkv_proj",)),          # fused q, k, v projection
    "granite": Quirks(lora_targets=("q_proj", "v_proj")),
    "cohere": Quirks(lora_targets=("q_proj", "v_proj")),
}


def llm_config(path: str):
    """The Hugging Face config of the LLM folder ``path`` (no weights read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the LLM's config ({e})") from None


def model_type(config) -> str:
    return str(getattr(config, "model_type", "") or "")


def quirks(config) -> Quirks:
    return QUIRKS.get(model_type(config), Quirks())


def causal_lm_class(config):
    """The ``AutoModelForCausalLM`` class of ``config`` (``None`` when transformers has none)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):
        return None


def resolve_attn_implementation(requested: str, config, where: str = "") -> str:
    """``auto`` → what transformers picks for this family (``sdpa`` or ``eager``); an explicit
    ``sdpa`` for a family without it is a one-line error."""
    cls = causal_lm_class(config)
    sdpa = bool(getattr(cls, "_supports_sdpa", False)) if cls is not None else True
    if requested == ATTN_AUTO:
        return "sdpa" if sdpa else "eager"
    if requested == "sdpa" and not sdpa:
        raise ConfigError(f"--attn-implementation sdpa: {cls.__name__} ({model_type(config)}{where}) has no sdpa "
                          "attention in transformers; use auto or eager")
    if requested == "flash_attention_2" and cls is not None and not getattr(cls, "_supports_flash_attn", False):
        raise ConfigError(f"--attn-implementation flash_attention_2: {cls.__name__} ({model_type(config)}{where}) "
                          "has no flash attention in transformers; use auto")
    return requested


def default_lora_targets(config, where: str = "", llm=None) -> list[str] | str:
    """LoRA's target modules when none are given: PEFT's per-architecture default, else the
    family's quirk, else every linear layer of the transformer (PEFT's ``all-linear``: the output
    head left out), named in one note line. ``llm``: the model (default: built on the meta device).
    (A string is a regular expression over full module names, as PEFT reads it.)"""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    kind = model_type(config)
    targets = PEFT_TARGETS.get(kind) or list(quirks(config).lora_targets)
    if targets:
        return targets if isinstance(targets, str) else list(targets)
    if llm is None:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(config)
    targets = linear_leaf_names(llm.get_decoder())
    if not targets:
        raise ConfigError(f"--lora: {kind or 'this'} models{where} have no linear layers for LoRA; "
                          "name the modules with --lora-targets")
    from ..util.logs import say

    say(f"note: --lora on {kind or 'this'} models{where}: no default targets in PEFT's table, so every linear "
        f"layer of the transformer (all-linear): {', '.join(targets)}")
    return targets


def linear_leaf_names(module) -> list[str]:
    """Names (last component) of the Linear / Conv1D layers of ``module``: what LoRA can target."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules()
                   if n and isinstance(m, (nn.Linear, Conv1D))})


def check_lora_targets(llm, targets: list[str] | str, where: str = "") -> None:
    """One-line error when a LoRA target is not a module of ``llm``, listing its linear layers."""
    import re

    if isinstance(targets, str):  # a regular expression over full module names, as PEFT reads it
        missing = [] if any(re.fullmatch(targets, n) for n, _ in llm.named_modules()) else [targets]
    else:
        names = {n.rsplit(".", 1)[-1] for n, _ in llm.named_modules()}
        missing = [t for t in targets if t not in names]
    if missing:
        layers = linear_leaf_names(llm.get_decoder())
        raise ConfigError(f"LoRA target module(s) {', '.join(missing)} not found{where}; its linear layers are: "
                          f"{', '.join(layers) or 'none'}")


def resolve_llm_options(cfg, config=None):
    """Fill what ``cfg`` (a ``ModelConfig``) leaves to the LLM's family, so a run records what it
    uses: the ``auto`` attention implementation and, with LoRA, the default targets (checked
    against the LLM's modules, built on the meta device). Returns ``cfg``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = config if config is not None else llm_config(cfg.llm)
    where = f" in {cfg.llm}"
    cfg.attn_implementation = resolve_attn_implementation(cfg.attn_implementation, config, where)
    if cfg.lora.enabled:
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(config)
        if cfg.lora.target_modules is None:
            cfg.lora.target_modules = default_lora_targets(config, where, llm)
        check_lora_targets(llm, cfg.lora.target_modules, where)
    return cfg
