"""Every Hugging Face LLM family works out of the box.

For each family a tiny random model (2 layers, width 64) is built from its config once per session
(with the ``tiny`` preset's tokenizer and MAE) and goes through what lm4lv does with an LLM: the
attention transformers picks, a train-mode loss that is finite and deterministic (no live
dropout) with gradients reaching the adapter, gradient checkpointing, LoRA on the family's default
targets, KV-cached batched image generation equal to the reference algorithm, one-pass query
generation independent of the batch, text generation, the memory plan, and a ZeRO-3 run that
saves and reloads. A new family is one line of ``FAMILIES``.
"""

from __future__ import annotations

import json

import pytest
import torch

from lm4lv_core.config import LoraConfig
from lm4lv_core.data.dataset import LM4LVDataset, collate
from lm4lv_core.data.format import load_checked, parse_sample
from lm4lv_core.model.generate import GenerationConfig, build_items, generate_samples, naive_generate_images
from lm4lv_core.model.lm4lv import LM4LV
from lm4lv_core.sources.presets import preset_config

W, LAYERS, HEADS = 64, 2, 4
LLAMA_LIKE = dict(hidden_size=W, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=2)
SLIDING = 24  # shorter than the prompts: the sliding-window paths run

# name: (transformers config class, its arguments, the attention `auto` resolves to)
FAMILIES = {
    "llama3": ("LlamaConfig", dict(LLAMA_LIKE, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), "sdpa"),
    "mistral": ("MistralConfig", dict(LLAMA_LIKE, sliding_window=SLIDING), "sdpa"),
    "qwen2": ("Qwen2Config", LLAMA_LIKE, "sdpa"),
    "qwen3": ("Qwen3Config", dict(LLAMA_LIKE, head_dim=16), "sdpa"),
    "gemma": ("GemmaConfig", dict(LLAMA_LIKE, num_key_value_heads=1, head_dim=16), "sdpa"),
    "gemma2": ("Gemma2Config", dict(LLAMA_LIKE, head_dim=16, sliding_window=SLIDING, query_pre_attn_scalar=16,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0), "eager"),
    "gemma3_text": ("Gemma3TextConfig", dict(LLAMA_LIKE, head_dim=16, sliding_window=SLIDING, query_pre_attn_scalar=16,
                                             layer_types=["sliding_attention", "full_attention"]), "sdpa"),
    "phi3": ("Phi3Config", dict(LLAMA_LIKE, resid_pdrop=0.1, embd_pdrop=0.1), "sdpa"),
    "phi2": ("PhiConfig", dict(LLAMA_LIKE, num_key_value_heads=HEADS, resid_pdrop=0.1, embd_pdrop=0.1), "sdpa"),
    "gpt2": ("GPT2Config", dict(n_embd=W, n_layer=LAYERS, n_head=HEADS, n_positions=512), "sdpa"),
    "opt": ("OPTConfig", dict(hidden_size=W, ffn_dim=96, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                              word_embed_proj_dim=W, max_position_embeddings=512, dropout=0.1), "sdpa"),
    "granite": ("GraniteConfig", dict(LLAMA_LIKE, embedding_multiplier=4.0, logits_scaling=2.0, residual_multiplier=0.5,
                                      attention_multiplier=0.1), "sdpa"),
    "cohere": ("CohereConfig", dict(LLAMA_LIKE, logit_scale=0.5), "sdpa"),
    "mixtral": ("MixtralConfig", dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2), "sdpa"),
    "bloom": ("BloomConfig", dict(hidden_size=W, n_layer=LAYERS, n_head=HEADS, hidden_dropout=0.1,
                                  attention_dropout=0.1), "eager"),
    "falcon": ("FalconConfig", dict(hidden_size=W, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                    hidden_dropout=0.1), "sdpa"),
}
PROMPTS = ["<image> <task>", "Restore the image <image> <task> please: remove the noise and the blur"]


@pytest.fixture(scope="session")
def family_root(tmp_path_factory):
    """Folders of the tiny models, built on first use (``family_root(name)`` → its folder)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("llm-families")
    tok = AutoTokenizer.from_pretrained(preset_config("tiny").llm)

    def folder(name: str):
        out = root / name
        if not (out / "config.json").is_file():
            cls, kwargs, _ = FAMILIES[name]
            cfg = getattr(transformers, cls)(**kwargs, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
            tok.save_pretrained(out)
        return out

    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import write_pairs

    return write_pairs(tmp_path_factory.mktemp("families-data"), n=2)


def _config(folder, **kw):
    return preset_config("tiny", llm=str(folder), **kw)


def _batch(model, data_file):
    ds = LM4LVDataset(load_checked(data_file), model.builder, model.encoder.image_size)
    return collate([ds[i] for i in range(len(ds))], pad_id=model.builder.pad_id)


def _prompts(data_file):
    images = [s.images[0] for s in load_checked(data_file)]
    return [parse_sample({"image": [images[i]], "conversations": [{"from": "human", "value": p},
                                                                   {"from": "gpt", "value": ""}]}, i)
            for i, p in enumerate(PROMPTS)]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_trains_and_generates(name, family_root, data):
    folder = family_root(name)
    torch.manual_seed(0)
    model = LM4LV.from_config(_config(folder, query=True))
    assert model.config.attn_implementation == FAMILIES[name][2] == model.llm.config._attn_implementation

    # train mode: finite, deterministic (no live dropout), gradients reach the adapter
    model.train()
    batch = _batch(model, data)
    out = model(batch)
    assert torch.isfinite(out.loss) and out.vision_loss > 0 and out.text_loss > 0
    assert torch.equal(model(batch).loss, out.loss)
    out.loss.backward()
    grad = model.adapter.weight.grad.clone()
    assert grad.abs().sum() > 0 and model.task_tokens.grad.abs().sum() > 0
    model.zero_grad()
    model.enable_gradient_checkpointing()  # same loss and adapter gradient, layers recomputed
    again = model(batch)
    again.loss.backward()
    assert torch.allclose(again.loss, out.loss, atol=1e-6)
    assert torch.allclose(model.adapter.weight.grad, grad, rtol=1e-4, atol=1e-7)

    # KV-cached, batched (left-padded) image generation equals the reference algorithm
    model.eval()
    prompts = _prompts(data)
    autoregressive = GenerationConfig(mode="image", query=False)
    outs = generate_samples(model, prompts, autoregressive, batch_size=2)
    for s, o in zip(prompts, outs):
        items, _ = build_items(model, [s], "image", query=False)
        naive = naive_generate_images(model, collate(items, pad_id=model.builder.pad_id, padding_side="left"))
        assert (o.features[0] - naive).abs().max().item() <= 1e-4, s.index
    # one-pass query generation: the same in a batch as alone
    batched = generate_samples(model, prompts, GenerationConfig(mode="image"), batch_size=2)
    for s, o in zip(prompts, batched):
        single = generate_samples(model, [s], GenerationConfig(mode="image"), batch_size=1)[0]
        assert (o.features[0] - single.features[0]).abs().max().item() <= 1e-4, s.index
    # text generation
    texts = generate_samples(model, prompts, GenerationConfig(mode="text", max_new_tokens=4), batch_size=2)
    assert all(1 <= len(o.token_ids) <= 4 for o in texts)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_lora_default_targets_train(name, family_root, data):
    torch.manual_seed(0)
    model = LM4LV.from_config(_config(family_root(name), lora=LoraConfig(enabled=True)))
    targets = model.config.lora.target_modules
    assert targets, "the family's default targets are recorded"
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert lora
    model.train()
    batch = _batch(model, data)
    opt = torch.optim.SGD(list(lora.values()), lr=1.0)
    first = model(batch)
    first.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    opt.step()
    model.llm.eval()  # LoRA dropout off: the change is the step's
    with torch.no_grad():
        assert not torch.equal(model(batch).loss, first.loss)


def test_wrong_lora_target_lists_the_models_linear_layers(family_root):
    from lm4lv_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"LoRA target module\(s\) q_proj not found in .*falcon; its linear "
                                          r"layers are: dense, dense_4h_to_h, dense_h_to_4h, query_key_value"):
        LM4LV.from_config(_config(family_root("falcon"), lora=LoraConfig(enabled=True, target_modules=["q_proj"])))
    with pytest.raises(ConfigError, match="--attn-implementation sdpa: BloomForCausalLM .* has no sdpa attention"):
        LM4LV.from_config(_config(family_root("bloom"), attn_implementation="sdpa"))


@pytest.mark.parametrize("name", FAMILIES)
def test_family_memory_plan(name, family_root, data):
    from lm4lv_core.data.format import load_samples
    from lm4lv_core.engine.config import TrainConfig
    from lm4lv_core.model.memplan import format_plan, plan_training

    cfg = _config(family_root(name), lora=LoraConfig(enabled=True))
    for zero in (1, 3):
        plan = plan_training(TrainConfig(data=str(data), out="-", micro_batch=2, zero_stage=zero,
                                         gradient_checkpointing=True), cfg, load_samples(data), 80)
        assert plan.model.layers == LAYERS and plan.model.hidden == W and plan.model.trainable["LoRA"] > 0
        assert plan.activations["saved"] > 0 and plan.fits
    text = format_plan(plan)
    assert ("approximate: the activation model is calibrated on Llama layers" in text) == (name != "llama3")
    from lm4lv_core.model.resolve import resolve_config

    assert resolve_config(cfg).attn_implementation == FAMILIES[name][2]


# the family matrix keeps its breadth (training, generation, LoRA targets, memory plan: every family
# above); the heavy in-process ZeRO-3 run covers its code paths on a Llama layout and a GPT-2 one
# (fused QKV Conv1D, learnt positions), which between them reach every ZeRO-3 path lm4lv has
ZERO3_FAMILIES = ["llama3", "gpt2"]


@pytest.mark.parametrize("name", ZERO3_FAMILIES)
def test_family_zero3_run_saves_and_reloads(name, family_root, data, tmp_path):
    """A ZeRO-3 run (every parameter partitioned, gradient checkpointing, LoRA on the default
    targets) records the resolved choices, saves whole tensors and reloads."""
    from safetensors.torch import load_file

    from lm4lv_core.engine.config import TrainConfig
    from lm4lv_core.jobs.train import train

    ds = tmp_path / "ds.json"  # without it ZeRO-3 leaves the tiny tensors whole
    ds.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    cfg = _config(family_root(name), lora=LoraConfig(enabled=True))
    out = tmp_path / "run"
    train(TrainConfig(data=str(data), out=str(out), micro_batch=2, max_steps=1, zero_stage=3,
                      gradient_checkpointing=True, deepspeed_config=str(ds), lr_schedule="constant",
                      warmup_ratio=0.0), cfg)
    import yaml

    recorded = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert recorded["attn_implementation"] == FAMILIES[name][2] and recorded["lora"]["target_modules"]
    saved = load_file(str(out / "final" / "trainable.safetensors"))
    assert saved["task_tokens"].shape == (cfg.num_task_tokens, W)
    model = LM4LV.from_pretrained(out / "final")
    assert torch.equal(model.task_tokens, saved["task_tokens"])
    assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_cli_records_and_shows_the_family_choices(family_root, data, tmp_path):
    """Through the installed ``lm4lv``: the dry run shows what ``auto`` and the default LoRA
    targets resolve to; a target the LLM lacks is one ``error:`` line listing its linear layers,
    before any run folder is made."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("lm4lv")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    mae = preset_config("tiny").encoder.kwargs["path"]

    def lm4lv(name, *args):
        return subprocess.run([str(script), "train", "--data", str(data), "--llm", str(family_root(name)),
                               "--mae", mae, "--out", str(tmp_path / name), *args],
                              capture_output=True, text=True, env=env, timeout=300)

    proc = lm4lv("bloom", "--lora", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "LLM bloom: attention eager; LoRA r=8 on query_key_value" in " ".join(proc.stdout.split())
    proc = lm4lv("falcon", "--lora", "--lora-targets", "q_proj,v_proj")
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: LoRA target module(s) q_proj, v_proj not found in {family_root('falcon')}; its linear layers are: "
        "dense, dense_4h_to_h, dense_h_to_4h, query_key_value"]
    assert not (tmp_path / "falcon").exists()
