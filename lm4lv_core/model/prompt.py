"""Render a sample's prompt for ``--dry-run``: with the LLM's tokenizer and the encoder's token count
(the vision family tells it from its config), without loading the LLM or any weights."""

from __future__ import annotations

from ..config import ModelConfig
from ..data.format import Sample
from ..data.sequence import SLOT_IMAGE, SLOT_QUERY, SLOT_TASK, SLOT_TEXT, Encoded, SequenceBuilder, IGNORE_INDEX


def vision_token_count(cfg: ModelConfig) -> int:
    """Visual tokens per image, as the encoder's family tells from its config."""
    from ..vision import visual_space

    return visual_space(cfg).num_tokens


def config_sequence(cfg: ModelConfig) -> SequenceBuilder:
    """The sequence layout of a model of ``cfg`` (:meth:`SequenceBuilder.for_model`, as the model
    builds it) from the LLM's tokenizer and the encoder's config alone, no weights loaded."""
    from transformers import AutoTokenizer

    return SequenceBuilder.for_model(cfg, AutoTokenizer.from_pretrained(cfg.llm), vision_token_count(cfg))


def token_view(enc: Encoded, tokenizer) -> str:
    """The sequence token by token: text tokens as the tokenizer's strings, each image / query / task
    block as one ``[...]`` item; runs that carry a loss (text loss or target image) are wrapped in « »."""
    items: list[tuple[str, bool]] = []
    ids, labels, stype = enc.input_ids.tolist(), enc.labels.tolist(), enc.slot_type.tolist()
    simg, spos = enc.slot_image.tolist(), enc.slot_pos.tolist()
    targets = enc.image_is_target.tolist()
    for i, t in enumerate(stype):
        if t == SLOT_TEXT:
            items.append((str(tokenizer.convert_ids_to_tokens(ids[i])), labels[i] != IGNORE_INDEX))
        elif spos[i] == 0 and t in (SLOT_IMAGE, SLOT_QUERY):
            n = 1
            while i + n < len(stype) and stype[i + n] == t and spos[i + n] == n:
                n += 1
            target = simg[i] >= 0 and targets[simg[i]]
            if t == SLOT_IMAGE:
                label = f"image {simg[i]}: {n} slots" + (", target" if target else "")
            else:  # the hidden state at each query slot predicts its token
                of = f" for image {simg[i]}" if simg[i] >= 0 else ""
                label = f"query{of}: {n} slots" + (", target read here" if target else "")
            items.append((f"[{label}]", target))
        elif spos[i] == 0 and t == SLOT_TASK:
            n = 1
            while i + n < len(stype) and stype[i + n] == SLOT_TASK and spos[i + n] == n:
                n += 1
            items.append((f"[task: {n} slots]", False))
    out: list[str] = []
    for k, (s, trained) in enumerate(items):
        before = items[k - 1][1] if k else False
        after = items[k + 1][1] if k + 1 < len(items) else False
        out.append(("«" if trained and not before else "") + s + ("»" if trained and not after else ""))
    return " ".join(out)


def vision_summary(cfg: ModelConfig) -> str:
    """One line on what the LLM sees of an image: family, token count and kind, adapters, loss."""
    from ..vision import visual_space

    space = visual_space(cfg)
    kind = f"codes of a codebook of {space.codebook_size}" if space.codebook_size else f"features of width {space.dim}"
    decoder = cfg.decoder.name if cfg.decoder is not None else "none (text answers only)"
    return (f"vision: encoder {cfg.encoder.name}, {space.num_tokens} tokens per image at {space.image_size} px "
            f"({kind}); decoder {decoder}; adapter {cfg.adapter.name if cfg.adapter else space.default_adapter}, "
            f"deadapter {cfg.deadapter.name if cfg.deadapter else 'linear'}, "
            f"loss {cfg.vision_loss or space.default_loss}")


def render_first_prompt(cfg: ModelConfig, sample: Sample) -> tuple[str, str, dict[str, int]]:
    """The sample's rendered text (the exact string the template tokenises), its ``token_view``,
    and counts of tokens, slots and trained positions."""
    builder = config_sequence(cfg)
    enc = builder.encode(sample)
    counts = {
        "tokens": len(enc),
        "text tokens": int((enc.slot_type == 0).sum()),
        "image slots": int((enc.slot_type == SLOT_IMAGE).sum()),
        "target image slots": int(enc.target_mask.sum()),
        "query slots": int((enc.slot_type == SLOT_QUERY).sum()),
        "task slots": int((enc.slot_type == SLOT_TASK).sum()),
        "text-loss tokens": int((enc.labels != IGNORE_INDEX).sum()),
    }
    return enc.text, token_view(enc, builder.tok), counts
