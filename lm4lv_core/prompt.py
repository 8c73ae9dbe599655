"""Render a sample's prompt without loading the model weights (for ``--dry-run``)."""

from __future__ import annotations

from .config import ModelConfig
from .data.format import Sample
from .data.sequence import SLOT_IMAGE, SLOT_TASK, SequenceBuilder, IGNORE_INDEX


def vision_token_count(cfg: ModelConfig) -> int:
    """Visual tokens per image, read from the encoder config when possible (no weights loaded)."""
    if cfg.encoder.name == "mae":
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(cfg.encoder.kwargs["path"])
        n = 1 + (c.image_size // c.patch_size) ** 2
    else:
        from .vision import build_encoder

        n = build_encoder(cfg.encoder).num_tokens
    return min(n, cfg.num_visual_tokens or n)


def render_first_prompt(cfg: ModelConfig, sample: Sample) -> tuple[str, dict[str, int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.llm)
    builder = SequenceBuilder(tok, template=cfg.template, num_task_tokens=cfg.num_task_tokens,
                              num_visual_tokens=vision_token_count(cfg), gpt_prefix=cfg.gpt_prefix,
                              system_prompt=cfg.system_prompt)
    enc = builder.encode(sample)
    counts = {
        "tokens": len(enc),
        "text tokens": int((enc.slot_type == 0).sum()),
        "image slots": int((enc.slot_type == SLOT_IMAGE).sum()),
        "target image slots": int(enc.target_mask.sum()),
        "task slots": int((enc.slot_type == SLOT_TASK).sum()),
        "text-loss tokens": int((enc.labels != IGNORE_INDEX).sum()),
    }
    return enc.text, counts
