"""The MAE decoder as a ``TrainTask``: |x − D(E(x))|₁ + λ·LPIPS on a folder of images.

The MAE runs with mask ratio 0 and patch order kept, exactly as inside LM4LV, so a decoder
fine-tuned here is the decoder LM4LV uses (``--mae-decoder``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.dataset import image_to_tensor, tensor_to_uint8
from ..engine.config import TrainConfig
from ..engine.task import TrainTask
from ..image.io import load_rgb, require_images
from ..vision.mae import MAEAutoencoder
from .mae_config import MAEFinetuneConfig  # noqa: F401 (its config, re-exported)


class ImageFolder(torch.utils.data.Dataset):
    """Every image under a folder, resized/cropped to the MAE's square size, in [0, 1]."""

    def __init__(self, root: str | Path, size: int) -> None:
        self.root = Path(root)
        self.files = require_images(self.root)
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, image_to_tensor(load_rgb(self.files[i]), self.size)


@dataclass
class ImageBatch:
    pixels: torch.Tensor
    sample_index: list[int]

    def to(self, device, dtype: torch.dtype | None = None) -> "ImageBatch":
        return ImageBatch(self.pixels.to(device, dtype), self.sample_index)

    @property
    def size(self) -> int:
        return int(self.pixels.shape[0])


class MAETask(TrainTask):
    """Fine-tune the MAE decoder (encoder frozen unless ``train_encoder``) on a folder of images."""

    name = "mae"
    metric_names = ("loss", "l1", "lpips")

    def __init__(self, train: TrainConfig, mae: MAEFinetuneConfig) -> None:
        self.train_config = train
        self.mae_config = mae
        self.lpips = None
        self.model: MAEAutoencoder | None = None

    def build_model(self) -> nn.Module:
        from ..precision import compute_dtype

        self.model = MAEAutoencoder(self.mae_config.mae, train_encoder=self.mae_config.train_encoder,
                                    dtype=compute_dtype(self.train_config.precision))
        if self.train_config.gradient_checkpointing:
            from ..model.activation_checkpointing import checkpoint_layers

            checkpoint_layers(self.model.decoder, "decoder")
            if self.mae_config.train_encoder:
                checkpoint_layers(self.model.encoder, "encoder")
        return self.model.train()

    def dataset(self) -> ImageFolder:
        return ImageFolder(self.train_config.data, self.model.image_size)

    def collate(self, items: list[tuple[int, torch.Tensor]]) -> ImageBatch:
        return ImageBatch(torch.stack([x for _, x in items]), [i for i, _ in items])

    def prepare(self, model: nn.Module, dataset, device: torch.device) -> None:
        self.lpips = self.mae_config.build_lpips()
        if self.lpips is not None:
            self.lpips.to(device)

    def loss(self, model: nn.Module, batch: ImageBatch) -> dict[str, torch.Tensor]:
        recon = model(batch.pixels, clamp=False).float()
        target = batch.pixels.float()
        l1 = (recon - target).abs().mean()
        lp = self.lpips(recon, target).mean() if self.lpips is not None else torch.zeros((), device=l1.device)
        return {"loss": l1 + self.mae_config.lpips_weight * lp, "l1": l1.detach(), "lpips": lp.detach()}

    def preview(self, model: nn.Module, batch: ImageBatch, path: Path | None, gather=None) -> None:
        """One row per image: input | reconstruction (with its PSNR / SSIM), labelled."""
        recon = model(batch.pixels)
        if path is None:
            return
        from ..image.grids import grid_scale, save_comparison

        rows = [[tensor_to_uint8(x), tensor_to_uint8(y)] for x, y in zip(batch.pixels, recon)]
        save_comparison(rows, path, columns=("input", "reconstruction"),
                        row_labels=[f"image {i}" for i in batch.sample_index], truth_column=0,
                        scale=grid_scale(rows[0][0].shape[0]))

    def saved_parameter_names(self, model: nn.Module) -> list[str]:
        return [n for n, _ in model.named_parameters()]  # the whole MAE folder is written

    def save_final(self, model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        model.save_pretrained(out_dir, state_dict=state_dict)
