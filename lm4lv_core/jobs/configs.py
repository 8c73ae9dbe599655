"""The configs of the commands beside train's (``make-data``, ``eval``, ``quickstart``, ``generate``, ``recon``,
``import-reference``):
each field is the command's option of the same name, declared once (:func:`lm4lv_core.config.option`).

Importing this module imports neither torch nor numpy (the command line reads these declarations)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import option, on_error_option, overwrite_option, workers_option
from ..defaults import CROP_BORDER, DEFAULT_PROMPT, GENERATE_BATCH_SIZE, RECON_BATCH_SIZE, SIZE_POLICY
from ..errors import ConfigError


@dataclass
class MakeDataConfig:
    """Options of ``lm4lv make-data``. Either ``clean_dir`` + ``degradations`` (build mode) or
    ``lq_dir`` + ``hq_dir`` (pairing mode: existing images are referenced, not copied)."""

    out: Path = option(doc="Dataset folder to create.", panel="Output", flags="--out -o", shows="required")
    clean_dir: Path | None = option(None, "Folder of clean images (recursive): the CLEAN_DIR argument.", cli=False)
    degradations: list[str] = option(doc="NAME[:k=v,...], chain with + (e.g. blur:sigma=2+noise:sigma=15); "
                                     "repeatable.", panel="Data", flags="--degradation -d", name="degradation",
                                     factory=list)
    size: int = option(224, f"Output size: {SIZE_POLICY}.", panel="Data")
    seed: int = option(0, "Seed of the degradations and of the test split.", panel="Data")
    test_fraction: float = option(0.1, "Share of clean images held out for test.", panel="Data")
    test_dir: Path | None = option(None, "Separate folder of clean test images (replaces --test-fraction).",
                                   panel="Data")
    prompt: str = option(DEFAULT_PROMPT, "Human turn; <image> is the degraded image.", panel="Data")
    workers: int = workers_option(1)
    overwrite: bool = overwrite_option("a dataset lm4lv make-data made earlier in --out (a folder it did not make "
                                                "is never replaced)")
    lq_dir: Path | None = option(None, "Pair existing degraded images...", panel="Data", name="lq")
    hq_dir: Path | None = option(None, "...with these clean images.", panel="Data", name="hq")
    resize: str = option("stretch", "stretch: SIZE x SIZE whatever the aspect ratio (as the reference); crop: "
                         "shorter side to SIZE, centre square.", panel="Data")
    on_error: str = on_error_option()

    def __post_init__(self) -> None:
        from ..image.io import check_resize

        for name in ("out", "clean_dir", "test_dir", "lq_dir", "hq_dir"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, Path(v).expanduser().resolve())
        self.degradations = list(self.degradations)
        if self.pairing:
            if self.lq_dir is None or self.hq_dir is None:
                raise ConfigError("pairing mode needs both --lq and --hq")
            if self.clean_dir is not None or self.degradations or self.test_dir is not None:
                raise ConfigError("--lq/--hq pair existing images: do not also give CLEAN_DIR, "
                                  "--degradation or --test-dir")
        else:
            if self.clean_dir is None:
                raise ConfigError("give CLEAN_DIR (a folder of clean images) or --lq and --hq")
            if not self.degradations:
                raise ConfigError("give at least one --degradation (`--list` shows them)")
        if self.size < 0:
            raise ConfigError(f"--size must be >= 0, got {self.size}")
        check_resize(self.resize)
        if self.on_error not in ("stop", "skip"):
            raise ConfigError(f"--on-error must be one of stop, skip, got {self.on_error!r}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        if not 0.0 <= self.test_fraction <= 1.0:
            raise ConfigError(f"--test-fraction must be in [0, 1], got {self.test_fraction}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.prompt.count("<image>") != 1:
            raise ConfigError("--prompt must contain <image> exactly once (the degraded image)")
        for src in (self.clean_dir, self.test_dir, self.lq_dir, self.hq_dir):
            if src is not None and (self.out == src or src in self.out.parents):
                raise ConfigError(f"--out {self.out} must not be inside the input folder {src}")

    @property
    def pairing(self) -> bool:
        return self.lq_dir is not None or self.hq_dir is not None


@dataclass
class EvalConfig:
    """The options of ``lm4lv eval`` (its arguments METRIC GT PRED... are not options); the command
    hands them to :func:`lm4lv_core.jobs.evaluate.evaluate`."""

    crop_border: int = option(CROP_BORDER, "Pixels removed from each side before scoring.", panel="Scoring")
    y_channel: bool = option(False, "Score BT.601 luma (PSNR/SSIM).", panel="Scoring", flags="--y-channel")
    resize_to_smaller: bool = option(False, "Resize both images of a pair to the smaller size (bicubic) instead of "
                                     "failing on a size mismatch.", panel="Scoring", flags="--resize-to-smaller")
    lpips_net: str = option("alex", "LPIPS backbone: alex | vgg.", panel="Scoring")
    lpips_weights: Path | None = option(None, "torchvision backbone state dict.", panel="Scoring",
                                        shows="the torch hub cache")
    device: str = option("auto", "Where LPIPS runs: auto (the GPU when one is present), cpu, cuda, cuda:K.",
                         panel="Scoring")
    ceiling: str | None = option(None, "RUN or FAMILY:SOURCE: also score the vision family's own reconstruction "
                                 "of GT (encode -> decode, no LLM), the best a restoration through it can reach.",
                                 panel="Scoring")
    json_file: Path | None = option(None, "Write summary + rows here.", panel="Output", flags="--json")
    csv_file: Path | None = option(None, "Write per-image rows here.", panel="Output", flags="--csv")
    grid: Path | None = option(None, "Draw a labelled comparison grid (PNG) of scored pairs.", panel="Output")
    grid_rows: int | None = option(None, "Grid of the first N images.", panel="Output",
                                   shows="the worst, median and best by PSNR gain of the last PRED over the first")
    labels: str | None = option(None, "Comma-separated names of the PRED folders.", panel="Output",
                                shows="their shortest distinct paths")
    html: Path | None = option(None, "Write a comparison page (open it from disk): means, sortable per-image "
                               "table, before/after slider with pixel zoom.", panel="Output")
    overwrite: bool = overwrite_option("the --json/--csv/--grid/--html files an earlier lm4lv eval wrote (other "
                                                "existing files are never replaced)")
    resume: bool = option(False, "Continue an interrupted run from the scores it streamed beside --csv / --json "
                          "(same settings only).", panel="Output", flags="--resume")
    workers: int | None = workers_option(None, shows="the machine's cores, at most 8; 1 for small folders")
    on_error: str = on_error_option()


# both degrade the held-out images below what the tiny decoder can paint (the ceiling): a ×4 down-up
# of 64 px images stays ~30 dB, above any restoration through a tiny MAE
QUICKSTART_DEGRADATIONS = ("noise:sigma=25", "jpeg:quality=4")


@dataclass
class QuickstartConfig:
    """The settings of ``lm4lv quickstart`` (recorded as its folder's ``quickstart.yaml``); the
    fields an option sets are its options, the others fixed recipe values."""

    out: str = option("lm4lv-quickstart", "Folder for everything the quickstart makes.", panel="Output")
    preset: str = option("tiny-64", "Tiny offline model preset.", panel="Model")
    size: int = option(64, "Image size (must match the preset's MAE).", panel="Data")
    degradations: tuple[str, ...] = option(QUICKSTART_DEGRADATIONS, "Degradations of the made data.", cli=False)
    mae_steps: int = option(1500, "MAE decoder fine-tuning steps (0 keeps the random decoder).", panel="Training",
                            min=0)
    steps: int = option(2400, "LM4LV training steps.", panel="Training", min=1)
    micro_batch: int = option(8, "Micro-batch of ft-mae and train.", cli=False)
    lr: float = option(4e-3, "Learning rate of LM4LV (adapters, task tokens, LoRA).", cli=False)
    mae_lr: float = option(2e-3, "Learning rate of ft-mae.", cli=False)
    crops: int = option(8, "Random crops per training image, plus as many colour-augmented ones (0: none).",
                        cli=False)
    lora_r: int = option(16, "LoRA rank on attention + MLP of the random LLM (0: frozen LLM, the paper's default).",
                         cli=False)
    lora_alpha: int = option(32, "LoRA alpha.", cli=False)
    seed: int = option(0, "Seed of data, initialisation and data order.", panel="Training")
    lpips_weight: float | None = option(None, "λ of ft-mae.", panel="Training",
                                        shows="1.0 when LPIPS weights are installed, else 0")
    overwrite: bool = overwrite_option("an earlier quickstart in --out (only what it wrote there)")

    def __post_init__(self) -> None:
        if self.mae_steps < 0 or self.steps < 1:
            raise ConfigError("--mae-steps must be >= 0 and --steps >= 1")
        if self.size < 16:
            raise ConfigError(f"--size must be >= 16, got {self.size}")


@dataclass(kw_only=True)
class GenerateOptions:
    """The options of ``lm4lv generate`` beside its decoding (``GenerationConfig``) and worker options."""

    run: Path = option(doc="Training run folder (its final/, else its newest checkpoint), a checkpoint "
                       "RUN/checkpoints/step-N or a saved model folder.", panel="Data", required=True)
    data: Path | None = option(None, "Data file: prompts ending with an empty gpt turn, or training samples (their "
                               "last answer is dropped and generated).", panel="Data")
    inputs: list[Path] = option(doc="Instead of --data: images or folders (searched recursively) to restore, "
                                "--input PATH [PATH ...]; outputs mirror their paths under --out.", panel="Data",
                                flags="--input -i", factory=list)
    prompt: str | None = option(None, "With --input: the restoration prompt, <image> = the image.", panel="Data",
                                shows="the one recorded by training")
    image_root: Path | None = option(None, "Base of relative image paths.", panel="Data",
                                     shows="the data file's folder")
    out: Path = option(doc="Output folder: images/, results.jsonl, generate.json (with --input: the restored images "
                       "at their inputs' relative paths, and generate.json).", panel="Output", flags="--out -o",
                       required=True)
    batch_size: int = option(GENERATE_BATCH_SIZE, "Samples (with --tile: tiles) per batch and worker.",
                             panel="Generation", min=1)
    compile: bool = option(False, "torch.compile the decode step of image-only batches (static KV cache); pays "
                           "off on a GPU.", panel="Generation", flags="--compile")
    html: Path | None = option(None, "Also write a comparison page (open it from disk): each input beside what "
                               "lm4lv made of it, and the ground truth with PSNR / SSIM for training samples whose "
                               "image answer was generated.", panel="Output")
    overwrite: bool = overwrite_option("this folder's earlier outputs: regenerate every sample (with --input: restore "
                                       "every image again)")
    on_error: str = on_error_option()


@dataclass(kw_only=True)
class ReconOptions:
    """The options of ``lm4lv recon`` beside its vision parts, worker and tile options."""

    out: Path = option(doc="Output folder (same relative names, .png).", panel="Output", required=True)
    batch_size: int = option(RECON_BATCH_SIZE, "Images (with --tile: tiles) per forward pass.", panel="Generation",
                             min=1)
    crop_border: int = option(CROP_BORDER, "Pixels cropped from each side before PSNR/SSIM.", panel="Scoring", min=0)
    overwrite: bool = overwrite_option("an earlier recon's reconstructions in a non-empty --out")


@dataclass(kw_only=True)
class ImportOptions:
    """The options of ``lm4lv import-reference`` beside the model options of ``train``."""

    out: Path = option(doc="The lm4lv saved model folder to write (use it with lm4lv generate --run).",
                       panel="Output", flags="--out -o", required=True)
    config_from: Path | None = option(None, "Take the model (LLM, vision parts, adapters, template, LoRA) from an "
                                      "lm4lv run, checkpoint or saved model folder; its weights are not used.",
                                      panel="Model")
    overwrite: bool = overwrite_option("--out")
