"""LM4LV: a frozen causal LM, a vision encoder/decoder, two adapters and K task tokens (and,
for ``<query>`` data, N learnable query embeddings).

Reads top to bottom: build (``from_config`` / ``from_pretrained``), freeze, embed a batch
(vectorised scatter of visual, task and query embeddings), run the LLM backbone for hidden
states, and compute the losses outside the LLM (text cross-entropy on gpt tokens, vision loss on
the hidden state *before* each target image slot and *at* each target query slot).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from ..config import ModelConfig, from_dict, load_yaml, save_yaml
from ..data.dataset import Batch
from ..data.sequence import SLOT_IMAGE, SLOT_QUERY, SLOT_TASK, IGNORE_INDEX, SequenceBuilder
from ..defaults import MODEL_CONFIG, WEIGHTS_FILE
from ..errors import ConfigError
from ..util.finite import nonfinite_names
from ..util.fsutil import atomic_path
from .logits import check_output_logits, output_logits
from .loading import load_llm
from .losses import text_cross_entropy, zero_touching
from ..precision import cast_by_trainability
from ..util.params import parameter_dtype
from ..vision import build_adapter, build_decoder, build_encoder, complete_config, vision_loss, visual_space

CONFIG_FILE = MODEL_CONFIG
LORA_DIR = "lora"
# what save_pretrained writes into a model folder (a regular expression of entry names): `train
# --overwrite` removes only these from a run's final/
SAVED_ENTRIES = "|".join(re.escape(name) for name in (CONFIG_FILE, WEIGHTS_FILE, LORA_DIR))
EMBEDDINGS = ("task_tokens", "query_tokens")  # learnt input embeddings, saved with the trainable weights


@dataclass
class LM4LVOutput(ModelOutput):
    """A ``ModelOutput`` (dict-like), so ZeRO-3 finds the output tensors and hooks their backward."""

    loss: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None
    vision_loss: torch.Tensor | None = None
    vision_pred: torch.Tensor | None = None    # [T, N, out_dim] predictions (features or code logits)
    target_images: torch.Tensor | None = None  # [T] indices into batch.pixels (image targets, then query targets)


class LM4LV(nn.Module):
    def __init__(self, config: ModelConfig, llm: nn.Module, tokenizer, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.config = config
        self.llm = llm
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.decoder = decoder
        d_llm = llm.get_input_embeddings().embedding_dim
        complete_config(config, encoder.space)  # checks that the parts fit (a resolved config is complete)
        _check_decoder_fits(encoder, decoder)
        # what the LLM sees of an image (all of the encoder's tokens, or a truncated share of them)
        self.space = visual_space(config, encoder.space)
        self.num_visual_tokens = self.space.num_tokens
        self.adapter = build_adapter(config.adapter, self.space.in_dim, d_llm)
        self.deadapter = build_adapter(config.deadapter, d_llm, self.space.out_dim, partner=self.adapter)
        emb_w = llm.get_input_embeddings().weight
        std = 1.0 if emb_w.is_meta else float(emb_w.detach().float().std())  # meta: memory planning
        self.task_tokens = nn.Parameter(torch.randn(config.num_task_tokens, d_llm) * std)
        # <query>: one learnt embedding per visual token of the image to generate
        self.query_tokens = nn.Parameter(torch.randn(self.num_visual_tokens, d_llm) * std) if config.query else None
        self.vision_loss_fn = vision_loss(config.vision_loss)
        if self.vision_loss_fn.uses_decoder and self.num_visual_tokens != decoder.num_tokens:
            raise ConfigError(f"vision_loss {config.vision_loss!r} needs all {decoder.num_tokens} visual tokens "
                              f"the decoder expects (num_visual_tokens is {self.num_visual_tokens})")
        self.builder = SequenceBuilder.for_model(config, tokenizer, self.num_visual_tokens)
        self._apply_trainability()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype | None = None,
                    trainable_dtype: torch.dtype | None = None, lora_weights: str | Path | None = None) -> "LM4LV":
        """Build from ``config``: frozen parts are read from disk directly in ``dtype`` (default
        float32), trainable parameters are kept in ``trainable_dtype`` (default ``dtype``; float32
        master weights when training in bf16/fp16). A config not resolved yet is resolved (and
        frozen) here (:func:`lm4lv_core.model.resolve.resolve_config`); ``lora_weights``: a saved
        PEFT adapter folder to wrap the LLM with instead of fresh LoRA weights."""
        from .resolve import resolve_config

        dtype = dtype or torch.float32
        trainable_dtype = trainable_dtype or dtype
        config = resolve_config(config)
        llm, tokenizer = load_llm(config.llm, dtype, config.attn_implementation)
        check_output_logits(llm, config.llm)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if config.lora.enabled:
            llm = _wrap_lora(llm, config, lora_weights)
        encoder = build_encoder(config.encoder, trainable_dtype if config.train_encoder else dtype)
        decoder = build_decoder(config.decoder, trainable_dtype if config.train_decoder else dtype)
        model = cls(config, llm, tokenizer, encoder, decoder)
        cast_by_trainability(model, dtype, trainable_dtype)
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        trainable_dtype: torch.dtype | None = None,
                        attn_implementation: str | None = None, config: ModelConfig | None = None) -> "LM4LV":
        """Rebuild a model saved by ``save_pretrained``: frozen parts from their recorded folders,
        read directly in ``dtype`` (default float32); ``attn_implementation`` overrides the saved one.

        ``config`` given: ``path`` is a training checkpoint (its ``trainable.safetensors`` holds every
        trained weight, LoRA's included, under the model's names) and ``config`` its run's model.
        Weights holding a NaN or an infinity are refused."""
        from ..config import thawed

        path = Path(path)
        checkpoint = config is not None
        if checkpoint:
            config = thawed(config)
        elif not (path / CONFIG_FILE).is_file():
            raise ConfigError(f"{path}: not an lm4lv model folder (no {CONFIG_FILE})")
        else:
            config = from_dict(ModelConfig, load_yaml(path / CONFIG_FILE), source=str(path / CONFIG_FILE))
        if attn_implementation:
            config.attn_implementation = attn_implementation
        # a saved model's LoRA weights are PEFT's adapter folder; a checkpoint's are in its weights file
        lora_weights = path / LORA_DIR if config.lora.enabled and not checkpoint else None
        model = cls.from_config(config, dtype, trainable_dtype, lora_weights=lora_weights)
        weights = load_file(str(path / WEIGHTS_FILE))
        model.load_trainable_state_dict(weights, strict=False)
        saved = set(model.saved_parameter_names())
        if checkpoint:
            missing = sorted(saved - set(weights))
            if missing:
                raise ConfigError(f"{path}: a checkpoint holds the trained weights only, not {', '.join(missing[:3])}; "
                                  "generate with the run's final/ model")
        bad = nonfinite_names({n: p for n, p in model.named_parameters() if n in saved})
        if bad:
            raise ConfigError(f"{path}: non-finite weights (NaN or inf) in {', '.join(bad[:3])}: the training run "
                              "that wrote them diverged; use an earlier checkpoint")
        cast_by_trainability(model, dtype or torch.float32, trainable_dtype or dtype or torch.float32)
        return model

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``lm4lv.yaml``, ``trainable.safetensors`` (adapters, task tokens, any trained
        encoder/decoder) and, with LoRA, a PEFT adapter folder ``lora/``.

        ``state_dict`` overrides the module's own tensors (e.g. gathered ZeRO-3 parameters: all of
        ``saved_parameter_names()``).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = self.state_dict()
        if state_dict is not None:  # e.g. the gathered ZeRO-3 tensors of saved_parameter_names()
            sd.update(state_dict)
        keep = self._saved_prefixes()
        weights = {k: v.detach().cpu().contiguous() for k, v in sd.items()
                   if k.startswith(keep) or k in EMBEDDINGS}
        params = dict(self.named_parameters())
        for k, v in weights.items():  # a ZeRO-3 partition left ungathered would not reload
            full = getattr(params.get(k), "ds_shape", None)
            if full is not None and tuple(v.shape) != tuple(full):
                raise RuntimeError(f"save_pretrained: {k} is a ZeRO-3 partition {tuple(v.shape)} of "
                                   f"{tuple(full)}; pass the gathered tensors as state_dict")
        with atomic_path(path / WEIGHTS_FILE) as tmp:
            save_file(weights, str(tmp), metadata={"format": "pt"})
        if self.config.lora.enabled:
            from peft import get_peft_model_state_dict

            lora_sd = {k[len("llm."):]: v for k, v in sd.items() if k.startswith("llm.") and "lora_" in k}
            peft_sd = get_peft_model_state_dict(self.llm, state_dict=lora_sd or None)
            self.llm.save_pretrained(str(path / LORA_DIR), state_dict=peft_sd)
        save_yaml(self.config, path / CONFIG_FILE)

    def saved_parameter_names(self) -> list[str]:
        """The parameters ``save_pretrained`` writes, frozen adapters included (under ZeRO-3 the
        caller gathers them all into ``state_dict``)."""
        keep = self._saved_prefixes()
        return [n for n, p in self.named_parameters()
                if n.startswith(keep) or n in EMBEDDINGS or (p.requires_grad and "lora_" in n)]

    def _saved_prefixes(self) -> tuple[str, ...]:
        keep = ["adapter.", "deadapter."]
        if self.config.train_encoder:
            keep.append("encoder.")
        if self.config.train_decoder:
            keep.append("decoder.")
        return tuple(keep)

    # ---------------------------------------------------------------- trainables
    def _apply_trainability(self) -> None:
        cfg = self.config
        for name, p in self.named_parameters():
            is_lora = cfg.lora.enabled and "lora_" in name
            p.requires_grad_(is_lora)
        self.task_tokens.requires_grad_(True)
        if self.query_tokens is not None:
            self.query_tokens.requires_grad_(cfg.train_query)
        for module, flag in ((self.adapter, cfg.train_adapter), (self.deadapter, cfg.train_deadapter),
                             (self.encoder, cfg.train_encoder), (self.decoder, cfg.train_decoder)):
            for p in module.parameters() if module is not None else ():
                p.requires_grad_(flag)

    def train(self, mode: bool = True) -> "LM4LV":
        """Only what trains follows ``mode``: the frozen LLM (LoRA modules, with their dropout,
        excepted) and a frozen encoder / decoder stay in eval mode, so their dropout never fires
        and a frozen part computes in training exactly what it computes at inference."""
        super().train(mode)
        cfg = self.config
        self.llm.eval()
        if cfg.lora.enabled:
            for name, module in self.llm.named_modules():
                if "lora_" in name.rsplit(".", 1)[-1]:
                    module.train(mode)
        if not cfg.train_encoder:
            self.encoder.eval()
        if not cfg.train_decoder and self.decoder is not None:
            self.decoder.eval()
        return self

    def enable_gradient_checkpointing(self) -> int:
        """Recompute the LLM's layers (and the encoder's / decoder's when they train) in the
        backward pass, in train and eval mode alike; returns the number of layers checkpointed."""
        from .activation_checkpointing import checkpoint_layers

        n = checkpoint_layers(self.backbone(), "LLM")
        for module, flag, what in ((self.encoder, self.config.train_encoder, "encoder"),
                                   (self.decoder, self.config.train_decoder, "decoder")):
            if flag:
                n += checkpoint_layers(module, what)
        return n

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
        missing, unexpected = self.load_state_dict(sd, strict=False)
        if unexpected:
            raise ConfigError(f"unexpected weights: {', '.join(unexpected[:5])}")
        if strict:
            want = {n for n, p in self.named_parameters() if p.requires_grad}
            lost = sorted(want & set(missing))
            if lost:
                raise ConfigError(f"missing trainable weights: {', '.join(lost[:5])}")

    def print_trainable_parameters(self) -> str:
        total = sum(p.numel() for p in self.parameters())
        train = sum(p.numel() for p in self.trainable_parameters())
        msg = f"trainable params: {train:,} || all params: {total:,} || trainable%: {100 * train / total:.4f}"
        print(msg)
        return msg

    # ------------------------------------------------------------------ forward
    def backbone(self) -> nn.Module:
        """The LLM without its LM head (``get_decoder`` of any HF causal LM, through PEFT)."""
        llm = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return llm.get_decoder()

    def lm_head(self) -> nn.Module:
        llm = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return llm.get_output_embeddings()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token logits of final hidden states, with the LLM's own post-processing (soft-capping,
        logit scaling; see ``logits.py``)."""
        return output_logits(self.llm, hidden, self.lm_head())

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[M, 3, H, W]`` in [0, 1] → tokens ``[M, N, d_v]`` or codes ``[M, N]`` (the kept N)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_encoder):
            return self.space.take(self.encoder(pixels))

    def batch_features(self, batch: Batch) -> torch.Tensor | None:
        """The visual features of ``batch``'s images: its precomputed ones, else encoded from its
        pixels (``None`` when it holds no image)."""
        if batch.features is not None:
            return batch.features
        return self.encode_images(batch.pixels) if batch.pixels.shape[0] else None

    def embed(self, input_ids: torch.Tensor, slot_type: torch.Tensor, slot_image: torch.Tensor,
              slot_pos: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with visual, task and query slots filled in (one vectorised scatter each)."""
        emb = self.llm.get_input_embeddings()(input_ids)
        img = slot_type == SLOT_IMAGE
        task = slot_type == SLOT_TASK
        query = slot_type == SLOT_QUERY
        if img.any():
            vis = self.adapter(self.space.adapter_input(features[slot_image[img], slot_pos[img]], self.adapter_dtype))
            emb = emb.masked_scatter(img.unsqueeze(-1), vis.to(emb.dtype))
        if task.any():
            emb = emb.masked_scatter(task.unsqueeze(-1), self.task_tokens[slot_pos[task]].to(emb.dtype))
        if query.any():
            if self.query_tokens is None:
                raise ConfigError("the data holds <query> but this model has no learnable query (it was built "
                                  "without <query> data); train a model on <query> answers")
            emb = emb.masked_scatter(query.unsqueeze(-1), self.query_tokens[slot_pos[query]].to(emb.dtype))
        return emb

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype the adapters compute in: the input adapter's weights', else (a weightless
        adapter) the deadapter's, else the task tokens'."""
        return parameter_dtype(self.adapter, self.deadapter, self.task_tokens)

    def hidden_states(self, batch: Batch, features: torch.Tensor | None) -> torch.Tensor:
        emb = self.embed(batch.input_ids, batch.slot_type, batch.slot_image, batch.slot_pos, features)
        out = self.backbone()(inputs_embeds=emb, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, use_cache=False)
        return out.last_hidden_state

    def forward(self, batch: Batch) -> LM4LVOutput:
        feats = self.batch_features(batch)
        h = self.hidden_states(batch, feats)
        h_prev = h[:, :-1]
        # text: the hidden state at t-1 predicts token t of a gpt value
        labels = batch.labels[:, 1:]
        has_text = labels != IGNORE_INDEX
        if has_text.any():
            logits = self.logits(h_prev[has_text])
            text_loss = text_cross_entropy(logits, labels[has_text])
        else:
            text_loss = zero_touching(self.lm_head().parameters()).to(h.device)
        # vision: the hidden state at t-1 predicts the token of target image slot t, the hidden
        # state at a target query slot predicts that slot's token
        reads = [(h_prev, batch.target_mask[:, 1:], batch.slot_image[:, 1:])]
        if batch.query_mask is not None and batch.query_mask.any():
            reads.append((h, batch.query_mask, batch.slot_image))
        hs = [states[mask] for states, mask, _ in reads if mask.any()]
        if hs:
            n = self.num_visual_tokens
            hidden = torch.cat(hs)
            pred = self.deadapter(hidden.to(self.adapter_dtype)).view(-1, n, self.space.out_dim)
            img_ids = torch.cat([ids[mask].view(-1, n)[:, 0] for _, mask, ids in reads if mask.any()])
            target = feats[img_ids]
            vision_loss = self.vision_loss_fn(
                pred=pred, target=target, target_pixels=batch.pixels[img_ids], decoder=self.decoder,
                hidden=hidden.view(-1, n, h.shape[-1]), adapter=self.adapter, deadapter=self.deadapter,
                space=self.space)
        else:
            pred = img_ids = None
            vision_loss = self._touch(self.deadapter, h.shape[-1], h.device)
        text_loss = text_loss + self._touch(self.adapter, self.space.in_dim, h.device) + self.task_tokens.sum() * 0.0
        if self.query_tokens is not None:
            text_loss = text_loss + self.query_tokens.sum() * 0.0
        loss = self.config.text_loss_weight * text_loss + self.config.vision_loss_weight * vision_loss
        return LM4LVOutput(loss, text_loss.detach(), vision_loss.detach(), pred, img_ids)

    def _touch(self, module: nn.Module, in_dim: int, device: torch.device) -> torch.Tensor:
        """A zero reaching every trainable parameter of ``module`` through its forward, so data
        parallel wrappers see a gradient for each and ZeRO-3 gathers partitioned parameters."""
        x = torch.zeros(1, in_dim, device=device, dtype=self.adapter_dtype)
        if module is self.adapter:
            x = self.space.adapter_input(x[:, 0], self.adapter_dtype) if self.space.codebook_size else x
        return module(x).float().sum() * 0.0

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Visual tokens (features ``[M, N, d_v]`` or codes ``[M, N]``) → images ``[M, 3, H, W]`` in [0, 1]."""
        if self.decoder is None:
            raise ConfigError(f"encoder {self.config.encoder.name} has no vision decoder in this model: "
                              "it answers in text only (give --decoder FAMILY:SOURCE to paint images)")
        if tokens.is_floating_point():
            tokens = tokens.to(parameter_dtype(self.decoder))
        return self.decoder(tokens).float()


def _check_decoder_fits(encoder, decoder) -> None:
    """One-line error when the decoder does not read the encoder's tokens."""
    if decoder is None:
        return
    enc, dec = encoder.space, decoder.space
    if enc.kind != dec.kind or enc.codebook_size != dec.codebook_size:
        raise ConfigError(f"the decoder reads {dec.kind}"
                          f"{f' of {dec.codebook_size}' if dec.codebook_size else ''} but the encoder gives "
                          f"{enc.kind}{f' of {enc.codebook_size}' if enc.codebook_size else ''}")
    if not enc.codebook_size and enc.dim != dec.dim:
        raise ConfigError(f"encoder width {enc.dim} and decoder width {dec.dim} differ")


def _wrap_lora(llm: nn.Module, config: ModelConfig, weights: str | Path | None = None) -> nn.Module:
    """LoRA on ``llm`` at the resolved config's targets: fresh, or a saved PEFT adapter folder."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    from .families import check_lora_targets

    if weights is not None:
        return PeftModel.from_pretrained(llm, str(weights), is_trainable=True)
    lc = config.lora
    check_lora_targets(llm, lc.target_modules, f" in {config.llm}")
    targets = lc.target_modules if isinstance(lc.target_modules, str) else list(lc.target_modules)
    peft_cfg = PeftLoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                              target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(llm, peft_cfg)
