"""DALL-E dVAE decoder: OpenAI's pickled module read safely, outputs of the original package matched.

The fixtures in ``data/dalle_tiny`` were made with the original ``dall-e`` package by
``data/dalle_tiny/make_fixture.py``; these tests never import it.
"""

import json
import os
import pickle
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.serialization import SourceChangeWarning

from conftest import REFERENCE
from lm4lv_core.errors import ConfigError
from lm4lv_core.vision.dalle_dvae import (DalleDecoder, convert, load_dalle_decoder, save_dalle_decoder,
                                          unmap_pixels)

FIXTURE = REFERENCE / "dalle_tiny"
TINY = dict(group_count=4, n_init=8, n_hid=4, n_blk_per_group=2, output_channels=3, vocab_size=32)


@pytest.fixture
def no_dall_e(monkeypatch):
    """``import dall_e`` fails while the test runs, whether or not the package is installed."""
    for name in ("dall_e", "dall_e.decoder", "dall_e.utils", "dall_e.encoder"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture(scope="module")
def expected():
    return load_file(str(FIXTURE / "expected.safetensors"))


@pytest.mark.parametrize("name", ["decoder.pkl", "decoder_legacy.pkl"])  # torch's zip and pre-1.6 formats
def test_reads_openai_pickle_and_matches_the_original_package(no_dall_e, expected, name, recwarn):
    model = load_dalle_decoder(FIXTURE / name)
    assert model.config == TINY
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.blocks.group_1.block_1.post_gain == 1 / 8 ** 2
    assert isinstance(model.blocks.group_1.block_2.id_path, torch.nn.Identity)
    codes, logits, pixels = expected["codes"], expected["logits"], expected["pixels"]
    assert ((pixels == 0).any() and (pixels == 1).any()), "the fixture exercises unmap_pixels' clamp"
    with torch.no_grad():
        out = model(model.one_hot(codes))
        decoded = model.decode_codes(codes)
    assert out.shape == logits.shape == (2, 6, 32, 24)
    assert (out - logits).abs().max().item() <= 1e-5  # measured: 0 (bit-identical on CPU)
    assert decoded.shape == pixels.shape and decoded.dtype == torch.float32
    assert (decoded - pixels).abs().max().item() <= 1e-5  # measured: 0
    torch.testing.assert_close(decoded, unmap_pixels(torch.sigmoid(out[:, :3])), rtol=0, atol=1e-6)
    assert sys.modules["dall_e"] is None
    assert not [w for w in recwarn.list if issubclass(w.category, SourceChangeWarning)]  # legacy format: source checks


def test_default_architecture_has_openai_parameter_names_and_shapes():
    shapes = json.loads((FIXTURE / "default_shapes.json").read_text())  # from the original package
    with torch.device("meta"):
        model = DalleDecoder()
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == list(shapes.items())
    assert model.upscale == 8 and model.blocks.group_4.block_2.post_gain == 1 / 64
    assert sum(p.numel() for p in model.parameters()) == 43_829_766


def test_safetensors_conversion_round_trips(no_dall_e, tmp_path, expected):
    pkl = FIXTURE / "decoder.pkl"
    out = convert(pkl, tmp_path / "dvae")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == {"model_type": "dalle-dvae-decoder", **TINY}
    original = load_dalle_decoder(pkl).state_dict()
    for source in (out, out / "model.safetensors"):
        model = load_dalle_decoder(source)
        assert model.config == TINY and not any(p.requires_grad for p in model.parameters())
        state = model.state_dict()
        assert list(state) == list(original) and all(torch.equal(state[k], original[k]) for k in original)
        with torch.no_grad():
            # (the same weights: the same decode, to float rounding of this CPU's kernels)
            assert (model.decode_codes(expected["codes"]) - expected["pixels"]).abs().max().item() <= 1e-5


class _Shell:
    """Unpickling it runs a shell command (plain ``pickle.load`` would)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Eval:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return eval, (f"__import__('os').system({self.command!r})",)


@pytest.mark.parametrize("payload", [_Shell, _Eval])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump", "inside a module"])
def test_malicious_pickle_does_not_run(tmp_path, payload, writer):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(payload(f"touch {control}")))  # the payload is live under plain pickle
    assert control.exists()
    marker, path = tmp_path / "pwned", tmp_path / "decoder.pkl"
    evil = payload(f"touch {marker}")
    if writer == "pickle.dump":
        path.write_bytes(pickle.dumps(evil, protocol=2))
    else:
        if writer == "inside a module":
            host = torch.nn.Sequential(torch.nn.ReLU())
            host.blocks = evil  # a plain attribute: pickled in the module's __dict__
            evil = host
        torch.save(evil, path)
    with pytest.raises(ConfigError) as err:
        load_dalle_decoder(path)
    assert not marker.exists()
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert "refusing to load the global" in str(err.value)


def test_codes_outside_the_vocabulary_are_refused():
    model = DalleDecoder(**TINY)
    ok = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[0, 32\), got values in \[0, 32\]"):
        model.decode_codes(ok + torch.tensor([[[0, 32], [1, 2]]]))
    with pytest.raises(ValueError, match=r"\[0, 32\), got values in \[-1, 0\]"):
        model.decode_codes(ok - torch.tensor([[[0, 1], [0, 0]]]))
    with pytest.raises(ValueError, match="integers"):
        model.decode_codes(ok.float())
    with pytest.raises(ValueError, match="integers"):
        model.decode_codes(ok[0])
    with pytest.raises(ValueError, match="expected input"):
        model(torch.zeros(1, 31, 2, 2))


@pytest.mark.parametrize("group_count,scale", [(4, 8), (3, 4)])
def test_output_is_the_code_grid_upsampled(group_count, scale):
    torch.manual_seed(0)
    model = DalleDecoder(**{**TINY, "group_count": group_count})
    codes = torch.randint(0, 32, (3, 5, 7), dtype=torch.int32)
    with torch.no_grad():
        pixels = model.decode_codes(codes)
        logits = model(model.one_hot(codes))
    assert model.upscale == scale
    assert pixels.shape == (3, 3, 5 * scale, 7 * scale) and pixels.dtype == torch.float32
    assert pixels.is_contiguous() and 0 <= pixels.min() and pixels.max() <= 1
    assert logits.shape == (3, 6, 5 * scale, 7 * scale)
    torch.testing.assert_close(pixels, unmap_pixels(torch.sigmoid(logits[:, :3])), rtol=0, atol=1e-6)
    half = DalleDecoder(**{**TINY, "group_count": group_count}).to(torch.bfloat16)
    assert half.decode_codes(codes).dtype == torch.float32  # weights are upcast: always float32 compute


def test_unreadable_inputs_give_one_line_config_errors(tmp_path):
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle at all")
    tensors = tmp_path / "state.pt"
    torch.save({"blocks.input.w": torch.zeros(2)}, tensors)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {tmp_path / "missing.pkl": "no such file", garbage: "cannot read it", tensors: "it holds a dict",
             empty: "is missing"}
    folder = save_dalle_decoder(DalleDecoder(**TINY), tmp_path / "saved")
    cfg = json.loads((folder / "config.json").read_text())
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (wrong / "config.json").write_text(json.dumps({**cfg, "n_hid": 16}))
    cases[wrong] = "weights do not fit a DALL-E decoder"
    typo = tmp_path / "typo"
    typo.mkdir()
    (typo / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (typo / "config.json").write_text(json.dumps({**cfg, "model_type": "vqgan"}))
    cases[typo] = "expected model_type 'dalle-dvae-decoder'"
    for path, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_dalle_decoder(path)
        assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value), err.value
