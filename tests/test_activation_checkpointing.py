"""--gradient-checkpointing: the same loss and gradients, with layers really recomputed in the
backward pass whether the LLM is in train or eval mode; through the engines (ZeRO-3, accelerate)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from lm4lv_core.config import LoraConfig
from lm4lv_core.data.dataset import LM4LVDataset, collate
from lm4lv_core.data.format import load_checked
from lm4lv_core.engine.config import TrainConfig
from lm4lv_core.jobs.train import train
from lm4lv_core.model.lm4lv import LM4LV


def _loss_and_grads(cfg, data_file, checkpointing: bool, llm_eval: bool):
    torch.manual_seed(0)
    model = LM4LV.from_config(cfg)
    if checkpointing:
        assert model.enable_gradient_checkpointing() == 3  # 2 LLM layers + 1 trained decoder layer
    model.train()
    if llm_eval:
        model.llm.eval()  # a frozen LLM kept in eval mode: checkpointing must still apply
    ds = LM4LVDataset(load_checked(data_file), model.builder, model.encoder.image_size)
    batch = collate([ds[i] for i in range(len(ds))], pad_id=model.tokenizer.pad_token_id)
    calls = []
    model.backbone().layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(1)  # same LoRA dropout masks in both runs
    out = model(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(out.loss.detach()), grads, len(calls)


@pytest.mark.parametrize("llm_eval", [False, True])
def test_same_loss_and_gradients_with_checkpointing(llm_eval, tiny_config, pairs_file):
    # LoRA with dropout on the LLM, a trained decoder and a pixel loss through it: every checkpointed
    # part receives gradient, and the inputs_embeds of the LLM carry gradient from the adapter
    cfg = dataclasses.replace(tiny_config, lora=LoraConfig(enabled=True, dropout=0.1), train_decoder=True,
                              vision_loss="pixel_l1")
    loss0, grads0, calls0 = _loss_and_grads(cfg, pairs_file, False, llm_eval)
    loss1, grads1, calls1 = _loss_and_grads(cfg, pairs_file, True, llm_eval)
    assert (calls0, calls1) == (1, 2)  # the first layer ran again in the backward pass
    assert abs(loss0 - loss1) <= 1e-5
    assert grads0.keys() == grads1.keys() and any("lora_" in k for k in grads0) and "adapter.weight" in grads0
    reached = [k for k in grads0 if grads0[k].abs().sum() > 0]
    for part in ("adapter.", "deadapter.", "task_tokens", "lora_B", "decoder.decoder.decoder_layers.0."):
        assert any(k.startswith(part) or part in k for k in reached), part
    for k in grads0:
        assert torch.allclose(grads0[k], grads1[k], atol=1e-5, rtol=0), (k, (grads0[k] - grads1[k]).abs().max())


def _first_linear_calls(model) -> list[int]:
    """A list that grows by one each time the first linear layer inside the LLM's first transformer
    layer runs (the checkpointed layer's recomputation calls it again; the layer's own hooks would not
    see a recomputation, which calls its forward directly)."""
    from lm4lv_core.model.activation_checkpointing import is_checkpointed, transformer_layers

    layer = transformer_layers(model.llm)[0]
    assert is_checkpointed(layer)
    first = next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))
    calls: list[int] = []
    first.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_no_recompute_without_gradients(tiny_config, pairs_file):
    model = LM4LV.from_config(tiny_config)
    model.enable_gradient_checkpointing()
    ds = LM4LVDataset(load_checked(pairs_file), model.builder, model.encoder.image_size)
    batch = collate([ds[0]], pad_id=model.tokenizer.pad_token_id)
    calls = _first_linear_calls(model)
    with torch.no_grad():
        model(batch)
    assert len(calls) == 1  # under no_grad the checkpointed layer runs once and nothing is kept to recompute
    calls.clear()
    model(batch).loss.backward()
    assert len(calls) == 2  # with gradients: once forward, once again in the backward pass (the count sees it)


@pytest.mark.parametrize("engine,stage", [("deepspeed", 3), ("accelerate", 0)])
def test_engine_run_with_checkpointing_matches(engine, stage, tiny_config, pairs_file, tmp_path):
    ds = tmp_path / "ds.json"  # every tensor partitioned under ZeRO-3
    ds.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    cfg = dataclasses.replace(tiny_config, lora=LoraConfig(enabled=True))
    runs = {}
    for ckpt in (False, True):
        out = tmp_path / f"ckpt{int(ckpt)}"
        train(TrainConfig(data=str(pairs_file), out=str(out), engine=engine, zero_stage=stage, micro_batch=2,
                          max_steps=2, save_every=2, preview_every=10, gradient_checkpointing=ckpt,
                          deepspeed_config=str(ds) if engine == "deepspeed" else None), cfg)
        runs[ckpt] = (load_file(str(out / "checkpoints" / "step-2" / "trainable.safetensors")),  # LoRA too
                      (out / "metrics.csv").read_text().splitlines())
    (w0, m0), (w1, m1) = runs[False], runs[True]
    assert w0.keys() == w1.keys() and any("lora_" in k for k in w0)
    for k in w0:
        assert w0[k].numel() and torch.allclose(w0[k], w1[k], atol=1e-5, rtol=0), k
    loss = lambda rows: [float(r.split(",")[1]) for r in rows[1:]]  # noqa: E731
    assert loss(m0) == pytest.approx(loss(m1), abs=1e-5)
