"""Per-rank memory plan of a training run, from configs only (``lm4lv train --dry-run``).

The model is built on the meta device (no weights read, no memory used), so planning a 7B
configuration takes seconds. For the resolved configuration, world size and ZeRO stage the plan
counts, per rank:

* **frozen weights** by dtype (the LLM, a frozen encoder / decoder / adapter) in the compute dtype;
  ZeRO-3 partitions them and gathers a working set;
* **trainable weights, gradients, optimizer states** as the engine keeps them: DeepSpeed casts
  the module to bf16/fp16 and keeps float32 masters (ZeRO-1/2 partition masters and Adam states,
  ZeRO-2 also the gradients, ZeRO-3 everything) plus its contiguous gradient bucket
  (``reduce_bucket_size`` elements, 5e8 by default); accelerate keeps float32 trainables;
* **activations of one micro-batch**, from the longest rendered sample of the data and the
  layer widths. The adapter feeds the LLM's input, so autograd keeps every LLM layer's
  activations even though its weights are frozen (they are needed for the input gradient); with
  ``--gradient-checkpointing`` only each layer's input is kept, plus one recomputed layer;
* the **total**, and whether it fits a GPU (``--gpu-memory``) with the largest micro-batch that does.

Activation model of a Llama-family decoder layer (per token; ``s`` = bytes of the compute
dtype, ``h`` hidden, ``kv`` key/value width, ``I`` MLP width, ``n`` heads), as measured with
saved-tensor hooks on the Hugging Face implementation with frozen weights and an input that needs
a gradient: the two RMSNorms keep a float32 copy of their input (``2·4h``), attention keeps q, k, v
and its output (``s·(2h + 2kv)``) and the float32 log-sum-exp (``4n``), the gated MLP keeps the
gate and up projections and the activation (``3·s·I``). ``eager`` attention adds the float32
softmax (and its copy in the compute dtype) of ``n × seq`` per token; ZeRO-3's linear function keeps
every linear layer's input (``s·(2h + h + I)``). The backward of a layer
needs ``3·s·I`` per token more (the MLP's input gradients). The loss keeps the float32
log-softmax of the text-loss positions only (``vocab`` per position) and the deadapter's input
at target image slots. A frozen encoder runs without gradient: only its working set during the
forward counts. Other LLM families use the same model (approximate; the plan says so, see
``families.QUIRKS``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from ..config import ModelConfig
from ..precision import precision
from ..errors import ConfigError
from ..vision import meta_part, vision_loss

GiB = 1024 ** 3
# what --gpu-memory leaves aside: CUDA context, NCCL buffers, allocator fragmentation
RESERVE_FIXED = 1 * GiB
RESERVE_SHARE = 0.05
SCAN_SAMPLES = 2000  # samples rendered to find the longest sequence
DS_REDUCE_BUCKET = int(5e8)  # DeepSpeed's default zero_optimization.reduce_bucket_size
DS3_MAX_LIVE = int(1e9)  # DeepSpeed's default stage3_max_live_parameters
DS3_PREFETCH = int(5e7)  # DeepSpeed's default stage3_prefetch_bucket_size


# ------------------------------------------------------------------------------ shapes
@dataclass
class ModelShape:
    """Parameter counts and layer geometry of the composed model (read from the meta model)."""

    frozen: dict[str, int]     # part -> frozen parameter elements
    trainable: dict[str, int]  # part -> trainable parameter elements
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_width: int              # key/value projection width (GQA: kv heads × head dim)
    q_width: int
    vocab: int
    largest_layer: int         # parameter elements of the largest LLM layer (ZeRO-3 working set)
    lora_per_layer: list[tuple[int, int]] = field(default_factory=list)  # (in_features, r) per target
    vision_dim: int = 0        # width of what the adapter reads per slot (1: an integer code)
    pred_dim: int = 0          # width of the deadapter's prediction (a feature, or logits over K)
    encoder_tokens: int = 0    # tokens the encoder computes per image (visual_tokens: the ones kept)
    encoder_dim: int = 0
    encoder_forward_elements: int = 0  # a convolutional encoder's no-grad working set per image
    encoder_layers: int = 0
    encoder_intermediate: int = 0
    decoder_dim: int = 0
    decoder_layers: int = 0
    decoder_intermediate: int = 0
    visual_tokens: int = 0     # slots per image in the sequence
    image_size: int = 0
    approximate: bool = False  # a vision part the plan counts by its weights only
    llm_family: str = ""       # the LLM's model_type
    llm_calibrated: bool = True  # the activation model was measured on this family's layers


@dataclass
class DataShape:
    """The longest sample of the data (the micro-batch is padded to its longest sample)."""

    seq_len: int
    image_slots: int          # input (non-target) image slots per sample
    target_slots: int         # target image and query slots per sample (deadapter inputs)
    images: int               # images per sample (all encoded)
    text_loss_tokens: int
    samples_scanned: int


@dataclass
class RunShape:
    """What of the training configuration changes memory."""

    world: int
    engine: str
    zero_stage: int
    precision: str
    micro_batch: int
    gradient_checkpointing: bool
    attn_implementation: str = "sdpa"
    lora_dropout: float = 0.0
    train_encoder: bool = False
    train_decoder: bool = False
    pixel_loss: bool = False
    cache_features: bool = False
    reduce_bucket: int = DS_REDUCE_BUCKET
    contiguous_gradients: bool = True
    overlap_comm: bool = False


# ------------------------------------------------------------------------------ the meta model
def build_meta_model(cfg: ModelConfig):
    """The composed ``LM4LV`` with every parameter on the meta device (configs and tokenizer only)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .lm4lv import LM4LV, _wrap_lora
    from .resolve import resolve_config

    cfg = resolve_config(cfg)
    try:
        llm_cfg = AutoConfig.from_pretrained(cfg.llm)
        tokenizer = AutoTokenizer.from_pretrained(cfg.llm)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{cfg.llm}: cannot read the LLM's config and tokenizer ({e})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llm_cfg)
        if cfg.lora.enabled:
            llm = _wrap_lora(llm, cfg)
    encoder = meta_part(cfg.encoder, "encoder")
    decoder = meta_part(cfg.decoder, "decoder") if cfg.decoder is not None else None
    with torch.device("meta"):
        model = LM4LV(cfg, llm, tokenizer, encoder, decoder)
    return model, llm_cfg


def model_shape(cfg: ModelConfig) -> ModelShape:
    from .activation_checkpointing import transformer_layers

    model, c = build_meta_model(cfg)
    frozen: dict[str, int] = {}
    trainable: dict[str, int] = {}
    for name, p in model.named_parameters():
        part = name.split(".", 1)[0]
        if part == "llm":
            part = "LoRA" if "lora_" in name else "LLM"
        bucket = trainable if p.requires_grad else frozen
        bucket[part] = bucket.get(part, 0) + p.numel()
    layers = transformer_layers(model.backbone())
    hidden = model.llm.get_input_embeddings().embedding_dim
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head")
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    inter = next((v for v in (getattr(c, k, None) for k in ("intermediate_size", "n_inner", "ffn_dim",
                                                              "ffn_hidden_size")) if isinstance(v, int)), 4 * hidden)
    lora = []
    if layers and cfg.lora.enabled:
        for n, m in layers[0].named_modules():
            a = getattr(m, "lora_A", None)
            if a is not None and "default" in a:
                lora.append((a["default"].in_features, a["default"].out_features))
    shape = ModelShape(frozen=frozen, trainable=trainable, layers=len(layers), hidden=hidden,
                       intermediate=inter, heads=heads, kv_width=kv_heads * head_dim, q_width=heads * head_dim,
                       vocab=model.llm.get_output_embeddings().weight.shape[0],
                       largest_layer=max((sum(p.numel() for p in m.parameters()) for m in layers), default=0),
                       lora_per_layer=lora, vision_dim=1 if model.space.codebook_size else model.space.dim,
                       pred_dim=model.space.out_dim,
                       encoder_tokens=model.encoder.num_tokens, visual_tokens=model.num_visual_tokens,
                       image_size=model.encoder.image_size)
    from .families import model_type, quirks

    shape.llm_family, shape.llm_calibrated = model_type(c), quirks(c).plan_calibrated
    enc = model.encoder.plan_shape()
    shape.encoder_dim, shape.encoder_layers, shape.encoder_intermediate = enc.dim, enc.layers, enc.intermediate
    shape.encoder_forward_elements = enc.forward_elements
    shape.approximate = not (enc.layers or enc.forward_elements)
    if model.decoder is not None:
        dec = model.decoder.plan_shape()
        shape.decoder_dim, shape.decoder_layers, shape.decoder_intermediate = dec.dim, dec.layers, dec.intermediate
        shape.approximate = shape.approximate or not (dec.layers or dec.forward_elements)
    return shape


def data_shape(cfg: ModelConfig, samples: Sequence[Any], limit: int = SCAN_SAMPLES) -> DataShape:
    """Render (tokenise) up to ``limit`` samples and keep the largest counts of any of them."""
    from ..data.sequence import IGNORE_INDEX, SLOT_IMAGE
    from .prompt import config_sequence

    if not samples:
        raise ConfigError("the memory plan needs at least one sample")
    builder = config_sequence(cfg)
    best = DataShape(0, 0, 0, 0, 0, 0)
    for s in samples[:limit]:
        enc = builder.encode(s)
        img = enc.slot_type == SLOT_IMAGE
        tgt = int(enc.target_mask.sum()) + int(enc.query_mask.sum())
        best = DataShape(max(best.seq_len, len(enc)), max(best.image_slots, int(img.sum()) - int(enc.target_mask.sum())),
                         max(best.target_slots, tgt), max(best.images, len(s.images)),
                         max(best.text_loss_tokens, int((enc.labels[1:] != IGNORE_INDEX).sum())),
                         best.samples_scanned + 1)
    return best


def run_shape(train, model: ModelConfig, deepspeed_overrides: dict | None = None) -> RunShape:
    """The memory-relevant part of a ``TrainConfig`` (with the ``--deepspeed-config`` overrides the
    engine applies: their bucket settings count)."""
    world = train.world_size()
    zero: dict[str, Any] = {}
    if train.engine == "deepspeed" and deepspeed_overrides:
        zero = deepspeed_overrides.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", train.zero_stage)) if train.engine == "deepspeed" else 0
    return RunShape(
        world=world, engine=train.engine, zero_stage=stage, precision=train.precision,
        micro_batch=train.micro_batch, gradient_checkpointing=bool(getattr(train, "gradient_checkpointing", False)),
        attn_implementation=model.attn_implementation,
        lora_dropout=model.lora.dropout if model.lora.enabled else 0.0, train_encoder=model.train_encoder,
        train_decoder=model.train_decoder, pixel_loss=vision_loss(model.vision_loss).uses_decoder,
        cache_features=train.cache_features, reduce_bucket=int(float(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET))),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        overlap_comm=bool(zero.get("overlap_comm", stage == 3)))


# ------------------------------------------------------------------------------ the model of memory
def layer_bytes_per_token(m: ModelShape, run: RunShape, seq_len: int) -> float:
    """Bytes one LLM layer keeps for the backward per token (frozen weights, input needs grad)."""
    s = precision(run.precision).bytes
    b = 8 * m.hidden + s * (m.q_width + m.hidden + 2 * m.kv_width) + 4 * m.heads + 8 + 3 * s * m.intermediate
    if run.attn_implementation == "eager":
        b += m.heads * seq_len * (4 + (s if s < 4 else 0)) - s * m.hidden
    if run.engine == "deepspeed" and run.zero_stage == 3:
        # ZeRO-3 replaces F.linear by a function that keeps every linear's input (to re-gather the
        # weight in the backward): the two normed inputs, o_proj's and down_proj's inputs
        b += s * (2 * m.hidden + m.q_width + m.intermediate)
    for in_features, r in m.lora_per_layer:
        b += (s + 1) * in_features + s * r if run.lora_dropout > 0 else s * (in_features + r)
    return b


def _vit_layer_bytes(dim: int, inter: int, s: int) -> int:
    """Per token, a ViT layer whose activations are kept (LayerNorm in/out twice, q k v, attention
    output, MLP hidden before and after GELU); approximate."""
    return s * (8 * dim + 2 * inter)


def activation_bytes(m: ModelShape, d: DataShape, run: RunShape, micro_batch: int,
                     checkpointing: bool) -> dict[str, float]:
    """``saved`` (kept for the backward) and ``peak`` (saved + the largest transient) of one micro-batch."""
    s = precision(run.precision).bytes
    tokens = micro_batch * d.seq_len
    per_layer = layer_bytes_per_token(m, run, d.seq_len) * tokens
    llm = (m.layers * s * m.hidden * tokens) if checkpointing else m.layers * per_layer
    final_norm = 4 * m.hidden * tokens
    text = micro_batch * d.text_loss_tokens * m.vocab * 4  # float32 log-softmax of text-loss positions
    slots = (micro_batch * d.image_slots * m.vision_dim * s  # adapter input
             + micro_batch * d.target_slots * (m.hidden * s + 8 * m.pred_dim))  # deadapter input, loss
    images = micro_batch * d.images
    inputs = images * 3 * m.image_size ** 2 * 4 + tokens * 7 * 8  # float32 pixels, seven int64 maps per token
    vision = 0.0  # a trained encoder / decoder (or the decoder under a pixel loss) keeps activations too;
    # --gradient-checkpointing recomputes their layers only when they train
    if run.train_encoder and not run.cache_features:
        n = images * m.encoder_tokens
        layer = _vit_layer_bytes(m.encoder_dim, m.encoder_intermediate, s) * n
        vision += m.encoder_layers * s * m.encoder_dim * n + layer if checkpointing else m.encoder_layers * layer
    if run.pixel_loss or run.train_decoder:
        n = micro_batch * d.target_slots
        layer = _vit_layer_bytes(m.decoder_dim, m.decoder_intermediate, s) * n
        ckpt = checkpointing and run.train_decoder
        vision += m.decoder_layers * s * m.decoder_dim * n + layer if ckpt else m.decoder_layers * layer
    saved = llm + final_norm + text + slots + vision
    backward = 3 * s * m.intermediate * tokens + (per_layer if checkpointing else 0)
    loss = micro_batch * d.text_loss_tokens * m.vocab * (s + 4)
    encode = 0.0
    if not run.cache_features and not run.train_encoder:  # frozen encoder: working set of one layer, no grad
        encode = images * s * (m.encoder_tokens * (7 * m.encoder_dim + 2 * m.encoder_intermediate)
                               + m.encoder_forward_elements)
    peak = max(saved + max(backward, loss), encode)
    return {"saved": saved, "peak": peak, "llm_layers": llm, "loss_and_adapters": final_norm + text + slots,
            "vision": vision, "inputs": inputs, "backward_transient": backward, "encoder_forward": encode}


def state_bytes(m: ModelShape, run: RunShape) -> dict[str, float]:
    """Weights, gradients, optimizer states and engine buffers of one rank."""
    s, w = precision(run.precision).bytes, run.world
    frozen, train = sum(m.frozen.values()), sum(m.trainable.values())
    z = run.zero_stage if run.engine == "deepspeed" else 0
    out = {"frozen_weights": frozen * s / (w if z == 3 else 1)}
    if z == 3:  # gathered parameters during forward/backward
        out["zero3_gathered"] = min(DS3_MAX_LIVE, frozen + train) * s + min(DS3_PREFETCH, m.largest_layer) * s
    if run.engine == "accelerate":
        out.update(trainable_weights=4 * train, gradients=4 * train, master_weights=0.0,
                   optimizer_states=8 * train, buckets=4 * train if w > 1 else 0.0)
        return out
    mixed = s < 4
    out["trainable_weights"] = train * s / (w if z == 3 else 1)
    out["master_weights"] = 0.0 if (z == 0 and not mixed) else 4 * train / (w if z else 1)
    out["optimizer_states"] = 8 * train / (w if z else 1)
    if z == 0:
        out["gradients"] = train * s + (4 * train if mixed else 0)
    elif z == 1:
        out["gradients"] = train * s + 4 * train / w
    else:
        out["gradients"] = (train * s + 4 * train) / w
    buckets = run.reduce_bucket * s * (2 if run.overlap_comm else 1) if (z and run.contiguous_gradients) else 0
    out["buckets"] = float(buckets)
    return out


# ------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    run: RunShape
    model: ModelShape
    data: DataShape
    states: dict[str, float]
    activations: dict[str, float]             # of the configured run
    activations_other: dict[str, float]       # with checkpointing toggled
    gpu_memory: float | None                  # bytes
    total: float = 0.0
    total_other: float = 0.0
    max_micro_batch: int | None = None
    max_micro_batch_other: int | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total + reserve(self.gpu_memory) <= self.gpu_memory

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fits"] = self.fits
        d["frozen_by_dtype"] = frozen_by_dtype(self)
        return d


def reserve(gpu_memory: float) -> float:
    return RESERVE_FIXED + RESERVE_SHARE * gpu_memory


def frozen_by_dtype(plan: Plan) -> dict[str, float]:
    return {precision(plan.run.precision).dtype_name: plan.states["frozen_weights"]}


def _total(states: dict[str, float], acts: dict[str, float]) -> float:
    return sum(states.values()) + acts["peak"] + acts["inputs"]


def _largest_micro_batch(m: ModelShape, d: DataShape, run: RunShape, ckpt: bool, states: dict[str, float],
                         gpu: float) -> int:
    budget = gpu - reserve(gpu) - sum(states.values())
    lo, hi = 0, 1
    def fits(mb: int) -> bool:
        a = activation_bytes(m, d, run, mb, ckpt)
        return a["peak"] + a["inputs"] <= budget

    while hi <= 1 << 16 and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def make_plan(m: ModelShape, d: DataShape, run: RunShape, gpu_memory_gib: float | None = None) -> Plan:
    states = state_bytes(m, run)
    ckpt = run.gradient_checkpointing
    acts = activation_bytes(m, d, run, run.micro_batch, ckpt)
    other = activation_bytes(m, d, run, run.micro_batch, not ckpt)
    gpu = None if gpu_memory_gib is None else gpu_memory_gib * GiB
    plan = Plan(run, m, d, states, acts, other, gpu, _total(states, acts), _total(states, other))
    if gpu is not None:
        plan.max_micro_batch = _largest_micro_batch(m, d, run, ckpt, states, gpu)
        plan.max_micro_batch_other = _largest_micro_batch(m, d, run, not ckpt, states, gpu)
    return plan


def plan_training(train, model: ModelConfig, samples: Sequence[Any], gpu_memory_gib: float | None = None,
                  seq_len: int | None = None, deepspeed_overrides: dict | None = None) -> Plan:
    """The plan of ``lm4lv train`` with ``train`` / ``model`` on ``samples`` (``seq_len`` overrides
    the longest rendered sample's length; ``deepspeed_overrides``: the checked ``--deepspeed-config``)."""
    from .resolve import resolve_config

    model = resolve_config(model)  # (a run's config is resolved already: the attention, LoRA's targets)
    d = data_shape(model, samples)
    if seq_len is not None:
        d.seq_len = seq_len
    return make_plan(model_shape(model), d, run_shape(train, model, deepspeed_overrides), gpu_memory_gib)


def detected_gpu_memory_gib() -> float | None:
    """Memory of the first CUDA device in GiB, or ``None`` without one."""
    from ..util.dist import has_cuda

    if not has_cuda():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GiB


# ------------------------------------------------------------------------------ printing
def human(x: float) -> str:
    return f"{x / GiB:.2f} GiB" if x >= GiB / 10 else f"{x / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M" if n >= 1e4 else str(n)


def plan_rows(plan: Plan) -> list[tuple[str, float, str]]:
    """(what, bytes, note) rows of the per-rank plan, in printing order."""
    r, st = plan.run, plan.states
    ds_part = r.engine == "deepspeed" and r.zero_stage > 0
    per = f"1/{r.world} per rank" if r.world > 1 else ""
    frozen_note = ", ".join(f"{k} {_count(v)}" for k, v in plan.model.frozen.items())
    rows = [(f"frozen weights ({precision(r.precision).dtype_name})", st["frozen_weights"],
             frozen_note + (f"; ZeRO-3, {per}" if r.zero_stage == 3 and r.engine == "deepspeed" else ""))]
    if "zero3_gathered" in st:
        rows.append(("ZeRO-3 gathered parameters", st["zero3_gathered"], "live while layers run"))
    tdt = "float32" if r.engine == "accelerate" else precision(r.precision).dtype_name
    rows += [
        (f"trainable weights ({tdt})", st["trainable_weights"],
         ", ".join(f"{k} {_count(v)}" for k, v in plan.model.trainable.items())),
        ("float32 master weights", st["master_weights"], per if ds_part else ""),
        ("gradients", st["gradients"], per if r.engine == "deepspeed" and r.zero_stage >= 2 else ""),
        ("optimizer states (Adam m, v)", st["optimizer_states"], per if ds_part else ""),
        ("gradient buckets", st["buckets"],
         f"DeepSpeed reduce bucket of {r.reduce_bucket:.0e} elements" if st["buckets"] and r.engine == "deepspeed"
         else "DDP buckets" if st["buckets"] else ""),
    ]
    a, o = plan.activations, plan.activations_other
    that = "without" if r.gradient_checkpointing else "with"
    rows += [
        ("activations kept for backward", a["saved"],
         f"{plan.data.seq_len} tokens × micro-batch {r.micro_batch}; {human(o['saved'])} {that} checkpointing"),
        ("activations at peak", a["peak"], f"{human(o['peak'])} {that} checkpointing"),
        ("micro-batch inputs", a["inputs"], "pixels and token maps"),
        ("total", plan.total, f"{human(plan.total_other)} {that} --gradient-checkpointing"),
    ]
    return rows


def format_plan(plan: Plan) -> str:
    r, m, d = plan.run, plan.model, plan.data
    eng = f"DeepSpeed ZeRO-{r.zero_stage}" if r.engine == "deepspeed" else "accelerate"
    ck = "with" if r.gradient_checkpointing else "without"
    lines = [
        f"memory plan per rank: {r.world} rank{'s' if r.world > 1 else ''}, {eng}, {r.precision}, "
        f"micro-batch {r.micro_batch}, {ck} gradient checkpointing",
        f"  LLM {m.layers} layers, width {m.hidden}, MLP {m.intermediate}, vocab {m.vocab}; vision "
        f"{'codes of ' + str(m.pred_dim) if m.vision_dim == 1 else 'width ' + str(m.vision_dim)}, "
        f"{m.visual_tokens} slots per image; longest sample {d.seq_len} tokens "
        f"({d.text_loss_tokens} with text loss, {d.samples_scanned} samples rendered)",
    ]
    if m.approximate:
        lines.append("  (approximate: a vision part's activations are not modelled, only its weights)")
    if not m.llm_calibrated:
        lines.append(f"  (approximate: the activation model is calibrated on Llama layers; {m.llm_family or 'this'} "
                     "layers may keep more or less)")
    rule = "  " + "-" * 44
    for what, nbytes, note in plan_rows(plan):
        if what == "activations kept for backward" or what == "total":
            lines.append(rule)
        lines.append(f"  {what:<31}{human(nbytes):>11}   {note}".rstrip())
    lines.append(fits_line(plan))
    return "\n".join(lines)


def fits_line(plan: Plan) -> str:
    if plan.gpu_memory is None:
        return "  no GPU detected: pass --gpu-memory GB to check whether this fits a GPU"
    gpu, res = plan.gpu_memory, reserve(plan.gpu_memory)
    this = "with" if plan.run.gradient_checkpointing else "without"
    that = "without" if plan.run.gradient_checkpointing else "with"
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    mb = plan.max_micro_batch or 0
    return (f"  {verdict} in {gpu / GiB:g} GiB per GPU: {human(plan.total)} + {human(res)} reserve; "
            f"largest micro-batch that fits: {mb} {this} checkpointing, "
            f"{plan.max_micro_batch_other or 0} {that}" + ("" if mb else " (none: reduce the model or add ranks)"))


__all__ = ["Plan", "ModelShape", "DataShape", "RunShape", "plan_training", "make_plan", "model_shape",
           "data_shape", "run_shape", "format_plan", "activation_bytes", "state_bytes", "detected_gpu_memory_gib"]
