"""The reference's artefacts (bytetriper/LM4LV): its vision YAMLs (stage2_*.yaml), train YAMLs
(train_*.yaml) and delta checkpoints (pytorch_model*.pt), read by lm4lv.

The fixtures are written here in the reference's exact form, with tiny local folders in place of
its model zoo."""

from __future__ import annotations

import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import run_cli
from lm4lv_core.errors import ConfigError
from lm4lv_core.sources.presets import preset_dir

STAGE2_MAE = """\
encoder:
  target: model.vision_modules.MAE_Encoder
  params:
    ckpt_path: '{mae}'

adapter:
  target: model.vision_modules.Linear_Adapter
  params:
    in_features: 32
    out_features: 64

deadapter:
  target: model.vision_modules.Linear_Adapter
  params:
    in_features: 64
    out_features: 32

vision_loss:
  target: model.losses.Feat_MSELoss
  params:
    num_vision_tokens: 17

decoder:
  target: model.vision_modules.MAE_Decoder
  params:
    ckpt_path: '{mae}'"""

STAGE2_BEIT = """\
encoder:
  target: model.vision_modules.BEiT_Encoder
  params:
    feature_type: local
    ckpt_path: '{beit}'

adapter:
  target: model.vision_modules.Linear_Adapter
  params:
    in_features: 32
    out_features: 64

deadapter:
  target: model.vision_modules.Linear_Adapter
  params:
    in_features: 64
    out_features: 32

vision_loss:
  target: model.losses.MAE_FeatLoss
  params:
    num_vision_tokens: 17

decoder:
  target: model.vision_modules.BEiT_Decoder
  params:
    ckpt_path: '{beit}'
    dalle_decoder_path: '{dvae}'
"""

STAGE2_VQGAN = """\
encoder:
  target: model.vision_modules.VQ_Encoder
  params:
    config_path: {vq}/config.yaml
    ckpt_path: {vq}/model.ckpt
    quantize: False
    reshape: [1,8,8]
    im_size: 32

#adapter:
#  target: model.encoders.Embedding_Adapter
#  params:
#    num_embeddings: 64
#    embedding_dim: 64
adapter:
  target: model.vision_modules.Linear_Adapter
  params:
    in_features: 4
    out_features: 64
deadapter:
  target: model.vision_modules.Linear_Adapter
  params:
    in_features: 64
    out_features: 4
decoder:
  target: model.vision_modules.VQ_Decoder
  params:
    config_path: {vq}/config.yaml
    ckpt_path: {vq}/model.ckpt
    im_size: 32
    reshape: [8,8]
vision_loss:
  target: model.losses.MAE_FeatLoss
  params:
    num_vision_tokens: 197
  """


@pytest.fixture(scope="module")
def beit_folders(tmp_path_factory):
    from transformers import BeitConfig, BeitForMaskedImageModeling

    from lm4lv_core.vision.dalle_dvae import DalleDecoder, save_dalle_decoder

    tmp = tmp_path_factory.mktemp("beit")
    torch.manual_seed(0)
    BeitForMaskedImageModeling(BeitConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, image_size=32, patch_size=8,
                                          use_mean_pooling=True)).save_pretrained(tmp / "BEiT")
    (tmp / "BEiT" / "dalle").mkdir()
    save_dalle_decoder(DalleDecoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=32), tmp / "BEiT" / "dalle")
    return tmp / "BEiT", tmp / "BEiT" / "dalle"


@pytest.fixture(scope="module")
def ldm_vq_folder(tmp_path_factory):
    """A latent-diffusion VQGAN folder (config.yaml + model.ckpt), as the reference's model zoo holds."""
    from test_ldm_checkpoint import CONFIG, DDCONFIG, EMBED_DIM, N_EMBED, TamingVQModel

    root = tmp_path_factory.mktemp("vq-f4-n64")
    torch.manual_seed(0)
    torch.save({"state_dict": TamingVQModel(DDCONFIG, N_EMBED, EMBED_DIM).state_dict()}, root / "model.ckpt")
    (root / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    return root


def _dry_run(monkeypatch, capsys, pairs_file, vision_config, *more):
    return run_cli(monkeypatch, capsys, "train", "--preset", "tiny", "--data", pairs_file, "--out",
                   pairs_file.parent / "run", "--vision-config", vision_config, "--dry-run", *more)


def test_stage2_mae_yaml_dry_run(monkeypatch, capsys, pairs_file, tmp_path):
    mae = preset_dir("tiny") / "mae"
    vc = tmp_path / "stage2_MAE.yaml"
    vc.write_text(STAGE2_MAE.format(mae=mae))
    code, out = _dry_run(monkeypatch, capsys, pairs_file, vc)
    assert code == 0, out
    assert "the reference's form" in out and "derived from the models: adapter.in_features" in out
    from lm4lv_core.model.options import resolve_model_config

    cfg = resolve_model_config(preset="tiny", vision_config=str(vc))
    assert (cfg.encoder.name, cfg.encoder.kwargs) == ("mae", {"path": str(mae)})
    assert (cfg.decoder.name, cfg.adapter.name, cfg.deadapter.name, cfg.vision_loss) == (
        "mae", "linear", "linear", "feature_mse")


def test_stage2_beit_yaml_dry_run(monkeypatch, capsys, pairs_file, tmp_path, beit_folders):
    beit, dvae = beit_folders
    vc = tmp_path / "stage2_BEiT.yaml"
    vc.write_text(STAGE2_BEIT.format(beit=beit, dvae=dvae))
    code, out = _dry_run(monkeypatch, capsys, pairs_file, vc)
    assert code == 0, out
    assert "MAE_FeatLoss is not defined in the reference's code: read as feature MSE" in out
    assert "ignored: encoder.feature_type=local" in " ".join(out.split())
    from lm4lv_core.model.options import resolve_model_config

    cfg = resolve_model_config(preset="tiny", vision_config=str(vc))
    assert (cfg.encoder.name, cfg.decoder.name, cfg.decoder.kwargs["dvae"]) == ("beit", "beit-dvae", str(dvae))


def test_stage2_vqgan_yaml_dry_run(monkeypatch, capsys, pairs_file, tmp_path, ldm_vq_folder):
    vc = tmp_path / "stage2_vqgan.yaml"
    vc.write_text(STAGE2_VQGAN.format(vq=ldm_vq_folder))
    code, out = _dry_run(monkeypatch, capsys, pairs_file, vc)
    assert code == 0, out
    from lm4lv_core.model.options import resolve_model_config

    cfg = resolve_model_config(preset="tiny", vision_config=str(vc))
    assert (cfg.encoder.name, cfg.encoder.kwargs) == ("vqgan", {"path": str(ldm_vq_folder), "image_size": 32})
    assert cfg.decoder.name == "vqgan" and cfg.vision_loss == "feature_mse"
    # quantize: True reads codes
    vc.write_text(STAGE2_VQGAN.format(vq=ldm_vq_folder).replace("quantize: False", "quantize: True"))
    assert resolve_model_config(preset="tiny", vision_config=str(vc)).encoder.name == "vqgan-codes"


@pytest.mark.parametrize("target, words", [
    ("model.vision_modules.CLIP_Text_Encoder", "CLIP_Text_Encoder has no lm4lv equivalent"),
    ("model.vision_modules.Nope_Encoder", "Nope_Encoder has no lm4lv equivalent"),
])
def test_target_without_equivalent_is_one_line(monkeypatch, capsys, pairs_file, tmp_path, target, words):
    vc = tmp_path / "v.yaml"
    vc.write_text(STAGE2_MAE.format(mae=preset_dir("tiny") / "mae").replace("model.vision_modules.MAE_Encoder", target))
    code, out = _dry_run(monkeypatch, capsys, pairs_file, vc)
    assert code == 2
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], out


def test_params_families_do_not_take_are_listed(tmp_path):
    from lm4lv_core.sources.reference import vision_fields

    data = yaml.safe_load(STAGE2_MAE.format(mae="m"))
    data["encoder"]["params"].update(mask_ratio=0.0, im_size=224)
    fields, notes = vision_fields(data, "v.yaml")
    text = "; ".join(notes)
    assert "encoder.im_size=224" in text  # never dropped silently
    # mask_ratio: passed on where the mae family takes it, else listed
    assert ("mask_ratio" in fields["encoder"].kwargs) != ("encoder.mask_ratio=0.0" in text)


# ---------------------------------------------------------------------------- train YAML
TRAIN_BF16 = """\
models:
  lamm:
      model_name: LAMMModel
      agent_name: DeepSpeedAgent
      stage1_train_dataset: LM4LVDataset

  lamm_peft:
      model_name: LM4LVPEFTModel
      agent_name: DeepSpeedAgent
      stage1_train_dataset: LM4LVDataset

# ========= Global configuration ========== #
logging_step: 25
# ========= Global configuration ========== #

# generation hyper-parameters
max_len: 1024
penalty_alpha: 0.6
top_k: 10
top_p: 0.7
random_prefix_len: 5
sample_num: 2
decoding_method: sampling
generate_len: 512
# some train configuration, more can be found under dsconfig folder
seed: 0
warmup_rate: 0.1
epochs: 2
max_length: 1024
max_shard_size: 10GB

# lora hyper-parameters
lora_r: 32
lora_alpha: 64
lora_dropout: 0.
lora_target_modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj']

# deepspeed arguments
deepspeed:
  train_batch_size: 256
  train_micro_batch_size_per_gpu: 16
  gradient_accumulation_steps: 4
  gradient_clipping: 1.0
  steps_per_print: 1

  zero_optimization:
    stage: 3
    contiguous_gradients: true
    overlap_comm: true
    offload_optimizer:
      device: cpu
      pin_memory: true

  optimizer:
    type: Adam
    params:
      betas:
      - 0.9
      - 0.95
      eps: 1.0e-08
      lr: 3.0e-4
      weight_decay: 0

  scheduler:
    type: WarmupDecayLR
    params:
      total_num_steps: 20000
      warmup_max_lr: 3.0e-4
      warmup_min_lr: 0
      warmup_num_steps: 200

  fp16:
    enabled: false

  bf16:
    enabled: true
    min_loss_scale: 1
    opt_level: O2

  activation_checkpointing:
    partition_activations: true
    cpu_checkpointing: true
"""


def test_train_yaml_maps_onto_train_options(tmp_path, capsys):
    from lm4lv_core.jobs.train import resolve_options

    cfg_file = tmp_path / "train_bf16.yaml"
    cfg_file.write_text(TRAIN_BF16)
    train, model = resolve_options({"preset": "tiny", "data": "d.json", "out": str(tmp_path / "r")}, str(cfg_file))
    assert (train.micro_batch, train.grad_accum, train.grad_clip, train.warmup_ratio, train.epochs) == (16, 4, 1.0, 0.1, 2)
    assert (train.zero_stage, train.lr, train.beta1, train.beta2, train.weight_decay) == (3, 3e-4, 0.9, 0.95, 0)
    assert (train.precision, train.lr_schedule, train.seed) == ("bf16", "reference", 0)
    assert (model.lora.r, model.lora.alpha, model.lora.dropout) == (32, 64, 0.0)
    assert model.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"] and not model.lora.enabled
    cap = capsys.readouterr()
    out = " ".join((cap.out + cap.err).split())
    assert out.count("the reference's train config") == 1
    assert "deepspeed.gradient_accumulation_steps→grad_accum" in out
    assert "ignored" in out and "deepspeed.train_batch_size" in out and "top_k" in out


def test_train_yaml_dry_run_and_command_line_wins(monkeypatch, capsys, pairs_file, tmp_path):
    cfg_file = tmp_path / "train_bf16.yaml"
    cfg_file.write_text(TRAIN_BF16)
    code, out = run_cli(monkeypatch, capsys, "train", "--config", cfg_file, "--preset", "tiny", "--data", pairs_file,
                        "--out", tmp_path / "run", "--precision", "fp32", "--micro-batch", "2", "--dry-run")
    assert code == 0, out
    assert "the reference's train config" in out
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- delta checkpoint
class _ReferenceModel(nn.Module):
    """The reference model's trainable attributes, by its names (src/model/LM4LV.py): ``adapter``,
    ``deadapter`` (Linear_Adapter), ``learnable_task_token`` [1, K, d] in bf16, and a trained
    ``visual_encoder`` (MAE_Encoder: a ViTMAEModel under ``model``)."""

    def __init__(self, d_v: int, d_llm: int, k: int, mae_folder: Path) -> None:
        super().__init__()
        from transformers import ViTMAEModel

        self.adapter = nn.Linear(d_v, d_llm)
        self.deadapter = nn.Linear(d_llm, d_v)
        self.learnable_task_token = nn.Parameter(torch.zeros(1, k, d_llm, dtype=torch.bfloat16))
        self.visual_encoder = nn.Module()
        self.visual_encoder.model = ViTMAEModel.from_pretrained(str(mae_folder), mask_ratio=0.0)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """An lm4lv model with a trained encoder saved as a folder, and the same weights written as the
    reference's pytorch_model.pt."""
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.sources.presets import preset_config

    root = tmp_path_factory.mktemp("delta")
    torch.manual_seed(3)
    lm = LM4LV.from_config(preset_config("tiny", train_encoder=True))
    with torch.no_grad():
        lm.task_tokens.copy_(lm.task_tokens.to(torch.bfloat16).float())  # the reference keeps them in bf16
        for p in lm.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lm.save_pretrained(root / "lm4lv")
    ref = _ReferenceModel(32, 64, 10, preset_dir("tiny") / "mae")
    ref.adapter.load_state_dict(lm.adapter.state_dict())
    ref.deadapter.load_state_dict(lm.deadapter.state_dict())
    ref.visual_encoder.model.load_state_dict(lm.encoder.vit.state_dict())
    with torch.no_grad():
        ref.learnable_task_token.copy_(lm.task_tokens[None].to(torch.bfloat16))
    torch.save(OrderedDict((k, v.detach()) for k, v in ref.named_parameters()), root / "pytorch_model_ep2.pt")
    return root


def test_import_reference_generates_what_lm4lv_generates(monkeypatch, capsys, written, pairs_file, tmp_path):
    from PIL import Image
    from safetensors.torch import load_file
    import numpy as np

    code, out = run_cli(monkeypatch, capsys, "import-reference", written / "pytorch_model_ep2.pt", "--preset", "tiny",
                        "--out", tmp_path / "imported")
    assert code == 0, out
    assert "loaded adapter (2), deadapter (2), task_tokens, encoder" in out and "fresh: nothing" in out, out
    want, got = load_file(written / "lm4lv" / "trainable.safetensors"), load_file(tmp_path / "imported" / "trainable.safetensors")
    assert set(want) == set(got)
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)
    images = []
    for name, model in (("a", written / "lm4lv"), ("b", tmp_path / "imported")):
        code, out = run_cli(monkeypatch, capsys, "generate", "--run", model, "--data", pairs_file, "--out", tmp_path / name)
        assert code == 0, out
        images.append(sorted((tmp_path / name / "images").rglob("*.png")))
    assert images[0] and len(images[0]) == len(images[1])
    for a, b in zip(*images):
        diff = np.abs(np.asarray(Image.open(a), np.float32) - np.asarray(Image.open(b), np.float32)) / 255
        assert diff.max() <= 1e-5, (a, b)


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.parametrize("content", ["not a tensor", "code"])
def test_delta_checkpoint_is_read_safely(monkeypatch, capsys, tmp_path, content):
    pt = tmp_path / "pytorch_model.pt"
    extra = 3 if content == "not a tensor" else _Payload()
    torch.save(OrderedDict([("adapter.weight", torch.zeros(64, 32)), ("step", extra)]), pt)
    code, out = run_cli(monkeypatch, capsys, "import-reference", pt, "--preset", "tiny", "--out", tmp_path / "m")
    assert code == 2 and "pickled code ran" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {pt}: not a delta checkpoint"), out
    assert not (tmp_path / "m").exists()


def test_to_lm4lv_names():
    from lm4lv_core.sources.reference import to_lm4lv_names

    names = {"adapter.weight": 0, "task_tokens": 0, "encoder.vit.encoder.layer.0.output.dense.weight": 0,
             "decoder.decoder.decoder_pred.weight": 0,
             "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": 0}
    sd = {"adapter.weight": torch.zeros(1), "learnable_task_token": torch.zeros(1, 10, 4),
          "visual_encoder.model.encoder.layer.0.output.dense.weight": torch.zeros(1),
          "decoder.decoder.decoder_pred.weight": torch.zeros(1),
          "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.zeros(1)}
    got = to_lm4lv_names(sd, names, "x.pt")
    assert set(got) == set(names) and got["task_tokens"].shape == (10, 4)
