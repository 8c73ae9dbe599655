"""ldm / taming VQGAN checkpoints → diffusers VQModel, checked against an independent
re-implementation of taming-transformers' VQModel (its module names are the checkpoint's keys)."""

import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lm4lv_core.errors import ConfigError
from lm4lv_core.vision.ldm_checkpoint import (
    is_ldm_vq_folder,
    ldm_to_diffusers_vq,
    ldm_vq_config,
    load_ldm_vqmodel,
    read_ckpt_state_dict,
)

# ---- taming-transformers' modules (taming/modules/diffusionmodules/model.py, vqvae/quantize.py) ----


def Normalize(c):
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


def swish(x):
    return x * torch.sigmoid(x)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = Normalize(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = Normalize(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0)
        self.cin, self.cout = cin, cout

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (self.nin_shortcut(x) if self.cin != self.cout else x) + h


class AttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = Normalize(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1, 1, 0) for _ in range(4))

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        w_ = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w)) * (int(c) ** (-0.5))
        w_ = torch.softmax(w_, dim=2)
        h_ = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(h_)


class Encoder(nn.Module):
    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution, z_channels,
                 double_z=False, **ignore):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        curr_res, in_ch_mult = resolution, (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = (
            ResnetBlock(block_in, block_in), AttnBlock(block_in), ResnetBlock(block_in, block_in))
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i_level in range(self.num_resolutions):
            for i_block in range(self.num_res_blocks):
                h = self.down[i_level].block[i_block](h)
                if len(self.down[i_level].attn) > 0:
                    h = self.down[i_level].attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = self.down[i_level].downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, **ignore):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = (
            ResnetBlock(block_in, block_in), AttnBlock(block_in), ResnetBlock(block_in, block_in))
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(self.num_resolutions)):
            for i_block in range(self.num_res_blocks + 1):
                h = self.up[i_level].block[i_block](h)
                if len(self.up[i_level].attn) > 0:
                    h = self.up[i_level].attn[i_block](h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, n_e, e_dim):
        super().__init__()
        self.e_dim = e_dim
        self.embedding = nn.Embedding(n_e, e_dim)

    def forward(self, z):
        z = z.permute(0, 2, 3, 1).contiguous()
        zf = z.view(-1, self.e_dim)
        e = self.embedding.weight
        d = (zf ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * zf @ e.t()
        idx = d.argmin(1)
        return self.embedding(idx).view(z.shape).permute(0, 3, 1, 2), idx


class TamingVQModel(nn.Module):
    def __init__(self, ddconfig, n_embed, embed_dim):
        super().__init__()
        self.encoder, self.decoder = Encoder(**ddconfig), Decoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x):  # pre-quantisation latents
        return self.quant_conv(self.encoder(x))

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))


# ---- a tiny checkpoint folder in the latent-diffusion layout ----

DDCONFIG = dict(double_z=False, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
                num_res_blocks=2, attn_resolutions=[16], dropout=0.0)
N_EMBED, EMBED_DIM = 64, 4
CONFIG = {"model": {"base_learning_rate": 4.5e-6, "target": "ldm.models.autoencoder.VQModel",
                    "params": {"embed_dim": EMBED_DIM, "n_embed": N_EMBED, "monitor": "val/rec_loss",
                               "ddconfig": DDCONFIG,
                               "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                              "params": {"disc_start": 1, "codebook_weight": 1.0}}}}}
LIGHTNING_MODULES = ("pytorch_lightning", "pytorch_lightning.callbacks",
                     "pytorch_lightning.callbacks.model_checkpoint")


class ModelCheckpoint:
    """Stands in for Lightning's callback; only importable while ``_fake_lightning`` is active."""

    def __init__(self):
        self.monitor, self.best_model_score, self.kth = "val/rec_loss", torch.tensor(0.25), {"a": 1}


ModelCheckpoint.__module__ = LIGHTNING_MODULES[-1]


def _save_with_fake_lightning(obj, path, monkeypatch):
    """``torch.save`` while ``pytorch_lightning.callbacks.model_checkpoint`` exists, then remove it."""
    assert not any(m in sys.modules for m in LIGHTNING_MODULES)
    with monkeypatch.context() as m:
        for name in LIGHTNING_MODULES:
            m.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules[LIGHTNING_MODULES[-1]].ModelCheckpoint = ModelCheckpoint
        torch.save(obj, path)
    assert not any(m in sys.modules for m in LIGHTNING_MODULES)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    ref = TamingVQModel(DDCONFIG, N_EMBED, EMBED_DIM).eval()
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, nn.GroupNorm):  # make norms matter
                mod.weight.copy_(1 + 0.2 * torch.randn_like(mod.weight))
                mod.bias.copy_(0.2 * torch.randn_like(mod.bias))
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        h = ref.encode(x)
        # a codebook near half of the latent vectors, so that many codes are in use
        vecs = h.permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)[torch.randperm(h.numel() // EMBED_DIM)[:N_EMBED]]
        ref.quantize.embedding.weight.copy_(vecs + 0.3 * h.std() * torch.randn_like(vecs))
    return ref, x


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory):
    ref, _ = reference
    root = tmp_path_factory.mktemp("vq-f4")
    sd = dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4, generator=g)
    sd["loss.discriminator.main.2.running_mean"] = torch.zeros(8)
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(8, 3, 3, 3, generator=g)
    ckpt = {"epoch": 3, "global_step": 5, "state_dict": sd,
            "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.25)}, "instance": ModelCheckpoint()}}
    mp = pytest.MonkeyPatch()
    try:
        _save_with_fake_lightning(ckpt, root / "model.ckpt", mp)
    finally:
        mp.undo()
    (root / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    return root


def test_config_block_types():
    cfg = ldm_vq_config(CONFIG)
    assert cfg["block_out_channels"] == (32, 64, 64) and cfg["layers_per_block"] == 2
    assert cfg["down_block_types"] == ("DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D")
    assert cfg["up_block_types"] == ("UpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D")
    assert (cfg["latent_channels"], cfg["vq_embed_dim"], cfg["num_vq_embeddings"]) == (4, 4, 64)
    bad = {"model": {"params": {**CONFIG["model"]["params"], "ddconfig": {**DDCONFIG, "double_z": True}}}}
    with pytest.raises(ConfigError, match="double_z"):
        ldm_vq_config(bad)
    with pytest.raises(ConfigError, match=r"model\.params\.n_embed"):
        ldm_vq_config({"model": {"params": {"ddconfig": DDCONFIG, "embed_dim": 4}}})


def test_matches_taming_reference(reference, folder):
    ref, x = reference
    assert is_ldm_vq_folder(folder) and not is_ldm_vq_folder(folder.parent)
    vq = load_ldm_vqmodel(folder)
    assert not any(m in sys.modules for m in LIGHTNING_MODULES)
    with torch.no_grad():
        h_ref = ref.encode(x)
        q_ref, idx_ref = ref.quantize(h_ref)
        dec_ref, dec_codes_ref = ref.decode(h_ref), ref.decode(q_ref)

        h = vq.encode(x).latents
        _, _, (_, _, idx) = vq.quantize(h)  # diffusers 0.42: codes in the third output, flattened
        b, c, hh, ww = h.shape
        z = vq.quantize.get_codebook_entry(idx, (b, hh, ww, c))
        dec = vq.decode(h, force_not_quantize=True).sample
        dec_codes = vq.decode(z, force_not_quantize=True).sample
    diffs = {"latents": (h - h_ref).abs().max().item(), "decode": (dec - dec_ref).abs().max().item(),
             "decode_codes": (dec_codes - dec_codes_ref).abs().max().item()}
    print("max abs differences:", diffs, "codes in use:", idx.unique().numel())
    assert h.shape == (2, 4, 8, 8)
    assert idx.unique().numel() >= 16  # the codebook is exercised
    assert torch.equal(idx.reshape(-1), idx_ref)
    assert torch.equal(z, q_ref)
    assert all(d < 1e-4 for d in diffs.values()), diffs
    assert dec.abs().max() > 0.1 and (dec - dec_codes).abs().max() > 1e-3  # not vacuous
    assert vq.quantize.embedding.weight.dtype == torch.float32


def test_dtype_keeps_codebook_fp32(folder):
    vq = load_ldm_vqmodel(folder, dtype=torch.bfloat16)
    assert vq.encoder.conv_in.weight.dtype == torch.bfloat16
    assert vq.quantize.embedding.weight.dtype == torch.float32


def test_unmapped_key_is_one_clear_error(reference):
    sd = dict(reference[0].state_dict())
    sd["encoder.down.0.block.0.temb_proj.weight"] = torch.zeros(32, 512)
    sd["loss.discriminator.x"] = torch.zeros(1)  # dropped silently
    with pytest.raises(ConfigError, match=r"1 checkpoint key\(s\).*encoder\.down\.0\.block\.0\.temb_proj\.weight"):
        ldm_to_diffusers_vq(sd)


def test_missing_key_names_the_file(reference, tmp_path):
    sd = dict(reference[0].state_dict())
    del sd["decoder.up.0.block.1.conv2.bias"]
    torch.save({"state_dict": sd}, tmp_path / "model.ckpt")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    with pytest.raises(ConfigError, match=r"model\.ckpt.*1 missing \(decoder\.up_blocks\.2\.resnets\.1\.conv2\.bias\)"):
        load_ldm_vqmodel(tmp_path)
    with pytest.raises(ConfigError, match="config.yaml"):
        load_ldm_vqmodel(tmp_path / "nowhere")


def test_lightning_callback_loads_without_lightning(tmp_path, monkeypatch):
    t = torch.arange(6.0).reshape(2, 3)
    _save_with_fake_lightning({"state_dict": {"w": t}, "callbacks": [ModelCheckpoint()]}, tmp_path / "m.ckpt",
                              monkeypatch)
    sd = read_ckpt_state_dict(tmp_path / "m.ckpt")
    assert list(sd) == ["w"] and torch.equal(sd["w"], t)
    assert not any(m in sys.modules for m in LIGHTNING_MODULES)


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_pickled_code_never_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    evil = (_Evil(os.system, f"touch {marker}") if kind == "os.system"
            else _Evil(exec, f"open({str(marker)!r}, 'w').close()"))
    t = torch.ones(3)
    torch.save({"state_dict": {"w": t}, "hyper_parameters": evil}, tmp_path / "a.ckpt")
    torch.save({"state_dict": {"w": t, "x": evil}}, tmp_path / "b.ckpt")
    assert torch.equal(read_ckpt_state_dict(tmp_path / "a.ckpt")["w"], t)  # the payload became a stub
    with pytest.raises(ConfigError, match=r"b\.ckpt: state_dict entries that are not tensors: 'x'"):
        read_ckpt_state_dict(tmp_path / "b.ckpt")
    assert not marker.exists()


def test_vqgan_families_read_the_checkpoint_folder(reference, folder):
    """``--encoder vqgan-codes:FOLDER`` / ``vqgan:FOLDER`` on a latent-diffusion checkpoint: the
    family's tokens and decodes are the taming model's (pixels in [0, 1] ↔ its [-1, 1])."""
    from lm4lv_core.vision import build_decoder, build_encoder, parse_part, token_space

    ref, x = reference
    pixels = (x + 1) / 2
    with torch.no_grad():
        h_ref = ref.encode(x)
        q_ref, idx_ref = ref.quantize(h_ref)
        for family in ("vqgan", "vqgan-codes"):
            enc = build_encoder(parse_part(f"{family}:{folder}", "encoder"))
            dec = build_decoder(parse_part(f"{family}:{folder}", "decoder"))
            tokens = enc(pixels)
            assert token_space(parse_part(f"{family}:{folder}", "encoder")) == enc.space
            if family == "vqgan":
                assert (tokens - h_ref.flatten(2).transpose(1, 2)).abs().max() < 1e-4
                want = (ref.decode(h_ref) + 1) / 2  # continuous latents, not snapped to the codebook
            else:
                assert torch.equal(tokens.reshape(-1), idx_ref) and enc.space.codebook_size == N_EMBED
                want = (ref.decode(q_ref) + 1) / 2
            assert (dec(tokens, clamp=False) - want).abs().max() < 1e-4
