"""Resolving a model config once: everything a config leaves open is decided here and recorded,
then the config is frozen (:func:`lm4lv_core.config.freeze`), so the workers, the model
constructor, the memory plan, the prompt preview and generation all read the same record.

Decided here: hub ids → snapshot folders (and their commits), the vision family's adapters and
loss (and no decoder for a truncated model), the LLM's ``auto`` attention and LoRA's default
targets, and the plugins in use. A training run decides the data's share first (a learnable query,
the restoration prompt: :func:`lm4lv_core.jobs.train.complete_for_run`)."""

from __future__ import annotations

from ..config import ModelConfig, freeze, is_frozen, thawed


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` resolved and frozen: a frozen config as it is, else a resolved copy (the caller's
    config is left as it was)."""
    if is_frozen(cfg):
        return cfg
    from ..plugins import merge_records
    from ..sources.hub import resolve_hub_folders
    from ..vision import complete_config
    from .families import resolve_llm_options

    cfg = thawed(cfg)  # its own copy, parts shared with other configs included
    resolve_hub_folders(cfg)
    complete_config(cfg)
    resolve_llm_options(cfg)
    cfg.plugins = merge_records(cfg.plugins)
    return freeze(cfg)
