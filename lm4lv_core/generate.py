"""Batched, KV-cached autoregressive generation of text and images (pure tensor code).

Generation continues each conversation from its last, empty gpt turn:

* prefill: the left-padded batch (attention mask, position ids ``cumsum(mask) - 1``) runs through
  the LLM backbone once and fills a KV cache;
* decode: one new input embedding per sample per step. Each sample is a small state machine:

  - *text*: the next token comes from the LM head (greedy, or temperature / top-k / top-p sampling
    with a per-sample ``torch.Generator``, so a sample's output does not depend on its batch);
    when the text ids end with the ids of ``<Img>``, the sample switches to *image*;
  - *image*: ``f_i = deadapter(h_last)`` is visual token ``i`` and ``adapter(f_i)`` is the next input
    embedding; after N tokens the ids of ``</Img>`` are fed as forced text and text resumes;
  - *done*: after EOS or ``max_new_tokens`` sampled tokens (or after the first image in
    image-only mode). Finished samples feed a masked-out position until the whole batch ends.

* the MAE decoder turns each image's N features into pixels.

``naive_generate_images`` is the reference algorithm (batch 1, the whole sequence recomputed at
every step, no cache); tests and ``benchmarks/generate.py`` compare the two.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .compiled_decode import compiled_decode, eager_step
from .data.dataset import Batch, LM4LVDataset, collate, tensor_to_uint8
from .data.format import TASK_TOKEN, Sample, parse_sample
from .data.sequence import IMG_END, IMG_START, SLOT_TEXT
from .errors import ConfigError

TEXT, IMAGE, DONE = 0, 1, 2
MODES = ("auto", "image", "text")


@dataclass
class GenerationConfig:
    """Decoding options. ``temperature == 0`` is greedy decoding.

    ``mode``: ``image`` forces every answer to start with ``<Img>`` and stops after that image
    (the reference's image-only mode); ``text`` lets the model write text and images freely;
    ``auto`` uses ``image`` for samples whose prompt holds ``<task>`` (restoration data) and
    ``text`` for the others (e.g. captioning).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    mode: str = "auto"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def image_only_for(sample: Sample, mode: str) -> bool:
    """Whether ``sample`` is generated in image-only mode under ``mode``."""
    if mode == "auto":
        return any(t.role != "gpt" and TASK_TOKEN in t.value for t in sample.turns)
    return mode == "image"


@dataclass
class SampleOutput:
    """What one sample produced: its answer text (each generated image shown as ``<image>``),
    the generated text token ids, and per image its features ``[N, d_v]`` (and pixels)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)  # [3, H, W] in [0, 1]


# ---------------------------------------------------------------------------- sampling
def sample_generator(seed: int, key: int, device: torch.device) -> torch.Generator:
    """The generator of one sample: seeded by (seed, sample key), independent of the batch."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + key * 7_919 + 0x5EED) % (2**63 - 1))
    return g


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """``[R, V]`` logits → temperature-scaled logits with tokens outside top-k / top-p at -inf."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, cfg: GenerationConfig, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row: argmax when greedy, else a draw from each row's own generator."""
    if cfg.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
    return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])


# ---------------------------------------------------------------------------- generation
class _State:
    """Per-sample bookkeeping of the decode loop (host side; tensors stay on the device)."""

    def __init__(self, tail: list[int], image_only: bool, start_image: bool):
        self.mode = IMAGE if start_image else TEXT
        self.image_only = image_only
        self.tail = tail            # all text ids so far (prompt tail and generated)
        self.segments: list[list[int] | None] = [[]]  # text runs; None marks an image
        self.generated: list[int] = []
        self.n_sampled = 0
        self.n_vis = 0              # visual tokens produced in the current image
        self.forced: list[int] = []  # ids still to feed (</Img>)
        if start_image:
            self.segments.append(None)


def _ends_with(ids: list[int], suffix: list[int]) -> bool:
    return bool(suffix) and len(ids) >= len(suffix) and ids[-len(suffix):] == suffix


@torch.inference_mode()
def generate_batch(model, batch: Batch, cfg: GenerationConfig, *, image_only: Sequence[bool],
                   keys: Sequence[int] | None = None, decode_images: bool = True,
                   compile: bool = False) -> list[SampleOutput]:
    """Generate for a left-padded batch (``collate(..., padding_side="left")`` of generation items).

    ``image_only[b]``: sample ``b`` was encoded with the forced ``<Img>`` opening and stops after
    one image. ``keys`` (default: the batch's sample indices) seed each sample's generator.
    ``compile``: run the decode steps of an image-only batch through ``torch.compile``.
    """
    B = batch.size
    dev = batch.input_ids.device
    n_vis = model.num_visual_tokens
    tok = model.builder
    start_ids, end_ids, eos = tok.text_ids(IMG_START), tok.text_ids(IMG_END), tok.eos_id
    keys = list(keys) if keys is not None else list(batch.sample_index)
    embed_tokens = model.llm.get_input_embeddings()
    adapter_dtype = model.adapter_dtype

    # ---- prefill
    feats = batch.features if batch.features is not None else (
        model.encode_images(batch.pixels) if batch.pixels.shape[0] else None)
    emb = model.embed(batch.input_ids, batch.slot_type, batch.slot_image, batch.slot_pos, feats)
    mask = batch.attention_mask
    L = batch.input_ids.shape[1]
    final_len = L + n_vis if all(image_only) else None
    step = compiled_decode(model) if compile and final_len else None
    cache = step.cache_for(B, final_len) if step else new_cache(model, final_len)
    fixed = static_length(cache)
    if fixed:  # a fixed-size mask over the whole cache; slot L + t is opened at decode step t
        mask = torch.cat([mask, mask.new_zeros(B, fixed - L)], dim=1)
    out = model.backbone()(inputs_embeds=emb, attention_mask=mask, position_ids=batch.position_ids,
                           cache=cache, use_cache=True)
    cache, h = out.cache, out.last_hidden_state[:, -1]
    pos = batch.position_ids[:, -1] + 1
    step = step or functools.partial(eager_step, model.backbone())
    n_steps = 0

    states = []
    for b in range(B):
        ids, stype, m = batch.input_ids[b].tolist(), batch.slot_type[b].tolist(), batch.attention_mask[b].tolist()
        tail = [i if s == SLOT_TEXT and k else -1 for i, s, k in zip(ids, stype, m)][-max(len(start_ids), 1):]
        start_image = _ends_with(tail, start_ids)
        if image_only[b] and not start_image:
            raise ConfigError(f"sample {keys[b]}: image-only generation needs a prompt that ends with {IMG_START}")
        states.append(_State(tail, image_only[b], start_image))
    generators = [sample_generator(cfg.seed, k, dev) for k in keys] if not cfg.greedy else []
    cur = torch.zeros(B, n_vis, model.encoder.dim, dtype=adapter_dtype, device=dev)
    pad_emb = embed_tokens(torch.tensor([tok.pad_id], device=dev))[0]
    arange = torch.arange(B, device=dev)
    outputs = [SampleOutput() for _ in range(B)]
    for b, st in enumerate(states):
        if st.mode == TEXT and cfg.max_new_tokens == 0:
            st.mode = DONE

    # ---- decode
    while True:
        modes = [st.mode for st in states]
        if all(m == DONE for m in modes):
            break
        next_emb = pad_emb.expand(B, -1).clone()
        active = torch.tensor([m != DONE for m in modes], device=dev)
        img_rows = [b for b, m in enumerate(modes) if m == IMAGE]
        if img_rows:
            f = model.deadapter(h.to(adapter_dtype))  # all rows: one matmul, no gather
            if len(img_rows) == B:
                cur[arange, torch.tensor([st.n_vis for st in states], device=dev)] = f
            else:
                rows = torch.tensor(img_rows, device=dev)
                cur[rows, torch.tensor([states[b].n_vis for b in img_rows], device=dev)] = f[rows]
            feed = []
            for b in img_rows:
                st = states[b]
                st.n_vis += 1
                if st.n_vis < n_vis:
                    feed.append(b)
                    continue
                outputs[b].features.append(cur[b].clone())
                st.n_vis = 0
                if st.image_only:
                    st.mode = DONE
                    active[b] = False
                else:
                    st.mode, st.forced = TEXT, list(end_ids)
                    st.segments.append([])
                    feed.append(b)
            if len(feed) == B:
                next_emb = model.adapter(f).to(next_emb.dtype)
            elif feed:
                rows = torch.tensor(feed, device=dev)
                next_emb[rows] = model.adapter(f[rows]).to(next_emb.dtype)
        text_rows = [b for b, m in enumerate(modes) if m == TEXT]
        if text_rows:
            chosen: dict[int, int] = {}
            sample_rows = [b for b in text_rows if not states[b].forced]
            if sample_rows:
                logits = model.lm_head()(h[torch.tensor(sample_rows, device=dev)])
                gens = [generators[b] for b in sample_rows] if generators else []
                chosen.update(zip(sample_rows, next_tokens(logits, cfg, gens).tolist()))
            feed = []
            for b in text_rows:
                st = states[b]
                if st.forced:
                    chosen[b] = st.forced.pop(0)
                    st.tail.append(chosen[b])
                    feed.append(b)
                    continue
                t = chosen[b]
                st.n_sampled += 1
                st.generated.append(t)
                if t == eos:
                    st.mode = DONE
                    active[b] = False
                    continue
                st.tail.append(t)
                st.segments[-1].append(t)
                if _ends_with(st.tail, start_ids):
                    del st.segments[-1][len(st.segments[-1]) - len(start_ids):]
                    st.segments.append(None)
                    st.mode = IMAGE
                elif st.n_sampled >= cfg.max_new_tokens:
                    st.mode = DONE
                    active[b] = False
                    continue
                feed.append(b)
            if feed:
                ids = torch.tensor([chosen[b] for b in feed], device=dev)
                next_emb[torch.tensor(feed, device=dev)] = embed_tokens(ids)
        if all(st.mode == DONE for st in states):
            break
        if fixed:
            mask[:, L + n_steps] = active.to(mask.dtype)
        else:
            mask = torch.cat([mask, active.to(mask.dtype)[:, None]], dim=1)
        h = step(next_emb[:, None], mask, pos[:, None], cache)
        pos = pos + active.to(pos.dtype)
        n_steps += 1

    for b, st in enumerate(states):
        o = outputs[b]
        o.token_ids = st.generated
        o.text = "".join("<image>" if seg is None else model.tokenizer.decode(seg, skip_special_tokens=True)
                         for seg in st.segments)
    if decode_images:
        flat = [(b, k) for b, o in enumerate(outputs) for k in range(len(o.features))]
        if flat:
            pixels = decode_images_of(model, torch.stack([outputs[b].features[k] for b, k in flat]))
            for (b, _), img in zip(flat, pixels):
                outputs[b].images.append(img)
    return outputs


def new_cache(model, max_len: int | None):
    """A KV cache for the backbone: preallocated (``StaticCache``) when the final length is known
    (image-only batches: prompt + N), which avoids re-concatenating the whole cache every step;
    otherwise a ``DynamicCache``."""
    from transformers import DynamicCache, StaticCache

    config = model.backbone().config
    if max_len is not None:
        try:
            return StaticCache(config=config, max_cache_len=max_len)
        except (TypeError, ValueError, NotImplementedError):
            pass
    return DynamicCache(config=config)


def static_length(cache) -> int | None:
    """The preallocated length of a ``StaticCache`` (``None`` for a growing cache)."""
    from transformers import StaticCache

    if not isinstance(cache, StaticCache) or any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        return None
    return cache.layers[0].max_cache_len


def decode_images_of(model, features: torch.Tensor) -> torch.Tensor:
    """``[M, N, d_v]`` generated features → ``[M, 3, H, W]`` in [0, 1] through the vision decoder."""
    need = getattr(model.decoder, "num_tokens", features.shape[1])
    if features.shape[1] != need:
        raise ConfigError(f"the decoder needs {need} visual tokens per image but the model generates "
                          f"{features.shape[1]} (num_visual_tokens); images cannot be decoded")
    return model.decode_features(features)


@torch.inference_mode()
def naive_generate_images(model, batch: Batch) -> torch.Tensor:
    """The reference algorithm for one image-only sample: N steps, each recomputing the whole
    sequence without a cache. ``batch`` holds one sample whose prompt ends with ``<Img>``.
    Returns the generated features ``[N, d_v]``."""
    if batch.size != 1:
        raise ValueError("naive_generate_images takes a batch of one sample")
    feats = batch.features if batch.features is not None else (
        model.encode_images(batch.pixels) if batch.pixels.shape[0] else None)
    emb = model.embed(batch.input_ids, batch.slot_type, batch.slot_image, batch.slot_pos, feats)
    out = []
    for _ in range(model.num_visual_tokens):
        L = emb.shape[1]
        h = model.backbone()(inputs_embeds=emb, attention_mask=torch.ones(1, L, dtype=torch.long, device=emb.device),
                             position_ids=torch.arange(L, device=emb.device)[None], use_cache=False).last_hidden_state
        f = model.deadapter(h[:, -1].to(model.adapter_dtype))
        out.append(f[0])
        emb = torch.cat([emb, model.adapter(f).to(emb.dtype)[:, None]], dim=1)
    return torch.stack(out)


# ---------------------------------------------------------------------------- samples & API
def build_items(model, samples: Sequence[Sample], mode: str, loader=None):
    """Dataset items of generation samples, each encoded in its own mode."""
    kw = {"loader": loader} if loader is not None else {}
    size = model.encoder.image_size
    ds_img = LM4LVDataset(samples, model.builder, size, generation=True, image_only=True, **kw)
    ds_txt = LM4LVDataset(samples, model.builder, size, generation=True, image_only=False, **kw)
    flags = [image_only_for(s, mode) for s in samples]
    return [(ds_img if f else ds_txt)[i] for i, f in enumerate(flags)], flags


def model_device(model) -> torch.device:
    return next(model.adapter.parameters()).device


def generate_samples(model, samples: Sequence[Sample], cfg: GenerationConfig | None = None, *,
                     batch_size: int = 8, loader=None, decode_images: bool = True,
                     on_batch=None, compile: bool = False) -> list[SampleOutput]:
    """Generate for ``samples`` (in order) in batches of ``batch_size``.

    ``on_batch(samples, outputs)`` is called after each batch (e.g. to write results);
    ``compile``: compiled decode steps for image-only batches (``generate_batch``).
    """
    cfg = cfg or GenerationConfig()
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    dev = model_device(model)
    dtype = model.adapter_dtype
    need = getattr(model.decoder, "num_tokens", model.num_visual_tokens)
    if decode_images and need != model.num_visual_tokens:
        raise ConfigError(f"the decoder needs {need} visual tokens per image but the model generates "
                          f"{model.num_visual_tokens} (num_visual_tokens); images cannot be decoded")
    results: list[SampleOutput] = []
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start:start + batch_size])
        items, flags = build_items(model, chunk, cfg.mode, loader)
        batch = collate(items, pad_id=model.builder.pad_id, padding_side="left").to(dev, dtype)
        outs = generate_batch(model, batch, cfg, image_only=flags, decode_images=decode_images, compile=compile)
        if on_batch is not None:
            on_batch(chunk, outs)
        results += outs
    return results


def restore(model, images, prompt: str = "<image> <task>", *, batch_size: int = 8,
            cfg: GenerationConfig | None = None):
    """Restore PIL images with a loaded model (image-only generation); returns PIL images.

    ``prompt`` is the human turn; its ``<image>`` is the input image.
    """
    from PIL import Image

    cfg = cfg or GenerationConfig(mode="image")
    if prompt.count("<image>") != 1:
        raise ConfigError(f"restore prompt must hold exactly one <image>, got {prompt!r}")
    names = [f"mem:{i}" for i in range(len(images))]
    table = dict(zip(names, images))
    samples = [parse_sample({"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}],
                             "image": [n]}, i, source="restore") for i, n in enumerate(names)]
    loader = lambda p: table[p].convert("RGB")  # noqa: E731
    was_training = model.training
    model.eval()
    try:
        outs = generate_samples(model, samples, cfg, batch_size=batch_size, loader=loader)
    finally:
        model.train(was_training)
    result = []
    for i, o in enumerate(outs):
        if not o.images:
            raise ConfigError(f"image {i}: the model produced no image")
        result.append(Image.fromarray(tensor_to_uint8(o.images[0])))
    return result
