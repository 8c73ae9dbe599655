"""``lm4lv quickstart``: scikit-image sample images, the stages, and the report.

The quickstart runs the core of every command (make-data → ft-mae → train → generate → eval) on
scikit-image's sample images and a tiny random-initialised model built offline, so the whole method
runs on a laptop CPU in minutes. Its numbers are whatever the run measures.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..util.fsutil import write_text_atomic
from ..image.io import load_rgb, resize_shorter, save_png
from .configs import QUICKSTART_DEGRADATIONS, QuickstartConfig  # noqa: F401 (its config, re-exported)

# scikit-image sample images: RGB and grayscale photographs and textures
TRAIN_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                "coins", "camera", "moon", "brick", "grass", "gravel", "clock", "cell", "page", "text")
HELD_OUT_IMAGES = ("cat", "retina", "colorwheel")
MARKER = "quickstart.yaml"  # the settings of the run; marks the folder as the quickstart's own
# everything the quickstart writes into its folder; --overwrite replaces only these
OWN_ENTRIES = ("images", "data", "mae", "run", "generated", "scores", "grid.png", "loss.png", "report.md", "report.html",
               "report_files", MARKER)
# LoRA on attention and MLP: a *random* LLM must learn to carry degraded token t to the slot
# before target token t; a pretrained LLM does this frozen (the paper's setting)
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
DEGRADATIONS = QUICKSTART_DEGRADATIONS


@dataclass
class Stage:
    """One command of the quickstart: its positional ``args`` and ``options`` by option name, as
    ``lm4lv COMMAND`` takes them (``run_stage`` runs it; the report shows it as a command line)."""

    name: str
    command: str
    args: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def export_sample_images(root: Path) -> tuple[Path, Path]:
    """Write scikit-image's sample images as PNGs into ``root/train`` and ``root/held-out``."""
    import skimage.data

    dirs = (root / "train", root / "held-out")
    for folder, names in zip(dirs, (TRAIN_IMAGES, HELD_OUT_IMAGES)):
        for name in names:
            arr = np.asarray(getattr(skimage.data, name)())
            if arr.dtype == bool:
                arr = arr.astype(np.uint8) * 255
            if arr.ndim == 2:
                arr = np.stack([arr] * 3, -1)
            save_png(np.ascontiguousarray(arr[..., :3]), folder / f"{name}.png")
    return dirs


def augment_train_images(src: Path, dst: Path, size: int, per_image: int, seed: int = 0) -> Path:
    """``per_image`` random ``size`` px crops (random scale, h-flip) of each image in ``src`` and as many
    colour-augmented ones (tint toward a random hue, saturation boost, channel permutation) into ``dst``.

    16 sample images are too few for the MAE decoder and the adapters: with them the decoder's
    held-out reconstruction PSNR stays below the noisy input's, and a saturated image such as
    ``colorwheel`` reconstructs at ~13 dB because the training set holds almost no saturated colour.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.glob("*.png")):
        img = Image.open(p).convert("RGB")
        for colour in (False, True):
            for k in range(per_image):
                s = int(rng.choice([size, size * 5 // 4, size * 3 // 2, size * 2]))
                im = resize_shorter(img, s)
                x, y = rng.integers(0, im.size[0] - size + 1), rng.integers(0, im.size[1] - size + 1)
                c = np.asarray(im.crop((x, y, x + size, y + size)), dtype=np.float32)
                if rng.random() < 0.5:
                    c = c[:, ::-1]
                if colour:
                    gray = c.mean(-1, keepdims=True)
                    tint = rng.uniform(0, 1, size=3)
                    tint /= tint.max()
                    c = gray * tint * rng.uniform(0.8, 1.3) + (c - gray) * rng.uniform(1, 2)
                    c = c[..., rng.permutation(3)]
                save_png(np.ascontiguousarray(np.clip(c, 0, 255).astype(np.uint8)),
                         dst / f"{p.stem}_{'c' if colour else 'n'}{k}.png")
    return dst


def lpips_available() -> bool:
    """Whether the backbone of ft-mae's default LPIPS network is in the torch hub cache."""
    from ..tasks.mae_config import MAEFinetuneConfig
    from ..image.metrics import lpips_backbone_file, lpips_cache_dir

    return (lpips_cache_dir() / lpips_backbone_file(MAEFinetuneConfig.lpips_net)).is_file()


def stages(cfg: QuickstartConfig, lpips_weight: float, verbose: bool = False) -> list[Stage]:
    """The commands the quickstart runs, in order (paths inside ``cfg.out``); ``verbose`` shows the
    third-party output of the commands that write a log."""
    o = Path(cfg.out)
    train_images = o / ("images/train-crops" if cfg.crops else "images/train")
    lora = ({"lora": True, "lora_targets": LORA_TARGETS, "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha}
            if cfg.lora_r else {})
    loud = {"verbose": True} if verbose else {}
    out = [
        Stage("make-data", "make-data", [str(train_images)],
              {"test_dir": str(o / "images/held-out"), "out": str(o / "data"), "degradation": list(cfg.degradations),
               "size": cfg.size, "seed": cfg.seed}),
        Stage("ft-mae", "ft-mae", [str(o / "data/hq")],
              {"out": str(o / "mae"), "preset": cfg.preset, "lpips_weight": lpips_weight, "max_steps": cfg.mae_steps,
               "micro_batch": cfg.micro_batch, "lr": cfg.mae_lr, "seed": cfg.seed, "save_every": max(cfg.mae_steps, 1),
               "preview_every": max(cfg.mae_steps // 3, 100), **loud}),
        Stage("train", "train", [],
              {"data": str(o / "data/train.json"), "out": str(o / "run"), "preset": cfg.preset,
               "mae_decoder": str(o / "mae/final"), "max_steps": cfg.steps, "micro_batch": cfg.micro_batch,
               "lr": cfg.lr, "seed": cfg.seed, "cache_features": True, "save_every": cfg.steps,
               "preview_every": max(cfg.steps // 4, 100), **lora, **loud}),
        Stage("generate", "generate", [],
              {"run": str(o / "run"), "data": str(o / "data/test.json"), "out": str(o / "generated"),
               "batch_size": 8, **loud}),
    ]
    for slug in degradation_slugs(cfg):  # degraded input and lm4lv's output in one table
        out.append(Stage(f"eval {slug}", "eval",
                         ["psnr,ssim", str(o / "data/test/hq"), str(o / "data/test/lq" / slug),
                          str(o / "generated/images" / slug)],
                         {"labels": "degraded,lm4lv", "json": str(o / "scores" / f"{slug}.json"),
                          "ceiling": str(o / "run"), "html": str(o / "scores" / f"{slug}.html")}))
    return out


def run_stage(stage: Stage, progress=None, on_note=None) -> Any:
    """Run one stage through the core of its command; returns what that command reports
    (``progress(done, total)`` for make-data and eval, ``on_note(text)`` for generate)."""
    a, o = stage.args, dict(stage.options)
    if stage.command == "make-data":
        from .make_data import MakeDataConfig, make_data

        cfg = MakeDataConfig(out=Path(o.pop("out")), clean_dir=Path(a[0]), degradations=o.pop("degradation"),
                             test_dir=Path(o.pop("test_dir")), **o)
        return make_data(cfg, progress=progress)
    if stage.command == "ft-mae":
        from .ft_mae import finetune, resolve_finetune_options

        train, mae = resolve_finetune_options({"data": a[0], **o})
        return train, finetune(train, mae)
    if stage.command == "train":
        from .train import resolve_options, train

        cfg, model = resolve_options(o)
        return cfg, train(cfg, model)
    if stage.command == "generate":
        from .generate import generate

        return generate(o.pop("run"), o.pop("data"), o.pop("out"), on_note=on_note, **o)
    if stage.command == "eval":
        from .evaluate import evaluate

        return evaluate(a[0], a[1], a[2:], labels=o["labels"].split(","), json_file=o["json"], progress=progress,
                        ceiling=o.get("ceiling"), html=o.get("html"))
    raise ConfigError(f"unknown quickstart stage command {stage.command!r}")


def command_line(stage: Stage) -> str:
    """``stage`` as the ``lm4lv`` command line that does the same."""
    import shlex

    words = [stage.command, *stage.args]
    for name, value in stage.options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            words += [w for v in value for w in (flag, str(v))]
        else:
            words += [flag, str(value)]
    return "lm4lv " + shlex.join(words)


def degradation_slugs(cfg: QuickstartConfig) -> list[str]:
    from ..image.degrade import parse_spec

    return [parse_spec(d).slug for d in cfg.degradations]


def scores_table(cfg: QuickstartConfig) -> list[dict[str, Any]]:
    """Per degradation: mean PSNR/SSIM of the degraded inputs and of the restored images."""
    rows = []
    for slug in degradation_slugs(cfg):
        data = json.loads((Path(cfg.out) / "scores" / f"{slug}.json").read_text(encoding="utf-8"))
        row: dict[str, Any] = {"degradation": slug}
        for kind, pred in zip(("degraded", "restored", "ceiling"), data["predictions"]):
            row[f"{kind}_psnr"] = pred["mean"]["psnr"]
            row[f"{kind}_ssim"] = pred["mean"]["ssim"]
            row["count"] = pred["count"]
        rows.append(row)
    return rows


def write_grid(cfg: QuickstartConfig) -> Path:
    """``grid.png``: degraded | lm4lv | ground truth, one labelled row per held-out sample, with
    PSNR / SSIM under the degraded and restored tiles."""
    from ..image.grids import grid_scale, save_comparison

    o = Path(cfg.out)
    rows, labels = [], []
    for line in (o / "generated" / "results.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        out = Path(rec["outputs"][0])
        rows.append([np.asarray(load_rgb(p)) for p in (rec["inputs"][0], o / "generated" / out, rec["target"])])
        labels.append(f"{out.stem}\n{out.parent.name}")
    path = o / "grid.png"
    save_comparison(rows, path, columns=("degraded", "lm4lv", "ground truth"), row_labels=labels,
                    truth_column=2, scale=grid_scale(cfg.size))
    return path


WHAT_IT_SHOWS = (
    "The *ceiling* is the vision family's own reconstruction of the ground truth (MAE encoder → the run's "
    "fine-tuned decoder, no LLM): no restoration through this decoder can score above it. Both degradations "
    "put the input below the ceiling, so the restored column can land anywhere between the two.",
    "",
    "What the tiny random model can show: the whole pipeline runs and learns (the loss falls; on held-out "
    "images a restoration lands between the degraded input and the ceiling, or below the input where 2400 "
    "steps on 16 sample images are not enough). What it cannot show: the "
    "paper's quality — a random 64 px MAE paints coarse images (a low ceiling), and a random LLM carries "
    "no knowledge of images; that needs pretrained weights (`--preset` with real models).")


def write_html_report(cfg: QuickstartConfig) -> Path:
    """``report.html``: every held-out image of every degradation on one comparison page (degraded,
    restored, ceiling, ground truth), with the grid and the loss curve."""
    from ..report.html import rows_from_folders, write_page

    o = Path(cfg.out)
    rows, labels, metrics, settings = [], None, None, {}
    for slug in degradation_slugs(cfg):
        data = json.loads((o / "scores" / f"{slug}.json").read_text(encoding="utf-8"))
        labels = [p["label"] for p in data["predictions"]]
        metrics = [m for m in data["predictions"][0]["mean"]]
        settings = data["settings"]
        for r in rows_from_folders([p["images"] for p in data["predictions"]], metrics, group=slug):
            r.name = f"{slug}/{r.name}"
            rows.append(r)
    extra = ('<h2>Training</h2><p><img src="grid.png" alt="degraded | lm4lv | ground truth" style="max-width:100%">'
             '<img src="loss.png" alt="loss" style="max-width:100%"></p>')
    return write_page(o / "report.html", title="lm4lv quickstart: held-out images", labels=labels, metrics=metrics,
                      rows=rows, settings=settings, notes=[t for t in WHAT_IT_SHOWS if t], extra_html=extra).page


def write_report(cfg: QuickstartConfig, table: list[dict[str, Any]], ran: list[Stage], lpips_weight: float,
                 total_s: float) -> Path:
    """``report.md``: the scores table, the grid, the loss curve and the commands that were run."""
    o = Path(cfg.out)
    shutil.copyfile(o / "run" / "loss.png", o / "loss.png")
    lines = ["# lm4lv quickstart report", "",
             f"Preset `{cfg.preset}` (random-initialised LLM and MAE built offline), {cfg.size} px images from "
             f"scikit-image, {len(HELD_OUT_IMAGES)} held-out images"
             + (f", {2 * cfg.crops} crops of each training image" if cfg.crops else "")
             + f". MAE decoder fine-tuned for {cfg.mae_steps} steps (λ_LPIPS = {lpips_weight}), LM4LV trained "
             f"for {cfg.steps} steps"
             + (f" with LoRA (r = {cfg.lora_r}) on the random LLM's attention and MLP" if cfg.lora_r else
                " with the LLM frozen")
             + f". Total time {total_s:.0f} s.",
             "", "| degradation | images | degraded PSNR | restored PSNR | Δ PSNR | ceiling PSNR | degraded SSIM | "
             "restored SSIM | ceiling SSIM |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['degradation']} | {r['count']} | {r['degraded_psnr']:.2f} | {r['restored_psnr']:.2f} | "
                     f"{r['restored_psnr'] - r['degraded_psnr']:+.2f} | {r.get('ceiling_psnr', float('nan')):.2f} | "
                     f"{r['degraded_ssim']:.4f} | {r['restored_ssim']:.4f} | {r.get('ceiling_ssim', float('nan')):.4f} |")
    lines += ["", "PSNR in dB (RGB, 4 px border cropped), SSIM averaged over channels.", "", *WHAT_IT_SHOWS, "",
              "Open [report.html](report.html) in a browser to compare degraded, restored, ceiling and ground truth "
              "image by image (slider, pixel zoom, sorting).", "",
              "![degraded | lm4lv | ground truth](grid.png)", "",
              "Each row: degraded | lm4lv | ground truth, with PSNR / SSIM against the ground truth.", "",
              "![loss](loss.png)", "", "## Commands", "", "```bash"]
    lines += [f"{command_line(s)}   # {s.seconds:.1f} s" for s in ran]
    lines += ["```", ""]
    path = o / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path
