"""Named model presets. ``tiny*`` presets build small random-initialised Hugging Face folders
offline (an LLM with a tokenizer trained on the spot, and an MAE), so every loading path is the
real ``from_pretrained`` path. Folders are built once per machine under ``$LM4LV_HOME/presets``
(default ``~/.cache/lm4lv``) and reused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig, ModuleSpec
from ..errors import ConfigError

PRESET_VERSION = 2

_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "### Human: ### Assistant: USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>>",
    "<Img> </Img> <image> <task> A picture of",
    "Restore the image. Remove the noise, the blur and the rain from the photo.",
    "a cat sitting on a wooden table next to a cup of coffee",
    "an astronaut standing in front of the flag, a rocket in the sky",
    "olive oil is a healthy ingredient used liberally in cooking",
    "the physical and chemical breakdown of rocks by weathering",
    "three golden letters of a deluxe alphabet, randomly rotated",
    "the quick brown fox jumps over the lazy dog 0123456789",
]
_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
    "{% else %}<|assistant|>{{ m['content'] }}</s>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    llm_family: str  # "llama" | "gpt2"
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    image_size: int
    patch_size: int
    mae_hidden: int
    mae_layers: int
    mae_heads: int
    dec_hidden: int
    dec_layers: int
    num_task_tokens: int = 10
    vision: str = "mae"  # the vision family: mae | vqgan-codes | sd-vae (a diffusers model, random init)
    vision_levels: int = 0  # diffusers models: resolution levels (downsampling 2^(levels-1))


PRESETS: dict[str, TinySpec] = {
    # fast tests: 32 px, 8 px patches → 1 + 16 visual tokens
    "tiny": TinySpec("llama", 64, 2, 4, 32, 8, 32, 2, 2, 32, 1),
    # the same with a GPT-2 LLM: proves nothing is Llama-specific
    "tiny-gpt2": TinySpec("gpt2", 64, 2, 4, 32, 8, 32, 2, 2, 32, 1),
    # the quickstart: 64 px, 8 px patches → 1 + 64 visual tokens
    "tiny-64": TinySpec("llama", 128, 2, 4, 64, 8, 64, 2, 4, 64, 2),
    # the real MAE geometry (224 px, 16 px patches → 197 visual tokens) with small widths
    "tiny-224": TinySpec("llama", 128, 2, 4, 224, 16, 64, 2, 4, 64, 1),
    # discrete codes: a VQGAN (diffusers VQModel) at 32 px, 8× down → 16 codes of a codebook of 64
    "tiny-vq": TinySpec("llama", 64, 2, 4, 32, 0, 32, 0, 0, 0, 0, vision="vqgan-codes", vision_levels=4),
    # a latent VAE (diffusers AutoencoderKL) at 32 px, 4× down, 2×2 tokens → 16 tokens of width 16
    "tiny-sdvae": TinySpec("llama", 64, 2, 4, 32, 0, 32, 0, 0, 0, 0, vision="sd-vae", vision_levels=3),
}


def preset_home() -> Path:
    return Path(os.environ.get("LM4LV_HOME", Path.home() / ".cache" / "lm4lv")) / "presets"


def build_tokenizer(out_dir: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def _build_llm(spec: TinySpec, vocab: int, tok, out_dir: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if spec.llm_family == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=spec.llm_hidden, intermediate_size=spec.llm_hidden * 2,
                          num_hidden_layers=spec.llm_layers, num_attention_heads=spec.llm_heads,
                          num_key_value_heads=spec.llm_heads, max_position_embeddings=2048, **ids)
        model = LlamaForCausalLM(cfg)
    elif spec.llm_family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=spec.llm_hidden, n_layer=spec.llm_layers,
                         n_head=spec.llm_heads, n_positions=2048, **ids)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ConfigError(f"unknown LLM family {spec.llm_family!r}")
    model.save_pretrained(str(out_dir))


def _build_mae(spec: TinySpec, out_dir: Path) -> None:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(image_size=spec.image_size, patch_size=spec.patch_size, hidden_size=spec.mae_hidden,
                       num_hidden_layers=spec.mae_layers, num_attention_heads=spec.mae_heads,
                       intermediate_size=spec.mae_hidden * 4, decoder_hidden_size=spec.dec_hidden,
                       decoder_num_hidden_layers=spec.dec_layers, decoder_num_attention_heads=spec.mae_heads,
                       decoder_intermediate_size=spec.dec_hidden * 4, mask_ratio=0.0, norm_pix_loss=False)
    ViTMAEForPreTraining(cfg).save_pretrained(str(out_dir))


def _diffusers_kwargs(spec: TinySpec) -> dict:
    return dict(in_channels=3, out_channels=3, block_out_channels=(spec.mae_hidden,) * spec.vision_levels,
                down_block_types=("DownEncoderBlock2D",) * spec.vision_levels,
                up_block_types=("UpDecoderBlock2D",) * spec.vision_levels, layers_per_block=1,
                latent_channels=4, norm_num_groups=min(32, spec.mae_hidden), sample_size=spec.image_size)


def _build_vq(spec: TinySpec, out_dir: Path) -> None:
    """A random-init diffusers ``VQModel`` (a codebook of 64 entries of width 4)."""
    from ..util.optional import require

    diffusers = require("diffusers", "diffusers", spec.vision)
    diffusers.VQModel(num_vq_embeddings=64, vq_embed_dim=4, **_diffusers_kwargs(spec)).save_pretrained(str(out_dir))


def _build_vae(spec: TinySpec, out_dir: Path) -> None:
    """A random-init diffusers ``AutoencoderKL`` (4 latent channels)."""
    from ..util.optional import require

    diffusers = require("diffusers", "diffusers", spec.vision)
    diffusers.AutoencoderKL(**_diffusers_kwargs(spec)).save_pretrained(str(out_dir))


# vision family of a preset -> (its folder in the preset, the function that builds it)
VISION_BUILDERS = {"mae": ("mae", _build_mae), "vqgan-codes": ("vision", _build_vq), "sd-vae": ("vision", _build_vae)}


def vision_folder(spec: TinySpec) -> str:
    """The preset's vision model folder name."""
    return VISION_BUILDERS[spec.vision][0]


def build_preset_folders(name: str, out_dir: Path, seed: int = 0) -> None:
    """Write ``out_dir/llm`` (model + tokenizer) and the vision model (``out_dir/mae`` or
    ``out_dir/vision``) for a tiny preset."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars between lm4lv's lines
    spec = _spec(name)
    torch.manual_seed(seed)
    tok = build_tokenizer(out_dir / "llm")
    _build_llm(spec, len(tok), tok, out_dir / "llm")
    folder, build = VISION_BUILDERS[spec.vision]
    build(spec, out_dir / folder)


def _spec(name: str) -> TinySpec:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_dir(name: str) -> Path:
    """The built folders of preset ``name`` (built now if this machine has not built them yet)."""
    _spec(name)
    target = preset_home() / f"{name}-v{PRESET_VERSION}"
    done = target / vision_folder(_spec(name)) / "config.json"
    if done.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_preset_folders(name, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: use its folders
            if not done.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def preset_config(name: str, **overrides) -> ModelConfig:
    """A ``ModelConfig`` pointing at the preset's folders; keyword overrides replace fields."""
    d, spec = preset_dir(name), _spec(name)
    vision = str(d / vision_folder(spec))
    cfg = dict(llm=str(d / "llm"), encoder=ModuleSpec(spec.vision, {"path": vision}),
               decoder=ModuleSpec(spec.vision, {"path": vision}), num_task_tokens=spec.num_task_tokens)
    cfg.update(overrides)
    return ModelConfig(**cfg)


def mae_path(mae: str | None, preset: str | None, record: dict | None = None) -> tuple[str, dict | None]:
    """The MAE folder of ``--mae`` (a folder or a Hugging Face id, fetched when needed) or ``--preset``,
    and the hub record of an id (see :func:`lm4lv_core.sources.hub.local_path`)."""
    from .hub import local_path

    if bool(mae) == bool(preset):
        raise ConfigError("give exactly one of --mae PATH|ID or --preset NAME")
    return local_path(str(preset_dir(preset) / "mae") if preset else str(mae), "--mae", record)
