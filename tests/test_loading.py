"""Frozen parts read in the run's compute dtype, float32 trainable masters on every engine, and
the attention implementation option."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lm4lv_core.engine.config import TrainConfig
from lm4lv_core.engine.loop import Trainer
from lm4lv_core.jobs.train import train
from lm4lv_core.errors import ConfigError
from lm4lv_core.model.lm4lv import LM4LV

BF16 = torch.bfloat16


def test_from_config_reads_frozen_weights_in_the_compute_dtype(tiny_config, monkeypatch):
    import transformers

    asked = []
    for cls in (transformers.AutoModelForCausalLM, transformers.ViTMAEForPreTraining):
        orig = cls.from_pretrained.__func__

        def spy(klass, *a, _orig=orig, **kw):
            asked.append((klass.__name__, kw.get("dtype")))
            return _orig(klass, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    cfg = dataclasses.replace(tiny_config, train_decoder=True)
    model = LM4LV.from_config(cfg, BF16, trainable_dtype=torch.float32)
    # LLM and frozen encoder read in bf16; the trained decoder in float32 (exact master weights)
    assert asked == [("AutoModelForCausalLM", BF16), ("ViTMAEForPreTraining", BF16),
                     ("ViTMAEForPreTraining", torch.float32)]
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else BF16), name
    assert model.llm.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers are not cast


def test_from_pretrained_in_bf16(tiny_config, tmp_path):
    LM4LV.from_config(tiny_config).save_pretrained(tmp_path / "m")
    model = LM4LV.from_pretrained(tmp_path / "m", dtype=BF16)
    assert {p.dtype for p in model.parameters()} == {BF16}
    assert LM4LV.from_pretrained(tmp_path / "m").adapter.weight.dtype == torch.float32


def _masters(trainer) -> dict[str, torch.Tensor]:
    """The float32 values the optimizer updates, by parameter name."""
    be = trainer.backend
    named = [(n, p) for n, p in be.module.named_parameters() if p.requires_grad]
    if be.name == "accelerate":
        return {n: p.detach().clone() for n, p in named}
    from deepspeed.utils import safe_get_full_fp32_param

    opt = be.optimizer
    if hasattr(opt, "fp32_groups") and not hasattr(named[0][1], "_hp_mapping"):  # ZeRO 0
        hp = {id(lp): h for lg, hg in zip(opt.fp16_groups, opt.fp32_groups) for lp, h in zip(lg, hg)}
        return {n: hp[id(p)].detach().clone() for n, p in named}
    return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in named}


@pytest.mark.parametrize("engine,stage", [("accelerate", 0), ("deepspeed", 0), ("deepspeed", 2), ("deepspeed", 3)])
def test_bf16_run_frozen_bf16_and_exact_float32_masters(engine, stage, tiny_config, pairs_file, tmp_path,
                                                        monkeypatch):
    cfg = dataclasses.replace(tiny_config, train_decoder=True)
    torch.manual_seed(0)  # the trainer seeds the same way before building: same initial trainables
    built = LM4LV.from_config(cfg, BF16, trainable_dtype=torch.float32)
    reference = {n: p.detach().clone() for n, p in built.named_parameters() if p.requires_grad}
    seen = {}
    setup = Trainer.setup

    def spy(self):
        setup(self)
        module = self.backend.module
        seen["frozen"] = {p.dtype for p in module.parameters() if not p.requires_grad}
        seen["trainable"] = {p.dtype for p in module.parameters() if p.requires_grad}
        seen["masters"] = _masters(self)

    monkeypatch.setattr(Trainer, "setup", spy)
    summary = train(TrainConfig(data=str(pairs_file), out=str(tmp_path / "run"), engine=engine, zero_stage=stage,
                                precision="bf16", micro_batch=2, max_steps=1, preview_every=10), cfg)
    assert summary["finished"]
    assert seen["frozen"] == {BF16}
    # accelerate keeps the float32 trainables in the module (autocast computes in bf16);
    # DeepSpeed keeps bf16 module copies and float32 masters in its optimizer
    assert seen["trainable"] == ({torch.float32} if engine == "accelerate" else {BF16})
    masters = seen["masters"]
    assert masters.keys() == reference.keys() and any(k.startswith("decoder.") for k in masters)
    for k, v in masters.items():
        assert v.dtype == torch.float32 and torch.equal(v.view_as(reference[k]), reference[k]), k


def test_attn_implementation_is_passed_and_checked(tiny_config):
    model = LM4LV.from_config(dataclasses.replace(tiny_config, attn_implementation="eager"))
    assert model.llm.config._attn_implementation == "eager"
    assert LM4LV.from_config(tiny_config).llm.config._attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match="attn-implementation must be one of"):
        dataclasses.replace(tiny_config, attn_implementation="flash")
    with pytest.raises(ConfigError, match="flash_attention_2 needs (the flash-attn package|a CUDA GPU)"):
        LM4LV.from_config(dataclasses.replace(tiny_config, attn_implementation="flash_attention_2"))


def test_cli_flash_attention_error_is_one_line(pairs_file, tmp_path, monkeypatch, capsys):
    import sys

    from lm4lv_cli.app import main

    monkeypatch.setattr(sys, "argv", ["lm4lv", "train", "--preset", "tiny", "--data", str(pairs_file), "--out",
                                      str(tmp_path / "run"), "--attn-implementation", "flash_attention_2"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: --attn-implementation flash_attention_2 needs")
    assert not (tmp_path / "run").exists()


def test_ft_mae_bf16_keeps_the_frozen_encoder_exact_and_recon_reads_bf16(tmp_path):
    from PIL import Image
    from safetensors.torch import load_file

    from conftest import _skimage_rgb
    from lm4lv_core.jobs.ft_mae import finetune
    from lm4lv_core.tasks.mae_decoder import MAEFinetuneConfig
    from lm4lv_core.vision.mae import MAEAutoencoder
    from lm4lv_core.sources.presets import preset_dir

    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(_skimage_rgb(name, 32)).save(images / f"{name}.png")
    mae = preset_dir("tiny") / "mae"
    finetune(TrainConfig(data=str(images), out=str(tmp_path / "run"), precision="bf16", micro_batch=2, max_steps=2,
                         preview_every=10, lr=1e-2, gradient_checkpointing=True,
                         lr_schedule="constant"),
             MAEFinetuneConfig(mae=str(mae), lpips_weight=0.0))
    before, after = load_file(str(mae / "model.safetensors")), load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert before.keys() == after.keys() and {v.dtype for v in after.values()} == {torch.float32}
    for k in before:  # the frozen encoder is written exactly as read, not rounded through bf16
        assert torch.equal(before[k], after[k]) == (not k.startswith("decoder.") or "mask_token" in k), k
    model = MAEAutoencoder(str(mae), dtype=BF16, train=False)  # recon-mae --precision bf16
    assert {p.dtype for p in model.parameters()} == {BF16}
