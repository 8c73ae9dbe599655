"""ZeRO-3 partitions frozen parameters too: what a run saves is gathered in full first."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lm4lv_core.engine.config import TrainConfig
from lm4lv_core.jobs.train import train
from lm4lv_core.sources.presets import preset_config

ONE_STEP = dict(lr_schedule="constant", warmup_ratio=0.0)  # the reference schedule's first step has lr 0


@pytest.fixture
def no_persistence(tmp_path):
    ds = tmp_path / "ds.json"  # without it ZeRO-3 leaves the tiny preset's tensors whole, hiding the bug
    ds.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    return str(ds)


def test_zero3_run_with_frozen_adapters_reloads_and_generates(pairs_file, tmp_path, no_persistence):
    from lm4lv_core.model.generate import restore
    from lm4lv_core.model.lm4lv import LM4LV

    cfg = preset_config("tiny", train_adapter=False, train_deadapter=False)  # --freeze-(de)adapter
    out = tmp_path / "run"
    train(TrainConfig(data=str(pairs_file), out=str(out), micro_batch=2, max_steps=1, zero_stage=3,
                      deepspeed_config=no_persistence, **ONE_STEP), cfg)
    saved = load_file(str(out / "final" / "trainable.safetensors"))
    assert all(v.numel() > 0 for v in saved.values()), {k: tuple(v.shape) for k, v in saved.items()}
    step = load_file(str(out / "checkpoints" / "step-1" / "trainable.safetensors"))
    assert step and all(v.numel() > 0 for v in step.values())
    model = LM4LV.from_pretrained(out / "final")
    torch.manual_seed(0)  # the run's seed: the frozen adapter is the one it was built with
    fresh = LM4LV.from_config(cfg)
    for name in ("adapter.weight", "adapter.bias", "deadapter.weight", "deadapter.bias"):
        assert torch.equal(model.get_parameter(name), fresh.get_parameter(name)), name
    assert not torch.equal(model.task_tokens, fresh.task_tokens)  # and the trained part was trained
    img = Image.open(pairs_file.parent / "lq" / "0.png")
    (restored,) = restore(model, [img])
    assert restored.size == (model.encoder.image_size,) * 2


def test_zero3_ft_mae_writes_the_whole_mae(tmp_path, no_persistence):
    from transformers import ViTMAEForPreTraining

    from lm4lv_core.jobs.ft_mae import finetune
    from lm4lv_core.tasks.mae_decoder import MAEFinetuneConfig
    from lm4lv_core.sources.presets import preset_dir

    images = tmp_path / "images"
    images.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i in range(4):
        arr = (torch.rand(32, 32, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(images / f"{i}.png")
    base = str(preset_dir("tiny") / "mae")
    train_cfg = TrainConfig(data=str(images), out=str(tmp_path / "run"), micro_batch=2, max_steps=1,
                            zero_stage=3, deepspeed_config=no_persistence, **ONE_STEP)
    finetune(train_cfg, MAEFinetuneConfig(mae=base, lpips_weight=0))
    saved = ViTMAEForPreTraining.from_pretrained(tmp_path / "run" / "final")
    start = ViTMAEForPreTraining.from_pretrained(base)
    for (k, a), b in zip(saved.vit.state_dict().items(), start.vit.state_dict().values()):
        assert torch.equal(a, b), k  # the frozen encoder, gathered and unchanged
    assert any(not torch.equal(a, b) for a, b in
               zip(saved.decoder.state_dict().values(), start.decoder.state_dict().values()))
