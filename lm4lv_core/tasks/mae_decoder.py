"""MAE autoencoder: decoder fine-tuning (|x − D(E(x))|₁ + λ·LPIPS) and batch reconstruction.

The MAE runs with mask ratio 0 and patch order kept, exactly as inside LM4LV, so a decoder
fine-tuned here is the decoder LM4LV uses (``--mae-decoder``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import from_dict, to_dict
from ..data.dataset import image_to_tensor, tensor_to_uint8
from ..engine.task import TrainTask
from ..errors import ConfigError, LM4LVError
from ..imageio import list_images, load_rgb, save_png
from ..loading import cast_by_trainability
from ..util.progress import rank0_progress
from ..vision.mae import MAEDecoder, MAEEncoder, load_mae


class MAEAutoencoder(nn.Module):
    """Encoder + decoder of one ``ViTMAEForPreTraining``; only the decoder trains by default.

    ``dtype`` is the compute dtype (default float32). With ``train=False`` (reconstruction) the
    whole MAE is read from disk in it. When training, the MAE is read in float32 so the trainable
    decoder's master weights are exact, and a frozen encoder is then cast to ``dtype``.
    """

    def __init__(self, path: str, train_encoder: bool = False, dtype: torch.dtype | None = None,
                 train: bool = True) -> None:
        super().__init__()
        dtype = dtype or torch.float32
        hf = load_mae(path, torch.float32 if train else dtype)
        self.path = path
        object.__setattr__(self, "_hf", hf)  # not a submodule: its parts are registered below
        self.encoder = MAEEncoder(mae=hf)
        self.decoder = MAEDecoder(mae=hf)
        self.image_size = self.encoder.image_size
        self.train_encoder = train_encoder
        for p in self.encoder.parameters():
            p.requires_grad_(train_encoder)
        for p in self.decoder.parameters():
            p.requires_grad_(True)
        if train:
            cast_by_trainability(self, dtype, torch.float32)

    def train(self, mode: bool = True) -> "MAEAutoencoder":
        """A frozen encoder stays in eval mode whatever ``mode`` is (no dropout in a frozen part)."""
        super().train(mode)
        if not self.train_encoder:
            self.encoder.eval()
        return self

    def forward(self, pixels: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] → reconstruction ``[B, 3, H, W]``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder):
            feats = self.encoder(pixels)
        return self.decoder(feats, clamp=clamp)

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write a complete Hugging Face ``ViTMAEForPreTraining`` folder into ``path``.

        ``state_dict`` (this module's names, e.g. all parameters gathered from ZeRO-3 partitions)
        overrides the module's own tensors in what is written. Weights held in a lower precision
        while training are written in float32; a frozen part is then written exactly as it was
        read (from the source folder), not rounded through the compute dtype.
        """
        hf = self._hf
        reread = any(p.dtype != torch.float32 for p in hf.parameters())
        if reread:
            hf = load_mae(self.path, torch.float32)
        hf_sd = hf.state_dict()
        updates = state_dict if state_dict is not None else (self.state_dict() if reread else {})
        for k, v in updates.items():
            part, hf_key = k.split(".", 1)  # encoder.vit.* → vit.*, decoder.decoder.* → decoder.*
            if reread and not (part == "decoder" or self.train_encoder):
                continue  # frozen: keep the source's exact weights
            if hf_key not in hf_sd:
                if state_dict is None:
                    continue
                raise ValueError(f"unexpected MAE weight: {k}")
            hf_sd[hf_key] = v.to(hf_sd[hf_key].dtype)
        Path(path).mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(path), state_dict=hf_sd)


def reconstruct_folder(mae_path: str, images_dir: str | Path, out_dir: str | Path, *,
                       batch_size: int = 8, rank: int = 0, world_size: int = 1,
                       crop_border: int = 4, progress=None, precision: str = "fp32",
                       device: torch.device | None = None) -> list[dict[str, Any]]:
    """Reconstruct every image under ``images_dir`` (this rank's share) into ``out_dir`` under the
    same relative names (``.png``); return per-image PSNR/SSIM rows against the (resized) input."""
    from ..metrics import psnr, ssim

    images_dir, out_dir = Path(images_dir), Path(out_dir)
    files = list_images(images_dir)
    if not files:
        raise LM4LVError(f"{images_dir}: no images found (png/jpg/jpeg/webp/bmp/tiff)")
    from ..loading import compute_dtype

    device = device or torch.device("cpu")
    model = MAEAutoencoder(mae_path, dtype=compute_dtype(precision), train=False).to(device).eval()
    mine = files[rank::world_size]
    rows: list[dict[str, Any]] = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        x = torch.stack([image_to_tensor(load_rgb(f), model.image_size) for f in chunk])
        with torch.inference_mode():
            y = model(x.to(device)).float().cpu()
        for f, xi, yi in zip(chunk, x, y):
            rel = f.relative_to(images_dir).with_suffix(".png")
            src, rec = tensor_to_uint8(xi), tensor_to_uint8(yi)
            save_png(rec, out_dir / rel)
            rows.append({"name": rel.as_posix(), "psnr": psnr(src, rec, crop_border),
                         "ssim": ssim(src, rec, crop_border)})
        if progress:
            progress(len(chunk))
    return rows


def mean_rows(rows: list[dict[str, Any]], keys=("psnr", "ssim")) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in keys} if rows else {}


# ---------------------------------------------------------------------------- fine-tuning task
class ImageFolder(torch.utils.data.Dataset):
    """Every image under a folder, resized/cropped to the MAE's square size, in [0, 1]."""

    def __init__(self, root: str | Path, size: int) -> None:
        self.root = Path(root)
        self.files = list_images(self.root)
        if not self.files:
            raise LM4LVError(f"{self.root}: no images found (png/jpg/jpeg/webp/bmp/tiff)")
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
        return ImageBatch(self.pixels.to(device), self.sample_index)

    @property
    def size(self) -> int:
        return int(self.pixels.shape[0])


@dataclass
class MAEFinetuneConfig:
    """What ``lm4lv ft-mae`` trains: the MAE folder and the loss ``L1 + lpips_weight · LPIPS``.

    LPIPS uses VGG16 by default, the perceptual network of the reference's decoder fine-tuning."""

    mae: str
    lpips_weight: float = 1.0
    lpips_net: str = "vgg"
    lpips_weights: str | None = None
    train_encoder: bool = False
    hub: dict[str, Any] = field(default_factory=dict)  # {"mae": {id, revision, commit, path}} for a hub id

    def __post_init__(self) -> None:
        if self.lpips_weight < 0:
            raise ConfigError(f"--lpips-weight must be >= 0, got {self.lpips_weight}")

    def build_lpips(self):
        """The frozen LPIPS module, or ``None`` when its weight is 0 (L1 only)."""
        if self.lpips_weight == 0:
            return None
        from ..metrics import build_lpips

        return build_lpips(self.lpips_net, self.lpips_weights)


class MAETask(TrainTask):
    """Fine-tune the MAE decoder (encoder frozen unless ``train_encoder``) on a folder of images."""

    name = "mae"
    metric_names = ("loss", "l1", "lpips")

    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(job)
        from ..engine.config import TrainConfig

        self.mae_config = from_dict(MAEFinetuneConfig, job["mae"], source="mae config")
        self.train_config = from_dict(TrainConfig, job["train"], source="train config")
        self.lpips = None
        self.model: MAEAutoencoder | None = None

    def config_dict(self) -> dict[str, Any]:
        return {"mae": to_dict(self.mae_config)}

    def build_model(self) -> nn.Module:
        from ..loading import compute_dtype

        self.model = MAEAutoencoder(self.mae_config.mae, train_encoder=self.mae_config.train_encoder,
                                    dtype=compute_dtype(self.train_config.precision))
        if self.train_config.gradient_checkpointing:
            from ..activation_checkpointing import checkpoint_layers

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
        from ..grids import grid_scale, save_comparison

        rows = [[tensor_to_uint8(x), tensor_to_uint8(y)] for x, y in zip(batch.pixels, recon)]
        save_comparison(rows, path, columns=("input", "reconstruction"),
                        row_labels=[f"image {i}" for i in batch.sample_index], truth_column=0,
                        scale=grid_scale(rows[0][0].shape[0]))

    def saved_parameter_names(self, model: nn.Module) -> list[str]:
        return [n for n, _ in model.named_parameters()]  # the whole MAE folder is written

    def save_final(self, model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        model.save_pretrained(out_dir, state_dict=state_dict)


def finetune(train_cfg, mae_cfg: MAEFinetuneConfig) -> Any:
    """Parent side of ``lm4lv ft-mae``: validate, then run the ``mae`` task through the engine.

    ``train_cfg.max_steps == 0`` writes the starting model unchanged as ``final/`` (a baseline).
    """
    from ..engine.run import prepare_run_dir, run_training

    from ..hub import local_path

    mae_cfg.mae, record = local_path(mae_cfg.mae, "--mae", mae_cfg.hub.get("mae"))
    mae_cfg.hub = {"mae": record} if record else {}
    if not list_images(train_cfg.data):
        raise LM4LVError(f"{train_cfg.data}: no images found (png/jpg/jpeg/webp/bmp/tiff)")
    train_cfg.data = str(Path(train_cfg.data).resolve())
    mae_cfg.mae = str(Path(mae_cfg.mae).resolve())
    if train_cfg.max_steps == 0:
        from ..config import save_yaml
        from ..util.fsutil import temp_dir, writing
        from ..util.runlock import hold

        with hold(train_cfg.out, "ft-mae"):
            out = prepare_run_dir(train_cfg)
            save_yaml({"task": "mae", "train": to_dict(train_cfg), "mae": to_dict(mae_cfg)}, out / "config.yaml")
            with writing(out / "final"):
                tmp = temp_dir(out, "final")
                try:
                    MAEAutoencoder(mae_cfg.mae).save_pretrained(tmp)
                    os.replace(tmp, out / "final")
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        return {"step": 0, "total_steps": 0, "finished": True}
    mae_cfg.build_lpips()  # fail now, not in the workers, when LPIPS weights are missing
    return run_training("mae", train_cfg, {"mae": to_dict(mae_cfg)})


# ---------------------------------------------------------------------------- reconstruction job
def recon_mae_job(job: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Worker side of ``lm4lv recon-mae``: each rank reconstructs its share; rank 0 gathers rows."""
    from ..util import dist

    dist.init_distributed()
    n_mine = len(list_images(job["images"])[dist.rank()::dist.world_size()])
    with rank0_progress("reconstruct", n_mine, show=dist.is_main()) as advance:
        rows = reconstruct_folder(job["mae"], job["images"], job["out"], batch_size=job["batch_size"],
                                  rank=dist.rank(), world_size=dist.world_size(),
                                  crop_border=job.get("crop_border", 4), progress=advance,
                                  precision=job.get("precision", "fp32"), device=dist.device())
    gathered = dist.all_gather_objects(rows)
    if not dist.is_main():
        return None
    merged = sorted((r for part in gathered for r in part), key=lambda r: r["name"])
    from ..util.fsutil import write_json_atomic

    write_json_atomic(Path(job["out"]) / "recon.json", {"count": len(merged), "mean": mean_rows(merged),
                                                         "images": merged})
    return merged


def _mae_path(mae: str | None, preset: str | None, record: dict | None = None) -> tuple[str, dict | None]:
    """The MAE folder of ``--mae`` (a folder or a Hugging Face id, fetched when needed) or ``--preset``,
    and the hub record of an id (see :func:`lm4lv_core.hub.local_path`)."""
    from ..hub import local_path
    from ..presets import preset_dir

    if bool(mae) == bool(preset):
        raise ConfigError("give exactly one of --mae PATH|ID or --preset NAME")
    return local_path(str(preset_dir(preset) / "mae") if preset else str(mae), "--mae", record)


def resolve_finetune_options(options: dict[str, Any], config_file: str | None = None):
    """Flat ``ft-mae`` options (``None`` = not given) over ``--config`` over a resumed run's
    ``config.yaml`` → ``(TrainConfig, MAEFinetuneConfig)``."""
    from ..config import load_yaml
    from ..engine.config import TrainConfig, train_config_keys

    mae_keys = {"mae", "preset", "lpips_weight", "lpips_net", "lpips_weights", "train_encoder", "hub"}
    layers: list[dict[str, Any]] = []
    out = options.get("out")
    if options.get("resume") and out and (Path(out) / "config.yaml").is_file():
        saved = load_yaml(Path(out) / "config.yaml")
        layers.append({k: v for k, v in {**saved.get("train", {}), **saved.get("mae", {})}.items()
                       if k not in ("out", "resume", "overwrite", "verbose")})
    if config_file:
        data = {str(k).replace("-", "_"): v for k, v in load_yaml(config_file).items()}
        unknown = sorted(set(data) - train_config_keys() - mae_keys)
        if unknown:
            raise ConfigError(f"--config {config_file}: unknown option(s) {', '.join(unknown)}")
        layers.append(data)
    layers.append(options)
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    if not merged.get("out"):
        raise ConfigError("--out is required")
    source = options if (options.get("mae") or options.get("preset")) else merged
    saved_record = (merged.get("hub") or {}).get("mae") if source is merged else None
    merged["mae"], record = _mae_path(source.get("mae"), source.get("preset"), saved_record)
    merged["hub"] = {"mae": record} if record else {}
    merged.pop("preset", None)
    max_steps = merged.get("max_steps")
    if max_steps == 0:
        merged.pop("max_steps")
    train = from_dict(TrainConfig, {k: v for k, v in merged.items() if k in train_config_keys()},
                      source="ft-mae options")
    if max_steps == 0:
        train.max_steps = 0
    mae_cfg = from_dict(MAEFinetuneConfig, {k: v for k, v in merged.items() if k in mae_keys},
                        source="ft-mae options")
    return train, mae_cfg


def reconstruct(images: str | Path, out: str | Path, *, mae: str | None = None, preset: str | None = None,
                batch_size: int = 8, nproc: int = 1, engine: str = "deepspeed", crop_border: int = 4,
                overwrite: bool = False, verbose: bool = False, precision: str = "fp32") -> list[dict[str, Any]]:
    """Parent side of ``lm4lv recon-mae``: validate, then run the reconstruction workers
    (third-party output goes to ``out/recon-mae.log``)."""
    from ..engine import launch
    from ..loading import compute_dtype

    compute_dtype(precision)
    if precision == "fp16" and not launch.has_cuda():
        raise ConfigError("--precision fp16 needs a GPU; use fp32 or bf16 on the CPU")
    path, _ = _mae_path(mae, preset)
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise LM4LVError(f"{images}: folder not found")
    if not list_images(images):
        raise LM4LVError(f"{images}: no images found (png/jpg/jpeg/webp/bmp/tiff)")
    if out.resolve() == images.resolve() or images.resolve() in out.resolve().parents:
        raise ConfigError(f"--out {out}: must not be the input folder or inside it")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out}: the folder is not empty; pass --overwrite to write into it")
    job = {"mae": path, "images": str(images.resolve()), "out": str(out.resolve()),
           "batch_size": batch_size, "crop_border": crop_border, "precision": precision}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lm4lv-recon-") as job_dir:
        rows = launch.run_job("recon-mae", job, nproc=nproc, engine=engine, job_dir=job_dir,
                              log_file=out / "recon-mae.log", verbose=verbose)
    if rows is None:  # several workers: rank 0 wrote the gathered rows
        import json

        rows = json.loads((out / "recon.json").read_text(encoding="utf-8"))["images"]
    return rows
