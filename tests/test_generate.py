"""Generation: KV-cached == naive, batched == batch-1, text sampling, images improve with training."""

from __future__ import annotations

import pytest
import torch

from lm4lv_core.data.dataset import LM4LVDataset, collate, image_to_tensor, tensor_to_uint8
from lm4lv_core.data.format import load_checked, parse_sample
from lm4lv_core.data.sequence import IMG_START
from lm4lv_core.errors import ConfigError
from lm4lv_core.model.generate import (GenerationConfig, build_items, filter_logits, generate_samples,
                                 naive_generate_images, restore)
from lm4lv_core.image.io import load_rgb
from lm4lv_core.model.lm4lv import LM4LV
from lm4lv_core.sources.presets import preset_config

PROMPTS = [  # prompt lengths differ a lot: the batch is left-padded
    "<image> <task>",
    "Restore the image <image> <task> please: remove the noise, the blur and the rain from the photo",
    "<task> <image>",
    "a cat <image> <task>",
    "<image> <task> the quick brown fox jumps over the lazy dog 0123456789",
    "Restore <image> <task>",
    "<image>\n<task>",
    "olive oil <task> <image> is a healthy ingredient",
]


@pytest.fixture(scope="module")
def models():
    out = {}
    for name in ("tiny", "tiny-gpt2"):
        torch.manual_seed(0)
        out[name] = LM4LV.from_config(preset_config(name)).eval()
    return out


def _samples(image_paths, prompts, answer=""):
    return [parse_sample({"image": [str(image_paths[i % len(image_paths)])],
                          "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": answer}]},
                         i) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def lq_images(tmp_path_factory):
    from conftest import write_pairs

    root = tmp_path_factory.mktemp("gen")
    write_pairs(root, n=4)
    return sorted((root / "lq").glob("*.png"))


def _one(model, sample, mode="image"):
    items, _ = build_items(model, [sample], mode)
    return collate(items, pad_id=model.builder.pad_id, padding_side="left")


def test_cached_equals_naive(models, lq_images):
    model = models["tiny"]
    for s in _samples(lq_images, PROMPTS[:2]):
        cached = generate_samples(model, [s], GenerationConfig(mode="image"), batch_size=1)[0]
        naive = naive_generate_images(model, _one(model, s))
        assert naive.shape == (model.num_visual_tokens, model.encoder.dim)
        assert len(cached.features) == 1 and cached.text == "<image>"
        assert (cached.features[0] - naive).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_batch8_equals_batch1_with_mixed_prompt_lengths(models, lq_images, name):
    model = models[name]
    samples = _samples(lq_images, PROMPTS)
    items, _ = build_items(model, samples, "image")
    assert len({len(it.encoded) for it in items}) >= 6  # really mixed lengths
    cfg = GenerationConfig(mode="image")
    batched = generate_samples(model, samples, cfg, batch_size=8)
    for s, b in zip(samples, batched):
        single = generate_samples(model, [s], cfg, batch_size=1)[0]
        assert (b.features[0] - single.features[0]).abs().max().item() <= 1e-4, s.index
        assert (b.images[0] - single.images[0]).abs().max().item() <= 1e-4, s.index
        assert b.images[0].shape == (3, model.encoder.image_size, model.encoder.image_size)


def test_mixed_modes_in_one_batch_and_sampling_is_per_sample(models, lq_images):
    """Captioning-style samples (no <task>) write text; restoration ones give an image; sampled
    text of a sample does not depend on its batch, and the seed changes it."""
    model = models["tiny"]
    samples = _samples(lq_images, ["<image>\n", "<image> <task>", "Describe <image> in detail", "<task> <image>"])
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.95, seed=3)
    outs = generate_samples(model, samples, cfg, batch_size=4)
    for i in (0, 2):
        assert not outs[i].features and outs[i].text and 1 <= len(outs[i].token_ids) <= 12
    for i in (1, 3):
        assert len(outs[i].images) == 1 and outs[i].text == "<image>"
    for s, o in zip(samples, outs):
        single = generate_samples(model, [s], cfg, batch_size=1)[0]
        assert single.token_ids == o.token_ids
    other = generate_samples(model, samples[:1], GenerationConfig(max_new_tokens=12, temperature=1.0, seed=4))
    assert other[0].token_ids != outs[0].token_ids
    greedy = generate_samples(model, samples[:1], GenerationConfig(max_new_tokens=12))
    again = generate_samples(model, samples[:1], GenerationConfig(max_new_tokens=12))
    assert greedy[0].token_ids == again[0].token_ids and len(greedy[0].token_ids) >= 1


class _ScriptedHead(torch.nn.Module):
    """An LM head that writes ``script`` token by token (then EOS), whatever the hidden state."""

    def __init__(self, script, vocab, eos):
        super().__init__()
        self.script, self.vocab, self.eos, self.calls = list(script), vocab, eos, 0

    def forward(self, h):
        t = self.script[self.calls] if self.calls < len(self.script) else self.eos
        self.calls += 1
        logits = torch.zeros(h.shape[0], self.vocab)
        logits[:, t] = 1.0
        return logits


def test_text_then_image_then_text(models, lq_images, monkeypatch):
    """In text mode, emitting <Img> starts N visual tokens (equal to the reference algorithm on
    the same context), </Img> is forced after them and text resumes until EOS."""
    from lm4lv_core.data.dataset import Item
    from lm4lv_core.data.sequence import SLOT_TEXT, Encoded

    model = models["tiny"]
    b = model.builder
    prefix = "a cat"
    script = b.text_ids(prefix) + b.text_ids(IMG_START) + b.text_ids(" the")
    head = _ScriptedHead(script, len(model.tokenizer), b.eos_id)
    monkeypatch.setattr(model, "lm_head", lambda: head)
    s = _samples(lq_images, ["Describe <image>"])[0]
    out = generate_samples(model, [s], GenerationConfig(mode="text", max_new_tokens=20))[0]
    assert out.text == f"{prefix}<image> the"
    assert out.token_ids[-1] == b.eos_id and len(out.features) == 1 and len(out.images) == 1
    # the reference algorithm on the prompt + "a cat<Img>" (the same ids) gives the same visual tokens
    items, flags = build_items(model, [s], "text")
    e, extra = items[0].encoded, torch.tensor(b.text_ids(prefix) + b.text_ids(IMG_START))
    n = len(extra)
    grown = Encoded(torch.cat([e.input_ids, extra]), torch.cat([e.labels, torch.full((n,), -100)]),
                    torch.cat([e.slot_type, torch.full((n,), SLOT_TEXT)]), torch.cat([e.slot_image, torch.full((n,), -1)]),
                    torch.cat([e.slot_pos, torch.zeros(n, dtype=torch.long)]), e.image_is_target, e.text)
    batch = collate([Item(s, grown, items[0].pixels)], pad_id=b.pad_id, padding_side="left")
    naive = naive_generate_images(model, batch)
    assert flags == [False] and (out.features[0] - naive).abs().max().item() <= 1e-4


@pytest.mark.parametrize("split", [False, True])
def test_default_template_text_stops_at_separator(models, lq_images, monkeypatch, split):
    """The default template's answers end with a trained "\n###": generation stops there (the
    separator is not part of the answer), whether "###" comes as one token or one "#" at a time;
    other templates go on to EOS."""
    from lm4lv_core.data.sequence import SequenceBuilder

    model = models["tiny"]
    b = model.builder
    hashes = [b.text_ids("#")[0]] * 3 if split else b.text_ids("###")
    assert len(hashes) == (3 if split else 1)
    script = b.text_ids("a cat\n") + hashes + b.text_ids(" more")
    s = _samples(lq_images, ["Describe <image>"])[0]
    head = _ScriptedHead(script, len(model.tokenizer), b.eos_id)
    monkeypatch.setattr(model, "lm_head", lambda: head)
    out = generate_samples(model, [s], GenerationConfig(mode="text", max_new_tokens=30))[0]
    assert out.text == "a cat" and out.token_ids == script[:len(script) - len(b.text_ids(" more"))]
    monkeypatch.setattr(model, "builder", SequenceBuilder(model.tokenizer, template="vicuna_v1.1",
                                                          num_task_tokens=b.num_task_tokens,
                                                          num_visual_tokens=b.num_visual_tokens))
    head2 = _ScriptedHead(script, len(model.tokenizer), b.eos_id)
    monkeypatch.setattr(model, "lm_head", lambda: head2)
    out = generate_samples(model, [s], GenerationConfig(mode="text", max_new_tokens=30))[0]
    assert out.text == "a cat\n### more" and out.token_ids == script + [b.eos_id]


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 1.0, 2, 1.0)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 1.0, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 1.0, 0, 0.4)).tolist() == [[False, True, True, True]]
    with pytest.raises(ConfigError, match="--top-p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ConfigError, match="--mode"):
        GenerationConfig(mode="video")


def test_restore_api_returns_pil_images(models, lq_images):
    from PIL import Image

    model = models["tiny"]
    imgs = [load_rgb(p) for p in lq_images[:3]]
    out = restore(model, imgs, batch_size=2, prompt="<image> <task>")
    assert [o.size for o in out] == [(32, 32)] * 3 and all(isinstance(o, Image.Image) for o in out)
    with pytest.raises(ConfigError, match="exactly one <image>"):
        restore(model, imgs, prompt="<task>")


def test_training_to_overfit_two_pairs_improves_psnr(pairs_file):
    """The MAE decoder is first fitted to reconstruct the two clean images from their encoder
    features (as ``ft-mae`` does); training the adapters and task tokens on the two pairs then
    makes generated images measurably closer to their targets than before training: every
    sample's generated features (free-running, one visual token at a time) and the images on
    average. (Per image, pixel PSNR of a 2-layer random LLM's free-running generation is too noisy
    to demand a gain for each.)"""
    from lm4lv_core.image.metrics import psnr

    torch.manual_seed(0)
    model = LM4LV.from_config(preset_config("tiny"))
    train = load_checked(pairs_file)[:2]
    size = model.encoder.image_size
    hq = torch.stack([image_to_tensor(load_rgb(s.images[1]), size) for s in train])
    dec = list(model.decoder.parameters())
    for p in dec:
        p.requires_grad_(True)
    opt = torch.optim.Adam(dec, lr=1e-3)
    with torch.no_grad():
        fh = model.encode_images(hq)
    for _ in range(200):
        loss = (model.decoder(fh, clamp=False) - hq).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in dec:
        p.requires_grad_(False)

    prompts = [parse_sample({"image": [s.images[0]], "conversations": [
        {"from": "human", "value": "<image> <task>"}, {"from": "gpt", "value": ""}]}, s.index) for s in train]
    targets = [tensor_to_uint8(x) for x in hq]

    def score():
        model.eval()
        outs = generate_samples(model, prompts, GenerationConfig())
        model.train()
        mse = [float(((o.features[0].float() - f.float()) ** 2).mean()) for o, f in zip(outs, fh)]
        return [psnr(t, tensor_to_uint8(o.images[0]), crop_border=0) for t, o in zip(targets, outs)], mse

    before, mse_before = score()
    ds = LM4LVDataset(train, model.builder, size)
    batch = collate([ds[i] for i in range(len(ds))], pad_id=model.builder.pad_id)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(150):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after, mse_after = score()
    assert all(a < 0.9 * b for a, b in zip(mse_after, mse_before)), (mse_before, mse_after)
    assert sum(after) / 2 >= sum(before) / 2 + 1.0, (before, after)
