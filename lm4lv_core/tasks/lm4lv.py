"""LM4LV training as a ``TrainTask``: adapters, task tokens (and opt-in LoRA / encoder / decoder)
learn the text and vision losses of ``LM4LV.forward``.

With ``cache_features`` the frozen encoder runs once per distinct image before training and the
batches carry the features (``Batch.features``) instead of re-encoding pixels every step.

The run records its data's restoration prompt (:func:`restoration_prompt`) in the model config,
so the saved model (``final/lm4lv.yaml``) knows how to ask for a restored image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..config import ModelConfig, is_frozen, thawed
from ..data.dataset import Batch, Item, LM4LVDataset, collate, tensor_to_uint8
from ..data.format import IMAGE_TOKEN, QUERY_TOKEN, TASK_TOKEN, Sample, load_checked
from ..engine.config import TrainConfig
from ..engine.task import Gather, TrainTask, no_gather
from ..errors import ConfigError
from ..util import dist


class LM4LVTask(TrainTask):
    name = "lm4lv"
    metric_names = ("loss", "text_loss", "vision_loss")

    def __init__(self, train: TrainConfig, model: ModelConfig) -> None:
        self.train_config = train
        self.model_config = model
        self.cache: dict[str, torch.Tensor] | None = None
        self.model = None

    def build_model(self) -> nn.Module:
        from ..model.lm4lv import LM4LV

        from ..precision import compute_dtype

        if not is_frozen(self.model_config):  # the Python API: the data's share is decided here
            c = self.train_config
            samples = load_checked(c.data, image_root=c.image_root, mode="train", check_files=False)
            self.model_config = complete_from_data(thawed(self.model_config), samples)
        # frozen parts in the compute dtype from the first byte; trainables keep float32 masters
        self.model = LM4LV.from_config(self.model_config, compute_dtype(self.train_config.precision),
                                       trainable_dtype=torch.float32)
        self.model_config = self.model.config  # resolved and frozen
        if self.train_config.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.model.train()
        return self.model

    def initialize(self, model: nn.Module) -> None:
        """``--init-from``: another run's trained weights, loaded where the names and shapes match."""
        if not self.train_config.init_from:
            return
        from .init_from import load_into, read_source

        line = load_into(model, read_source(self.train_config.init_from))
        if dist.is_main():
            from ..util import logs

            logs.say(line)

    def dataset(self) -> Sequence[Any]:
        c = self.train_config
        samples = load_checked(c.data, image_root=c.image_root, mode="train", check_files=False)
        return _TrainDataset(samples, self.model.builder, self.model.encoder.image_size,
                             resize=self.model_config.resize)

    def collate(self, items: list[Any]) -> Batch:
        batch = collate(items, pad_id=self.model.tokenizer.pad_token_id)
        if self.cache is not None and batch.pixels.shape[0]:
            batch.features = torch.stack([self.cache[p] for it in items for p in it.sample.images])
        return batch

    def prepare(self, model: nn.Module, dataset: Sequence[Any], device: torch.device) -> None:
        if not self.train_config.cache_features:
            return
        check_cache_allowed(self.model_config)
        paths = sorted({p for s in dataset.samples for p in s.images})
        from ..data.dataset import image_to_tensor
        from ..image.io import load_rgb

        cache: dict[str, torch.Tensor] = {}
        size = model.encoder.image_size
        with torch.no_grad():
            for i in range(0, len(paths), 16):
                chunk = paths[i:i + 16]
                pixels = torch.stack([image_to_tensor(load_rgb(p), size, self.model_config.resize)
                                      for p in chunk]).to(device)
                feats = model.encode_images(pixels).cpu()
                cache.update(zip(chunk, feats))
        self.cache = cache
        if not model.vision_loss_fn.uses_decoder:
            dataset.skip_pixels = True  # the loss needs tokens only; previews load real pixels
        if dist.is_main():
            from ..util import logs

            logs.say(f"cached encoder features of {len(cache)} images")

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        out = model(batch)
        return {"loss": out.loss, "text_loss": out.text_loss, "vision_loss": out.vision_loss}

    def preview_items(self, dataset: Sequence[Any], n: int) -> list[int]:
        out = []
        for i, s in enumerate(dataset.samples):
            if len(out) >= n:
                break
            if "gpt" in s.image_turns():
                out.append(i)
        return out

    def preview_batch(self, dataset: Sequence[Any], ids: list[int]) -> Batch:
        return self.collate([dataset.full_item(i) for i in ids])

    def preview(self, model: nn.Module, batch: Batch, path: Path | None, gather: Gather = no_gather) -> None:
        """One row per target image: degraded input | teacher-forced prediction | target, labelled,
        with PSNR / SSIM against the target under the other tiles."""
        out = model(batch)
        if out.vision_pred is None or model.decoder is None:
            return
        tokens = model.space.next_token(out.vision_pred.flatten(0, 1), lambda g: g.argmax(-1))
        with gather(model.decoder.parameters()):
            pred = model.decode_tokens(tokens.view(*out.vision_pred.shape[:2], *tokens.shape[1:]))
        if path is None:
            return
        from ..image.grids import grid_scale, save_comparison

        owner = _image_owner(batch)
        rows, labels = [], []
        for t, img in enumerate(out.target_images.tolist()):
            inputs = [i for i in range(img) if owner[i] == owner[img] and not bool(batch.image_is_target[i])]
            src = tensor_to_uint8(batch.pixels[inputs[-1]]) if inputs else None
            rows.append([src, tensor_to_uint8(pred[t]), tensor_to_uint8(batch.pixels[img])])
            ids = batch.sample_index
            labels.append(f"sample {ids[owner[img]]}" if owner[img] < len(ids) else "")
        save_comparison(rows, path, columns=("degraded", "lm4lv", "target"), row_labels=labels,
                        truth_column=2, scale=grid_scale(rows[0][1].shape[0]))

    def saved_parameter_names(self, model: nn.Module) -> list[str]:
        return model.saved_parameter_names()

    def save_final(self, model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        model.save_pretrained(out_dir, state_dict=state_dict)


def complete_from_data(model: ModelConfig, samples: Sequence[Sample]) -> ModelConfig:
    """What a model config takes from its training data (before it is resolved): a learnable
    query when the data holds ``<query>`` (a resumed run with one keeps it), and the restoration
    prompt ``generate --input`` uses."""
    model.query = model.query or any(s.has_query for s in samples)
    model.restore_prompt = model.restore_prompt or restoration_prompt(samples)
    return model


def restoration_prompt(samples: Sequence[Sample]) -> str | None:
    """The human turn of the first restoration sample: a ``conversation`` sample that opens with
    a human turn holding ``<task>`` and exactly one ``<image>`` (the degraded input), answered by
    a ``gpt`` turn holding an ``<image>`` (or a ``<query>``, read in one pass). ``None`` when no
    sample is one."""
    for s in samples:
        if s.task_type != "conversation" or len(s.turns) < 2:
            continue
        ask, answer = s.turns[0], s.turns[1]
        if (ask.role == "human" and TASK_TOKEN in ask.value and ask.value.count(IMAGE_TOKEN) == 1
                and answer.role == "gpt" and (IMAGE_TOKEN in answer.value or QUERY_TOKEN in answer.value)):
            return ask.value
    return None


def check_cache_allowed(cfg: ModelConfig) -> None:
    if cfg.train_encoder:
        raise ConfigError("--cache-features needs a frozen encoder; it cannot be used with --train-encoder")


def _image_owner(batch: Batch) -> list[int]:
    """The sample (batch row) of every image in ``batch.pixels``."""
    owner = [-1] * batch.pixels.shape[0]
    for b in range(batch.slot_image.shape[0]):
        for i in batch.slot_image[b][batch.slot_image[b] >= 0].unique().tolist():
            owner[i] = b
    return owner


class _TrainDataset(LM4LVDataset):
    """With cached features and a feature loss, items carry 1×1 placeholder pixels instead of
    decoding and resizing every image each step (``full_item`` still loads them)."""

    skip_pixels = False

    def __getitem__(self, i: int) -> Item:
        if not self.skip_pixels:
            return super().__getitem__(i)
        s = self.samples[i]
        return Item(s, self.builder.encode(s), torch.zeros(len(s.images), 3, 1, 1))

    def full_item(self, i: int) -> Item:
        return super().__getitem__(i)
