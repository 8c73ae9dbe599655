"""Frozen parts stay frozen in training: no dropout in them, and fp32 image statistics in bf16."""

import torch

from lm4lv_core.config import LoraConfig
from lm4lv_core.data.dataset import LM4LVDataset, collate
from lm4lv_core.data.format import load_checked
from lm4lv_core.model.lm4lv import LM4LV
from lm4lv_core.sources.presets import preset_config


def _batch(model, data_file):
    samples = load_checked(data_file)
    ds = LM4LVDataset(samples, model.builder, model.encoder.image_size)
    return collate([ds[i] for i in range(len(ds))], pad_id=model.tokenizer.pad_token_id)


def _dropouts(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]


def test_frozen_llm_has_no_dropout_in_train_mode(pairs_file):
    torch.manual_seed(0)
    model = LM4LV.from_config(preset_config("tiny-gpt2"))
    assert len(_dropouts(model.llm)) >= 7  # GPT-2's dropouts would fire if the LLM followed train()
    model.train()
    assert model.training and model.adapter.training and not model.llm.training
    batch = _batch(model, pairs_file)
    a, b = model(batch), model(batch)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.vision_pred, b.vision_pred)
    with torch.no_grad():
        ref = model.eval()(batch)
    assert torch.equal(a.loss, ref.loss)  # training computes what inference computes


def test_lora_dropout_follows_the_mode(pairs_file):
    torch.manual_seed(0)
    cfg = preset_config("tiny-gpt2", lora=LoraConfig(enabled=True, r=4, dropout=0.5, target_modules=["c_attn"]))
    model = LM4LV.from_config(cfg)
    with torch.no_grad():  # lora_B starts at zero, which would hide the LoRA branch's dropout
        for n, p in model.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    batch = _batch(model, pairs_file)
    model.train()
    lora_drop = [m for n, m in model.llm.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    assert lora_drop and all(m.training for m in lora_drop)
    frozen_drop = [m for m in _dropouts(model.llm) if m not in lora_drop]
    assert frozen_drop and not any(m.training for m in frozen_drop)
    assert not torch.equal(model(batch).loss, model(batch).loss)  # LoRA dropout is random in training
    model.eval()
    assert torch.equal(model(batch).loss, model(batch).loss)


def test_imagenet_statistics_stay_fp32_in_a_bf16_model(tiny_config):
    from lm4lv_core.vision import build_decoder, build_encoder
    from lm4lv_core.vision.constants import IMAGENET_MEAN, IMAGENET_STD

    enc = build_encoder(tiny_config.encoder).to(torch.bfloat16)
    dec = build_decoder(tiny_config.decoder).to(torch.bfloat16)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    # encoder: the ViT receives the fp32-normalised pixels, rounded to bf16 only once, at the end
    seen = []
    proj = enc.vit.embeddings.patch_embeddings.projection
    handle = proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    pixels = torch.rand(2, 3, enc.image_size, enc.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        enc(pixels)
    handle.remove()
    want = ((pixels - mean) / std).to(torch.bfloat16)
    assert seen[0].dtype == torch.bfloat16 and torch.equal(seen[0], want)
    rounded = (pixels.bfloat16() - mean.bfloat16()) / std.bfloat16()  # what bf16 statistics would give
    assert not torch.equal(rounded, want)
    # decoder: de-normalisation with fp32 statistics (logits 0 → the mean, 1 → mean + std, exactly)
    feats = torch.randn(1, dec.num_tokens, dec.dim, dtype=torch.bfloat16)
    for value, expect in ((0.0, mean), (1.0, mean + std)):
        def fill(m, args, out, value=value):
            out.logits = torch.full_like(out.logits, value)
            return out

        handle = dec.decoder.register_forward_hook(fill)
        with torch.no_grad():
            img = dec(feats, clamp=False)
        handle.remove()
        assert img.dtype == torch.float32
        assert torch.equal(img, expect.expand_as(img)), (img[0, :, 0, 0], expect.flatten())
