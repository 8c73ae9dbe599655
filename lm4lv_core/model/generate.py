"""Batched, KV-cached autoregressive generation of text and images, and its in-memory entry
points: ``build_items`` turns samples into dataset items (loading and resizing their images),
``generate_samples`` generates for them in batches (restoration builds on it: :mod:`.restore`).
Result files are written by ``lm4lv_core.jobs.generate``.

Generation continues each conversation from its last, empty gpt turn:

* prefill: the left-padded batch (attention mask, position ids ``cumsum(mask) - 1``) runs through
  the LLM backbone once and fills a KV cache;
* decode: one new input embedding per sample per step. Each sample is a small state machine:

  - *text*: the next token comes from the LM head (greedy, or temperature / top-k / top-p sampling
    with a per-sample ``torch.Generator``, so a sample's output does not depend on its batch);
    when the text ends with ``<Img>``, the sample switches to *image*;
  - *image*: ``f_i = deadapter(h_last)`` predicts visual token ``i``; the token space turns it into
    the token (the feature itself, or a code chosen from the logits: argmax, or a sample under
    temperature / top-k / top-p) and ``adapter(token)`` is the next input embedding; after N tokens the ids of ``</Img>`` are fed as forced text and text resumes;
  - *done*: after EOS, after the template's stop string (``###`` for ``default``; it is not part
    of the answer text, nor is the line break before it), after ``max_new_tokens`` sampled tokens,
    or after the first image in image-only mode. Finished samples feed a masked-out position
    until the whole batch ends.

* a model trained on ``<query>`` answers reads the image of an image-only sample in the prefill
  instead: its prompt ends with ``<Img>`` + N learnable query slots and the N hidden states there
  give the N tokens at once (:mod:`.query`); the sample is then done;
* the vision decoder turns each image's N tokens into pixels.

``naive_generate_images`` is the reference algorithm (batch 1, the whole sequence recomputed at
every step, no cache); tests and ``benchmarks/generate.py`` compare the two.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .compiled_decode import compiled_decode, eager_step
from .query import check_query, query_rows, read_query
from ..data.dataset import Batch, LM4LVDataset, collate, tensor_to_uint8
from ..data.format import TASK_TOKEN, Sample
from ..data.sequence import IMG_START, SLOT_TEXT
from ..defaults import GENERATE_BATCH_SIZE
from ..errors import ConfigError
from ..config import GenerationConfig  # noqa: F401  (declared with the other configs)
from ..image.io import resize_to, restored_size
from ..util.params import parameter_device

TEXT, IMAGE, DONE = 0, 1, 2


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
        self.tail = tail            # the last text ids (prompt tail and generated; -1 at slots)
        self.stop = ""              # the stop string that ended the answer
        self.segments: list[list[int] | None] = [[]]  # text runs; None marks an image
        self.generated: list[int] = []
        self.n_sampled = 0
        self.n_vis = 0              # visual tokens produced in the current image
        self.forced: list[int] = []  # ids still to feed (</Img>)
        if start_image:
            self.segments.append(None)
            self.tail.append(-1)


_WINDOW = 16  # text tokens decoded to find <Img> and stop strings (each token is >= 1 character)


def _tail_text(tokenizer, ids: list[int]) -> str:
    """The decoded text of the last run of text ids (at most ``_WINDOW``; -1 marks a slot)."""
    run: list[int] = []
    for i in reversed(ids[-_WINDOW:]):
        if i < 0:
            break
        run.append(i)
    return tokenizer.decode(run[::-1]) if run else ""


def _answer_text(tokenizer, st: _State) -> str:
    """The answer: text runs with each generated image as ``<image>`` (its ``<Img>`` dropped) and
    without the stop string (and the line break before it)."""
    parts = []
    for k, seg in enumerate(st.segments):
        if seg is None:
            parts.append("<image>")
            continue
        text = tokenizer.decode(seg, skip_special_tokens=True)
        if k + 1 < len(st.segments):  # an image follows: its <Img> (maybe begun in the prompt) goes
            cut = next((j for j in range(len(IMG_START), 0, -1) if text.endswith(IMG_START[-j:])), 0)
            text = text[:len(text) - cut]
        elif st.stop and text.endswith(st.stop):
            text = text[:-len(st.stop)]
            text = text[:-1] if text.endswith("\n") else text
        parts.append(text)
    return "".join(parts)


@dataclass
class _Decode:
    """The decode loop of one batch: per-sample bookkeeping (host side) and the tensors it feeds
    the backbone (device side)."""

    model: object
    cfg: GenerationConfig
    states: list[_State]
    generators: list[torch.Generator]  # one per sample; empty when greedy
    step: Callable                     # (emb [B, 1, d], mask, pos [B, 1], cache) → h [B, d]
    cache: object
    h: torch.Tensor                    # [B, d] the last hidden state of each sample
    mask: torch.Tensor                 # [B, *] attention mask (fixed size over a static cache)
    pos: torch.Tensor                  # [B] position id of each sample's next input
    fixed: int | None                  # the static cache's length (None: the mask grows)
    prompt_len: int
    cur: torch.Tensor                  # [B, N, d_v] features or [B, N] codes of the image in progress
    pad_emb: torch.Tensor              # [d] the input of finished samples
    outputs: list[SampleOutput] = field(default_factory=list)
    n_steps: int = 0

    @property
    def device(self) -> torch.device:
        return self.mask.device


@torch.inference_mode()
def generate_batch(model, batch: Batch, cfg: GenerationConfig, *, image_only: Sequence[bool],
                   keys: Sequence[int] | None = None, decode_images: bool = True,
                   compile: bool = False) -> list[SampleOutput]:
    """Generate for a left-padded batch (``collate(..., padding_side="left")`` of generation items).

    ``image_only[b]``: sample ``b`` was encoded with the forced ``<Img>`` opening and stops after
    one image. ``keys`` (default: the batch's sample indices) seed each sample's generator.
    ``compile``: run the decode steps of an image-only batch through ``torch.compile``.
    """
    keys = list(keys) if keys is not None else list(batch.sample_index)
    d = _prefill(model, batch, cfg, image_only, keys, compile)  # (images of query rows read there)
    while True:
        modes = [st.mode for st in d.states]
        if all(m == DONE for m in modes):
            break
        next_emb = d.pad_emb.expand(batch.size, -1).clone()
        active = torch.tensor([m != DONE for m in modes], device=d.device)
        img_rows = [b for b, m in enumerate(modes) if m == IMAGE]
        text_rows = [b for b, m in enumerate(modes) if m == TEXT]
        if img_rows:
            next_emb = _image_step(d, img_rows, next_emb, active)
        if text_rows:
            _text_step(d, text_rows, next_emb, active)
        if all(st.mode == DONE for st in d.states):
            break
        _advance(d, next_emb, active)
    return _finish(d, decode_images)


def _prefill(model, batch: Batch, cfg: GenerationConfig, image_only: Sequence[bool], keys: list[int],
             compile: bool) -> _Decode:
    """Run the prompts through the backbone into a KV cache (a static one, compiled decode steps
    with ``compile``, when every sample is image-only; none when every sample ends with query
    slots); the decode state after the prompts, with the images of query rows read."""
    B, L = batch.input_ids.shape
    dev = batch.input_ids.device
    emb = model.embed(batch.input_ids, batch.slot_type, batch.slot_image, batch.slot_pos,
                      model.batch_features(batch))
    mask = batch.attention_mask
    qrows = query_rows(batch)
    decode = len(qrows) < B  # rows that go on one token per step
    final_len = L + model.num_visual_tokens if all(image_only) else None
    step = compiled_decode(model) if compile and final_len and decode else None
    cache = (step.cache_for(B, final_len) if step else new_cache(model, final_len)) if decode else None
    fixed = static_length(cache) if decode else None
    if fixed:  # a fixed-size mask over the whole cache; slot L + t is opened at decode step t
        mask = torch.cat([mask, mask.new_zeros(B, fixed - L)], dim=1)
    out = model.backbone()(inputs_embeds=emb, attention_mask=mask, position_ids=batch.position_ids,
                           cache=cache, use_cache=decode)
    states = _initial_states(model.tokenizer, batch, cfg, image_only, keys, set(qrows))
    generators = [sample_generator(cfg.seed, k, dev) for k in keys] if not cfg.greedy else []
    pad_emb = model.llm.get_input_embeddings()(torch.tensor([model.builder.pad_id], device=dev))[0]
    outputs = [SampleOutput() for _ in range(B)]
    if qrows:
        pick_for = lambda rows: lambda logits: next_tokens(  # noqa: E731 - each row draws from its own generator
            logits, cfg, [generators[b] for b in rows] if generators else [])
        for b, tokens in zip(qrows, read_query(model, out.last_hidden_state, qrows, pick_for)):
            outputs[b].features.append(tokens)
    return _Decode(model=model, cfg=cfg, states=states, generators=generators,
                   step=step or functools.partial(eager_step, model.backbone()), cache=out.cache if decode else None,
                   h=out.last_hidden_state[:, -1], mask=mask, pos=batch.position_ids[:, -1] + 1,
                   fixed=fixed, prompt_len=L, pad_emb=pad_emb,
                   cur=model.space.empty(B, dev, model.adapter_dtype), outputs=outputs)


def _initial_states(tokenizer, batch: Batch, cfg: GenerationConfig, image_only: Sequence[bool],
                    keys: list[int], query: set[int] = frozenset()) -> list[_State]:
    """Each sample's state after its prompt: *image* when the prompt ends with ``<Img>``, else
    *text* (*done* at once when no token may be sampled, or for ``query`` rows, whose image the
    prefill reads)."""
    states = []
    for b in range(batch.size):
        if b in query:
            st = _State([-1], True, start_image=True)
            st.mode = DONE
            states.append(st)
            continue
        ids, stype, m = batch.input_ids[b].tolist(), batch.slot_type[b].tolist(), batch.attention_mask[b].tolist()
        tail = [i if s == SLOT_TEXT and k else -1 for i, s, k in zip(ids, stype, m)][-_WINDOW:]
        start_image = _tail_text(tokenizer, tail).endswith(IMG_START)
        if image_only[b] and not start_image:
            raise ConfigError(f"sample {keys[b]}: image-only generation needs a prompt that ends with {IMG_START}")
        st = _State(tail, image_only[b], start_image)
        if st.mode == TEXT and cfg.max_new_tokens == 0:
            st.mode = DONE
        states.append(st)
    return states


def _image_step(d: _Decode, rows: list[int], next_emb: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Rows emitting a visual token: the token of ``deadapter(h)`` joins the image in progress and
    ``adapter(token)`` is the next input; a finished image goes to the outputs and the sample ends
    (image-only) or feeds ``</Img>`` next. Returns the next inputs."""
    model, dev, n_vis = d.model, d.device, d.model.num_visual_tokens
    every = len(rows) == len(d.states)
    idx = None if every else torch.tensor(rows, device=dev)
    head = model.deadapter(d.h.to(model.adapter_dtype))  # all rows: one matmul, no gather
    gens = [d.generators[b] for b in rows] if d.generators else []
    pick = lambda logits: next_tokens(logits, d.cfg, gens)  # noqa: E731 - codes: only the image rows draw
    tok = model.space.next_token(head if every else head[idx], pick)
    slots = torch.tensor([d.states[b].n_vis for b in rows], device=dev)
    d.cur[torch.arange(len(rows), device=dev) if every else idx, slots] = tok
    f = model.space.adapter_input(tok, model.adapter_dtype)
    feed = []
    for b in rows:
        st = d.states[b]
        st.n_vis += 1
        if st.n_vis < n_vis:
            feed.append(b)
            continue
        d.outputs[b].features.append(d.cur[b].clone())
        st.n_vis = 0
        if st.image_only:
            st.mode = DONE
            active[b] = False
        else:
            st.mode, st.forced = TEXT, list(model.builder.image_end_ids())
            st.segments.append([])
            feed.append(b)
    if len(feed) == len(d.states):
        return model.adapter(f).to(next_emb.dtype)
    if feed:
        pos = {b: i for i, b in enumerate(rows)}
        next_emb[torch.tensor(feed, device=dev)] = model.adapter(f[torch.tensor([pos[b] for b in feed], device=dev)]
                                                                 ).to(next_emb.dtype)
    return next_emb


def _text_step(d: _Decode, rows: list[int], next_emb: torch.Tensor, active: torch.Tensor) -> None:
    """Rows emitting a text token: a forced one (``</Img>``) or one sampled from the LM head;
    its embedding goes into ``next_emb`` unless the sample ends with it."""
    dev = d.device
    chosen: dict[int, int] = {}
    sample_rows = [b for b in rows if not d.states[b].forced]
    if sample_rows:
        logits = d.model.logits(d.h[torch.tensor(sample_rows, device=dev)])
        gens = [d.generators[b] for b in sample_rows] if d.generators else []
        chosen.update(zip(sample_rows, next_tokens(logits, d.cfg, gens).tolist()))
    feed = []
    for b in rows:
        st = d.states[b]
        if st.forced:
            chosen[b] = st.forced.pop(0)
            st.tail.append(chosen[b])
            feed.append(b)
        elif _take_token(d, st, chosen[b]):
            feed.append(b)
        else:
            active[b] = False
    if feed:
        ids = torch.tensor([chosen[b] for b in feed], device=dev)
        next_emb[torch.tensor(feed, device=dev)] = d.model.llm.get_input_embeddings()(ids)


def _take_token(d: _Decode, st: _State, t: int) -> bool:
    """Record sampled token ``t`` of a sample; whether it goes on (EOS, a stop string or the
    token limit end it; a completed ``<Img>`` switches it to *image*)."""
    builder, tokenizer = d.model.builder, d.model.tokenizer
    st.n_sampled += 1
    st.generated.append(t)
    if t == builder.eos_id:
        st.mode = DONE
        return False
    st.tail.append(t)
    st.segments[-1].append(t)
    stops = builder.stop_strings
    text = _tail_text(tokenizer, st.segments[-1]) if stops else ""
    st.stop = next((x for x in stops if text.endswith(x)), "")
    if _tail_text(tokenizer, st.tail).endswith(IMG_START):
        st.segments.append(None)
        st.tail.append(-1)
        st.mode = IMAGE
    elif st.stop or st.n_sampled >= d.cfg.max_new_tokens:
        st.mode = DONE
        return False
    return True


def _advance(d: _Decode, next_emb: torch.Tensor, active: torch.Tensor) -> None:
    """One backbone step on the next inputs; finished samples' positions stay masked out."""
    if d.fixed:
        d.mask[:, d.prompt_len + d.n_steps] = active.to(d.mask.dtype)
    else:
        d.mask = torch.cat([d.mask, active.to(d.mask.dtype)[:, None]], dim=1)
    d.h = d.step(next_emb[:, None], d.mask, d.pos[:, None], d.cache)
    d.pos = d.pos + active.to(d.pos.dtype)
    d.n_steps += 1


def _finish(d: _Decode, decode_images: bool) -> list[SampleOutput]:
    """The outputs: answer texts and token ids, and (``decode_images``) the pixels of every
    generated image, all decoded in one batch."""
    for st, o in zip(d.states, d.outputs):
        o.token_ids = st.generated
        o.text = _answer_text(d.model.tokenizer, st)
    if decode_images:
        flat = [(b, k) for b, o in enumerate(d.outputs) for k in range(len(o.features))]
        if flat:
            pixels = decode_images_of(d.model, torch.stack([d.outputs[b].features[k] for b, k in flat]))
            for (b, _), img in zip(flat, pixels):
                d.outputs[b].images.append(img)
    return d.outputs


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


def check_decodable(model, n_tokens: int) -> None:
    """One-line error when the model has no vision decoder, or it cannot turn images of
    ``n_tokens`` visual tokens into pixels."""
    if model.decoder is None:
        from ..vision import cannot_paint

        raise ConfigError(f"{cannot_paint(model.config, model.encoder.space)}; use --mode text")
    need = model.decoder.num_tokens
    if n_tokens != need:
        raise ConfigError(f"the decoder needs {need} visual tokens per image but the model generates "
                          f"{n_tokens} (num_visual_tokens); images cannot be decoded")


def decode_images_of(model, features: torch.Tensor) -> torch.Tensor:
    """Generated tokens ``[M, N(, d_v)]`` → ``[M, 3, H, W]`` in [0, 1] through the vision decoder."""
    check_decodable(model, features.shape[1])
    return model.decode_tokens(features)


@torch.inference_mode()
def naive_generate_images(model, batch: Batch) -> torch.Tensor:
    """The reference algorithm for one image-only sample: N steps, each recomputing the whole
    sequence without a cache. ``batch`` holds one sample whose prompt ends with ``<Img>``.
    Returns the generated tokens: features ``[N, d_v]``, or codes ``[N]`` (argmax)."""
    if batch.size != 1:
        raise ValueError("naive_generate_images takes a batch of one sample")
    emb = model.embed(batch.input_ids, batch.slot_type, batch.slot_image, batch.slot_pos,
                      model.batch_features(batch))
    out = []
    for _ in range(model.num_visual_tokens):
        L = emb.shape[1]
        h = model.backbone()(inputs_embeds=emb, attention_mask=torch.ones(1, L, dtype=torch.long, device=emb.device),
                             position_ids=torch.arange(L, device=emb.device)[None], use_cache=False).last_hidden_state
        tok = model.space.next_token(model.deadapter(h[:, -1].to(model.adapter_dtype)), lambda g: g.argmax(-1))
        out.append(tok[0])
        f = model.space.adapter_input(tok, model.adapter_dtype)
        emb = torch.cat([emb, model.adapter(f).to(emb.dtype)[:, None]], dim=1)
    return torch.stack(out)


# ---------------------------------------------------------------------------- samples & API
def build_items(model, samples: Sequence[Sample], mode: str, loader=None, resize: str | None = None,
                query: bool = True):
    """Dataset items of generation samples, each encoded in its own mode; images are brought to
    the model's size by ``resize`` (``None``: the model's own size policy). Image-only samples of
    a model with a learnable query end with its slots (unless ``query`` is False)."""
    kw = {"loader": loader} if loader is not None else {}
    kw["resize"] = resize or model.config.resize
    size = model.encoder.image_size
    with_query = query and model.query_tokens is not None
    ds_img = LM4LVDataset(samples, model.builder, size, generation=True, image_only=True, query=with_query, **kw)
    ds_txt = LM4LVDataset(samples, model.builder, size, generation=True, image_only=False, **kw)
    flags = [image_only_for(s, mode) for s in samples]
    return [(ds_img if f else ds_txt)[i] for i, f in enumerate(flags)], flags


def model_device(model) -> torch.device:
    """Where the model computes: its adapters' device, else (weightless adapters) the task tokens'."""
    return parameter_device(model.adapter, model.deadapter, model.task_tokens)


def generate_samples(model, samples: Sequence[Sample], cfg: GenerationConfig | None = None, *,
                     batch_size: int = GENERATE_BATCH_SIZE, loader=None, decode_images: bool = True,
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
    check_query(model, samples)
    if decode_images and (model.decoder is not None or any(image_only_for(s, cfg.mode) for s in samples)):
        check_decodable(model, model.num_visual_tokens)  # (a model without a decoder: text answers only)
    results: list[SampleOutput] = []
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start:start + batch_size])
        items, flags = build_items(model, chunk, cfg.mode, loader, cfg.resize, cfg.query)
        batch = collate(items, pad_id=model.builder.pad_id, padding_side="left").to(dev, dtype)
        outs = generate_batch(model, batch, cfg, image_only=flags, decode_images=decode_images, compile=compile)
        if on_batch is not None:
            on_batch(chunk, outs)
        results += outs
    return results


def __getattr__(name: str):
    """``restore`` lives with the rest of restoration (:mod:`.restore`); importable from here too."""
    if name == "restore":
        from .restore import restore

        return restore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def output_image(image: torch.Tensor, input_size: tuple[int, int] | None, cfg: GenerationConfig, model):
    """A generated ``[3, H, W]`` image as PIL, at the size ``cfg.output_size`` asks for:
    ``input_size`` (width, height) of its sample's first input, resized by
    :func:`lm4lv_core.image.io.restored_size` under the size policy in use; the model's size when
    ``output_size`` is ``model`` or there is no input image."""
    from PIL import Image

    img = Image.fromarray(tensor_to_uint8(image))
    if cfg.output_size == "model" or input_size is None:
        return img
    return resize_to(img, restored_size(input_size, cfg.resize or model.config.resize))
