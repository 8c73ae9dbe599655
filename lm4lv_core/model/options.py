"""The model config from the model options of ``train`` / ``import-reference`` (``--preset``,
``--llm``, ``--mae``, ``--encoder`` / ``--decoder``, ``--vision-config``, field overrides)."""

from __future__ import annotations

from ..config import ModelConfig, ModuleSpec
from ..errors import ConfigError
from ..sources.presets import preset_config


def resolve_model_config(*, preset: str | None = None, llm: str | None = None, mae: str | None = None,
                         mae_decoder: str | None = None, vision_config: str | None = None,
                         encoder: str | None = None, decoder: str | None = None,
                         **overrides) -> ModelConfig:
    """The model config from either ``preset`` or real models (``llm`` + vision parts).

    ``llm``, ``mae`` and ``mae_decoder`` are folders or Hugging Face ids (``org/name[@revision]``),
    resolved now (fetched when needed) to snapshot folders recorded in ``ModelConfig.hub``.
    ``encoder`` / ``decoder`` are ``FAMILY:SOURCE`` (``--mae X`` is ``--encoder mae:X --decoder
    mae:X``); an encoder whose family also decodes brings that decoder unless ``decoder`` is given
    (``none``: no decoder). A vision YAML may hold ``encoder``, ``decoder``, ``adapter`` and
    ``deadapter`` entries, each ``{name: ..., kwargs: {...}}``, or be the reference's
    ``stage2_*.yaml`` form (``{target: ..., params: ...}`` entries, see :mod:`lm4lv_core.sources.reference`). ``adapter`` / ``deadapter``
    overrides may be plain names. ``overrides`` with value ``None`` are ignored.
    """
    from ..vision import has_decoder, parse_part

    from ..config import load_yaml
    from ..util.logs import say
    from ..sources.hub import resolve_hub_folders
    from ..sources.reference import is_reference_vision_config, vision_fields

    overrides = {k: v for k, v in overrides.items() if v is not None}
    if preset:
        if llm or mae:
            raise ConfigError("use either --preset or --llm/--mae, not both")
        cfg = preset_config(preset)
        base = {k: getattr(cfg, k) for k in ("llm", "encoder", "decoder", "num_task_tokens")}
    else:
        if not llm:
            raise ConfigError("a model is needed: --preset NAME, or --llm PATH|ID with --mae PATH|ID")
        base = {"llm": str(llm)}
        if mae:
            base["encoder"] = ModuleSpec("mae", {"path": str(mae)})
            base["decoder"] = ModuleSpec("mae", {"path": str(mae)})
    if vision_config:
        vc = load_yaml(vision_config)
    if vision_config and is_reference_vision_config(vc):  # the reference's stage2_*.yaml form
        fields, notes = vision_fields(vc, vision_config)
        if "vision_loss" in fields:  # --vision-loss given on the command line wins
            overrides.setdefault("vision_loss", fields.pop("vision_loss"))
        base.update(fields)
        if notes:
            say(f"note: --vision-config {vision_config} (the reference's form): " + "; ".join(notes))
    elif vision_config:
        for key in ("encoder", "decoder", "adapter", "deadapter"):
            if key in vc:
                base[key] = ModuleSpec(**vc[key]) if isinstance(vc[key], dict) else ModuleSpec(str(vc[key]))
        unknown = set(vc) - {"encoder", "decoder", "adapter", "deadapter"}
        if unknown:
            raise ConfigError(f"{vision_config}: unknown key(s) {', '.join(sorted(unknown))}; "
                              "valid: encoder, decoder, adapter, deadapter")
    if encoder:
        if mae:
            raise ConfigError("use either --mae or --encoder, not both")
        base["encoder"] = parse_part(encoder, "encoder")
        if has_decoder(base["encoder"].name):
            base["decoder"] = ModuleSpec(base["encoder"].name, dict(base["encoder"].kwargs))
        else:
            base.pop("decoder", None)
    if decoder:
        base["decoder"] = parse_part(decoder, "decoder")
    if mae_decoder:
        base["decoder"] = ModuleSpec("mae", {"path": str(mae_decoder)})
    if "encoder" not in base:
        raise ConfigError("vision parts are needed: --encoder FAMILY:SOURCE, --mae PATH|ID or --vision-config FILE")
    for key in ("adapter", "deadapter"):
        if isinstance(overrides.get(key), str):
            overrides[key] = ModuleSpec(overrides[key])
    base.update(overrides)
    return resolve_hub_folders(ModelConfig(**base))
