"""Vision families through the whole model: each trains (finite loss, adapter gradient), generates
with the KV cache exactly as the no-cache reference algorithm, and saves / reloads; codes stay in
their codebook; understanding encoders answer in text and refuse image answers."""

from __future__ import annotations

import json

import pytest
import torch

from lm4lv_core.config import ModuleSpec
from lm4lv_core.data.dataset import collate
from lm4lv_core.data.format import parse_sample
from lm4lv_core.errors import ConfigError
from lm4lv_core.model.generate import GenerationConfig, build_items, generate_samples, naive_generate_images
from lm4lv_core.model.lm4lv import LM4LV
from lm4lv_core.sources.presets import preset_config, preset_dir
from lm4lv_core.vision import CODES, FEATURES, complete_config


def _vq_continuous(tmp):
    d = str(preset_dir("tiny-vq") / "vision")
    return preset_config("tiny-vq", encoder=ModuleSpec("vqgan", {"path": d}), decoder=ModuleSpec("vqgan", {"path": d}))


def _beit_dvae(tmp):
    """A tiny BEiT (visual vocabulary 32) and a tiny DALL-E dVAE decoder of the same vocabulary."""
    from transformers import BeitConfig, BeitForMaskedImageModeling

    from lm4lv_core.vision.dalle_dvae import DalleDecoder, save_dalle_decoder

    if not (tmp / "beit").is_dir():
        torch.manual_seed(0)
        BeitForMaskedImageModeling(BeitConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=64, image_size=32, patch_size=8,
                                              use_mean_pooling=True)).save_pretrained(tmp / "beit")
        save_dalle_decoder(DalleDecoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=32), tmp / "dvae")
    return preset_config("tiny", encoder=ModuleSpec("beit", {"path": str(tmp / "beit")}),
                         decoder=ModuleSpec("beit-dvae", {"path": str(tmp / "beit"), "dvae": str(tmp / "dvae")}))


FAMILIES = {  # name → (config builder taking a scratch folder, token kind); a new family is one line
    "mae": (lambda tmp: preset_config("tiny"), FEATURES),
    "vqgan": (_vq_continuous, FEATURES),
    "vqgan-codes": (lambda tmp: preset_config("tiny-vq"), CODES),
    "sd-vae": (lambda tmp: preset_config("tiny-sdvae"), FEATURES),
    "beit+dvae": (_beit_dvae, FEATURES),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from conftest import write_pairs

    root = tmp_path_factory.mktemp("fam")
    data = write_pairs(root, n=2)
    return root, json.loads(data.read_text())


def _train_batch(model, root, raw):
    from lm4lv_core.data.dataset import LM4LVDataset

    samples = [parse_sample({**s, "image": [str(root / p) for p in s["image"]]}, i, source="t")
               for i, s in enumerate(raw)]
    ds = LM4LVDataset(samples, model.builder, model.encoder.image_size)
    return collate([ds[i] for i in range(len(ds))], pad_id=model.builder.pad_id)


def _gen_samples(root, prompts):
    return [parse_sample({"image": [str(root / "lq" / f"{i % 2}.png")],
                          "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": ""}]}, i)
            for i, p in enumerate(prompts)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_generates_and_round_trips(family, pairs, tmp_path):
    build, kind = FAMILIES[family]
    cfg = build(pairs[0])
    torch.manual_seed(0)
    model = LM4LV.from_config(cfg)
    assert model.space.kind == kind
    # the family's defaults, recorded in the model's resolved config (the caller's is left as it was)
    assert model.config.vision_loss == ("code_ce" if kind == CODES else "feature_mse")
    assert model.config.adapter.name == ("embedding" if kind == CODES else "linear")
    root, raw = pairs
    # train 2 steps: finite loss, the adapters get gradients, the loss moves
    model.train()
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    batch = _train_batch(model, root, raw)
    losses = []
    for _ in range(2):
        out = model(batch)
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        grads = [p.grad for p in model.adapter.parameters()]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
        opt.step()
        losses.append(float(out.vision_loss))
    assert losses[1] != losses[0]
    if kind == CODES:
        feats = model.encode_images(batch.pixels)
        assert feats.dtype == torch.long and 0 <= int(feats.min()) and int(feats.max()) < model.space.codebook_size
    # cached batched generation == the no-cache reference algorithm, per sample
    model.eval()
    samples = _gen_samples(root, ["<image> <task>", "Restore the image <image> <task> please, remove the noise"])
    cfg_gen = GenerationConfig(mode="image")
    outs = generate_samples(model, samples, cfg_gen, batch_size=2)
    for s, o in zip(samples, outs):
        items, _ = build_items(model, [s], "image")
        ref = naive_generate_images(model, collate(items, pad_id=model.builder.pad_id, padding_side="left"))
        got = o.features[0]
        if kind == CODES:
            assert got.dtype == torch.long and torch.equal(got, ref)
            assert 0 <= int(got.min()) and int(got.max()) < model.space.codebook_size
        else:
            assert (got - ref).abs().max().item() <= 1e-4
        assert o.images[0].shape == (3, model.decoder.image_size, model.decoder.image_size)
    # save / load round trip: same trainables, same generation
    model.save_pretrained(tmp_path / "m")
    back = LM4LV.from_pretrained(tmp_path / "m").eval()
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    again = generate_samples(back, samples[:1], cfg_gen, batch_size=1)[0]
    assert torch.equal(again.features[0], outs[0].features[0]) if kind == CODES else \
        (again.features[0] - outs[0].features[0]).abs().max().item() <= 1e-5


def test_sampled_codes_follow_temperature_and_top_k(pairs):
    torch.manual_seed(0)
    model = LM4LV.from_config(preset_config("tiny-vq")).eval()
    root, _ = pairs
    s = _gen_samples(root, ["<image> <task>"])
    top1 = generate_samples(model, s, GenerationConfig(mode="image", temperature=1.0, top_k=1))[0].features[0]
    greedy = generate_samples(model, s, GenerationConfig(mode="image"))[0].features[0]
    assert torch.equal(top1, greedy)  # top-k 1 is argmax whatever the temperature
    hot = [generate_samples(model, s, GenerationConfig(mode="image", temperature=5.0, seed=k))[0].features[0]
           for k in range(2)]
    assert not torch.equal(hot[0], hot[1])  # sampling draws different codes under different seeds
    assert all(0 <= int(h.min()) and int(h.max()) < 64 for h in hot)


def test_loss_and_adapter_must_fit_the_token_kind():
    cfg = preset_config("tiny-vq", vision_loss="feature_mse")
    with pytest.raises(ConfigError, match="feature_mse compares features but encoder vqgan-codes gives codes"):
        complete_config(cfg)
    cfg = preset_config("tiny", adapter=ModuleSpec("embedding"))
    with pytest.raises(ConfigError, match="does not take features"):
        complete_config(cfg)


def test_understanding_encoder_answers_in_text_and_refuses_image_answers(tmp_path, pairs):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(tmp_path / "clip")
    cfg = preset_config("tiny", encoder=ModuleSpec("clip", {"path": str(tmp_path / "clip")}), decoder=None)
    torch.manual_seed(0)
    model = LM4LV.from_config(cfg).eval()
    assert model.decoder is None and model.num_visual_tokens == 16  # local: the 4x4 patch tokens, CLS dropped
    root, _ = pairs
    caption = _gen_samples(root, ["Describe <image>"])
    out = generate_samples(model, caption, GenerationConfig(mode="text", max_new_tokens=4))[0]
    assert out.images == [] and len(out.token_ids) >= 1
    with pytest.raises(ConfigError, match="no vision decoder"):
        generate_samples(model, _gen_samples(root, ["<image> <task>"]), GenerationConfig(mode="image"))


def test_beit_dvae_decoder_paints_the_mim_heads_codes(pairs):
    """beit encoder → beit-dvae decoder == BEiT's own MIM prediction → argmax → the dVAE decoder."""
    from transformers import BeitForMaskedImageModeling

    from lm4lv_core.vision import build_decoder, build_encoder
    from lm4lv_core.vision.dalle_dvae import load_dalle_decoder

    cfg = _beit_dvae(pairs[0])
    enc, dec = build_encoder(cfg.encoder), build_decoder(cfg.decoder)
    x = torch.rand(2, 3, 32, 32)
    mim = BeitForMaskedImageModeling.from_pretrained(cfg.encoder.kwargs["path"]).eval()
    with torch.no_grad():  # BEiT's own statistics: 0.5 / 0.5
        codes = mim(pixel_values=(x - 0.5) / 0.5).logits.argmax(-1).view(2, 4, 4)
        want = load_dalle_decoder(cfg.decoder.kwargs["dvae"]).decode_codes(codes)
        got = dec(enc(x))
    assert got.shape == (2, 3, 32, 32)
    assert (got - want).abs().max().item() <= 1e-5
    with pytest.raises(ConfigError, match="passes no gradient"):
        complete_config(_beit_dvae(pairs[0]).__class__(**{**vars(cfg), "vision_loss": "pixel_l1"}))


def test_recon_command_scores_any_family_with_a_decoder(tmp_path):
    """``lm4lv recon`` through the installed script: a latent-VAE preset reconstructs a folder;
    an encoder without a decoder is one error line."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i, name in enumerate(("astronaut", "coffee")):
        import skimage.data

        Image.fromarray(getattr(skimage.data, name)()).resize((40, 30)).save(tmp_path / "imgs" / ("sub" if i else "") / f"{name}.png")
    lm4lv = str(Path(sys.executable).parent / "lm4lv")
    ok = subprocess.run([lm4lv, "recon", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--preset", "tiny-sdvae"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    rec = json.loads((tmp_path / "out" / "recon.json").read_text())
    assert rec["count"] == 2 and {r["name"] for r in rec["images"]} == {"astronaut.png", "sub/coffee.png"}
    assert Image.open(tmp_path / "out" / "sub" / "coffee.png").size == (32, 32)
    bad = subprocess.run([lm4lv, "recon", str(tmp_path / "imgs"), "--out", str(tmp_path / "out2"), "--encoder",
                          "clip:openai/clip-vit-base-patch32"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --encoder clip has no decoder to reconstruct with; give --decoder FAMILY:SOURCE"]


def test_truncated_tokens_first_or_strided(pairs):
    """``--num-visual-tokens N`` keeps a leading run (``first``) or N tokens spread evenly over all
    (``strided``, first and last kept); such a model trains and answers in text, and refuses to paint."""
    root, raw = pairs
    torch.manual_seed(0)
    full = LM4LV.from_config(preset_config("tiny")).eval()  # 17 tokens
    x = _train_batch(full, root, raw).pixels
    with torch.no_grad():
        all_tokens = full.encode_images(x)
    for select, idx in (("first", [0, 1, 2, 3, 4]), ("strided", [0, 4, 8, 12, 16])):
        torch.manual_seed(0)
        model = LM4LV.from_config(preset_config("tiny", num_visual_tokens=5, token_select=select))
        assert model.num_visual_tokens == 5 and model.space.of == 17
        with torch.no_grad():
            assert torch.equal(model.encode_images(x), all_tokens[:, idx])
        out = model.train()(_train_batch(model, root, raw))
        assert torch.isfinite(out.loss) and out.vision_pred.shape[1] == 5
    with pytest.raises(ConfigError, match="keeps 5 of the 17 tokens of encoder mae, and a truncated model cannot paint"):
        generate_samples(model.eval(), _gen_samples(root, ["<image> <task>"]), GenerationConfig(mode="image"))
    with pytest.raises(ConfigError, match="--token-select"):
        preset_config("tiny", token_select="random")
