"""Each vision family's options compute what the reference computes: BEiT normalises with 0.5 / 0.5
(or its checkpoint's preprocessor statistics), CLIP ``local`` / ``global`` / ``keep_cls``, DINOv2
``clear_cls``, MAE ``mask_ratio`` with patch-order noise. Every expected value is computed here
directly with transformers on tiny random models; token counts also come from configs alone."""

from __future__ import annotations

import json

import pytest
import torch

from lm4lv_core.config import ModuleSpec
from lm4lv_core.errors import ConfigError
from lm4lv_core.vision import build_decoder, build_encoder, token_space

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
OPENAI_CLIP = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)  # 4 x 4 = 16 patches


def _norm(x, stats):
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in stats)
    return (x - mean) / std


def _close(got, want, tol=1e-5):
    assert got.shape == want.shape, (got.shape, want.shape)
    assert (got - want).abs().max().item() <= tol


def _encode(spec, x):
    enc = build_encoder(spec).eval()
    with torch.no_grad():
        out = enc(x)
    space = token_space(spec)  # from the config alone (meta device)
    assert (space.num_tokens, space.dim) == tuple(out.shape[1:]) == (enc.num_tokens, enc.dim)
    return out


@pytest.fixture(scope="module")
def x():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ BEiT
@pytest.fixture(scope="module")
def beit(tmp_path_factory):
    from transformers import BeitConfig, BeitForMaskedImageModeling

    d = tmp_path_factory.mktemp("beit") / "beit"
    torch.manual_seed(0)
    BeitForMaskedImageModeling(BeitConfig(vocab_size=32, use_mean_pooling=True, **TINY)).save_pretrained(d)
    return d


def _beit_reference(folder, pixels):
    from transformers import BeitForMaskedImageModeling

    mim = BeitForMaskedImageModeling.from_pretrained(folder).eval()
    with torch.no_grad():
        return mim.layernorm(mim.beit(pixel_values=pixels, output_hidden_states=True).hidden_states[-1])


def test_beit_normalises_with_half_by_default_and_with_its_preprocessor_config(beit, x, tmp_path):
    got = _encode(ModuleSpec("beit", {"path": str(beit)}), x)
    _close(got, _beit_reference(beit, (x - 0.5) / 0.5))
    assert (got - _beit_reference(beit, _norm(x, IMAGENET))).abs().max() > 1e-2  # ImageNet would differ
    # a checkpoint's own statistics win
    import shutil

    own = tmp_path / "beit"
    shutil.copytree(beit, own)
    stats = ([0.1, 0.2, 0.3], [0.7, 0.6, 0.5])
    (own / "preprocessor_config.json").write_text(json.dumps({"image_mean": stats[0], "image_std": stats[1]}))
    _close(_encode(ModuleSpec("beit", {"path": str(own)}), x), _beit_reference(own, _norm(x, stats)))


# ------------------------------------------------------------------------------------------ CLIP
@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A CLIPVisionModelWithProjection folder (projection 24) and a full CLIPModel folder (projection 20)."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=24, **TINY)).save_pretrained(root / "vision")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    CLIPModel(CLIPConfig(text_config=text, vision_config=TINY, projection_dim=20)).save_pretrained(root / "full")
    return root


def test_clip_local_is_the_patch_tokens_without_cls_or_post_layernorm(clip, x):
    from transformers import CLIPVisionModel

    ref = CLIPVisionModel.from_pretrained(clip / "vision").eval()
    with torch.no_grad():
        hidden = ref(pixel_values=_norm(x, OPENAI_CLIP)).last_hidden_state
    assert hidden.shape[1] == 17
    local = _encode(ModuleSpec("clip", {"path": str(clip / "vision")}), x)  # the default
    _close(local, hidden[:, 1:])
    assert local.shape[1] == 16  # (S/P)^2
    _close(_encode(ModuleSpec("clip", {"path": str(clip / "vision"), "feature": "local", "keep_cls": True}), x),
           hidden)


def test_clip_global_is_the_projected_image_embedding(clip, x):
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    ref = CLIPVisionModelWithProjection.from_pretrained(clip / "vision").eval()
    with torch.no_grad():
        want = ref(pixel_values=_norm(x, OPENAI_CLIP)).image_embeds
    got = _encode(ModuleSpec("clip", {"path": str(clip / "vision"), "feature": "global"}), x)
    assert got.shape == (2, 1, 24)
    _close(got[:, 0], want)
    # a full CLIPModel folder: the projection (and its width) from the top-level config
    full = CLIPModel.from_pretrained(clip / "full").eval()
    with torch.no_grad():
        pooled = full.vision_model(pixel_values=_norm(x, OPENAI_CLIP)).pooler_output  # post-layernorm CLS
        want = full.visual_projection(pooled)
    got = _encode(ModuleSpec("clip", {"path": str(clip / "full"), "feature": "global"}), x)
    assert got.shape == (2, 1, 20)
    _close(got[:, 0], want)


def test_clip_options_are_checked(clip, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**TINY)).save_pretrained(tmp_path / "tower")
    with pytest.raises(ConfigError, match="needs the visual projection"):
        build_encoder(ModuleSpec("clip", {"path": str(tmp_path / "tower"), "feature": "global"}))
    with pytest.raises(ConfigError, match="feature must be one of local, global"):
        token_space(ModuleSpec("clip", {"path": str(clip / "vision"), "feature": "pooled"}))
    with pytest.raises(ConfigError, match="layer and keep_cls apply to feature local"):
        token_space(ModuleSpec("clip", {"path": str(clip / "vision"), "feature": "global", "keep_cls": True}))
    with pytest.raises(ConfigError, match="unknown option"):
        token_space(ModuleSpec("siglip", {"path": str(clip / "vision"), "clear_cls": True}))


# ---------------------------------------------------------------------------------------- DINOv2
def test_dinov2_clear_cls_drops_the_cls_token(tmp_path, x):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                             image_size=32, patch_size=8)).save_pretrained(tmp_path / "dino")
    ref = Dinov2Model.from_pretrained(tmp_path / "dino").eval()
    with torch.no_grad():
        hidden = ref(pixel_values=_norm(x, IMAGENET)).last_hidden_state
    _close(_encode(ModuleSpec("dinov2", {"path": str(tmp_path / "dino")}), x), hidden)  # default: CLS kept
    cleared = _encode(ModuleSpec("dinov2", {"path": str(tmp_path / "dino"), "clear_cls": True}), x)
    assert cleared.shape[1] == 16
    _close(cleared, hidden[:, 1:])


# ------------------------------------------------------------------------------------------- MAE
@pytest.fixture(scope="module")
def mae(tmp_path_factory):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    d = tmp_path_factory.mktemp("mae") / "mae"
    torch.manual_seed(0)
    ViTMAEForPreTraining(ViTMAEConfig(decoder_hidden_size=32, decoder_num_hidden_layers=1,
                                      decoder_num_attention_heads=2, decoder_intermediate_size=64,
                                      **TINY)).save_pretrained(d)
    return d


@pytest.mark.parametrize("ratio, kept", [(0.0, 16), (0.5, 8), (0.75, 4)])
def test_mae_mask_ratio_keeps_the_first_patches_as_vitmae_with_arange_noise(mae, x, ratio, kept):
    from transformers import ViTMAEForPreTraining

    ref = ViTMAEForPreTraining.from_pretrained(mae, mask_ratio=ratio).eval()
    noise = torch.arange(16, dtype=torch.float32).expand(2, 16)
    with torch.no_grad():
        out = ref.vit(pixel_values=_norm(x, IMAGENET), noise=noise)
        assert torch.equal(out.mask, (torch.arange(16) >= kept).float().expand(2, 16))  # the first ones kept
        pixels = ref.unpatchify(ref.decoder(out.last_hidden_state, out.ids_restore).logits)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    want_pixels = pixels * std + mean
    kw = {"mask_ratio": ratio} if ratio else {}  # 0 is the default
    spec = ModuleSpec("mae", {"path": str(mae), **kw})
    feats = _encode(spec, x)
    assert feats.shape[1] == 1 + kept
    _close(feats, out.last_hidden_state)
    dec = build_decoder(spec).eval()
    assert dec.num_tokens == 1 + kept
    with torch.no_grad():
        _close(dec(feats, clamp=False), want_pixels)


def test_mae_mask_ratio_out_of_range_is_refused(mae):
    with pytest.raises(ConfigError, match=r"mask_ratio must be in \[0, 1\)"):
        token_space(ModuleSpec("mae", {"path": str(mae), "mask_ratio": 1.0}))


# ------------------------------------------------------------------------------------------- CLI
def test_vision_config_options_reach_the_encoder_through_the_cli(clip, tmp_path, monkeypatch, capsys):
    """``lm4lv train --dry-run --vision-config`` with ``feature: local``: 16 tokens per image for a
    32 px / 8 CLIP, CLS dropped."""
    from conftest import run_cli, write_pairs
    from lm4lv_core.sources.presets import preset_dir

    import json

    data = write_pairs(tmp_path / "data", n=2)
    samples = json.loads(data.read_text())
    for x in samples:  # captions: a model without a decoder answers in text (the real run's check)
        x["image"], x["conversations"][1]["value"] = x["image"][:1], "a picture"
    data.write_text(json.dumps(samples))
    vc = tmp_path / "vision.yaml"
    vc.write_text(f"encoder: {{name: clip, kwargs: {{path: '{clip / 'vision'}', feature: local}}}}\n")
    code, out = run_cli(monkeypatch, capsys, "train", "--data", data, "--out", tmp_path / "run", "--llm",
                        preset_dir("tiny") / "llm", "--vision-config", vc, "--dry-run")
    assert code == 0, out
    assert "vision: encoder clip, 16 tokens per image at 32 px (features of width 32)" in out
    assert not (tmp_path / "run").exists()
