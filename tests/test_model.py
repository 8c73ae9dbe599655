import torch

from conftest import overfit
from lm4lv_core.config import LoraConfig
from lm4lv_core.data.dataset import LM4LVDataset, collate
from lm4lv_core.data.format import load_checked, parse_sample
from lm4lv_core.model.lm4lv import LM4LV
from lm4lv_core.sources.presets import preset_config


def _batch(model, data_file):
    samples = load_checked(data_file)
    ds = LM4LVDataset(samples, model.builder, model.encoder.image_size)
    return collate([ds[i] for i in range(len(ds))], pad_id=model.tokenizer.pad_token_id)


def test_one_step_changes_only_trainables(tiny_config, pairs_file):
    torch.manual_seed(0)
    model = LM4LV.from_config(tiny_config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"adapter.weight", "adapter.bias", "deadapter.weight", "deadapter.bias", "task_tokens"}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.trainable_parameters()}
    out = model(_batch(model, pairs_file))
    out.loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
            assert p.grad is None


def test_tiny_model_overfits_four_pairs(tiny_config, pairs_file):
    torch.manual_seed(0)
    model = LM4LV.from_config(tiny_config)
    batch = _batch(model, pairs_file)
    first, last = overfit(model, batch, 150, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    assert last <= 0.5 * first, (first, last)


def _roundtrip(cfg, data_file, tmp_path):
    torch.manual_seed(0)
    model = LM4LV.from_config(cfg).eval()
    # make the trainables non-trivial
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    batch = _batch(model, data_file)
    model.save_pretrained(tmp_path / "m")
    torch.manual_seed(123)  # a different init must be overwritten by the saved weights
    loaded = LM4LV.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(a.vision_pred, b.vision_pred)
    return model, loaded


def test_save_load_identical_llama(tiny_config, pairs_file, tmp_path):
    _roundtrip(tiny_config, pairs_file, tmp_path)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["lm4lv.yaml", "trainable.safetensors"]


def test_save_load_identical_gpt2(pairs_file, tmp_path):
    model, _ = _roundtrip(preset_config("tiny-gpt2"), pairs_file, tmp_path)
    assert type(model.llm).__name__ == "GPT2LMHeadModel"


def test_lora_adapters_save_as_peft_and_reload(pairs_file, tmp_path):
    cfg = preset_config("tiny", lora=LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"]))
    model, loaded = _roundtrip(cfg, pairs_file, tmp_path)
    assert (tmp_path / "m" / "lora" / "adapter_config.json").is_file()
    names = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names) and "task_tokens" in names


def test_captioning_sample_has_text_loss_only(tiny_config, tmp_path):
    from PIL import Image
    import json

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "cap.json").write_text(json.dumps([{"image": ["a.png"], "conversations": [
        {"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "A picture of a red square"}]}]))
    model = LM4LV.from_config(tiny_config)
    out = model(_batch(model, tmp_path / "cap.json"))
    assert out.text_loss > 0 and out.vision_loss == 0 and out.vision_pred is None
    out.loss.backward()
    assert model.adapter.weight.grad.abs().sum() > 0  # the caption depends on the adapted image


def test_frozen_adapter_is_saved_with_a_trainables_only_state_dict(pairs_file, tmp_path):
    cfg = preset_config("tiny", train_adapter=False)
    model = LM4LV.from_config(cfg)
    assert not model.adapter.weight.requires_grad
    model.save_pretrained(tmp_path / "m", state_dict=model.trainable_state_dict())
    torch.manual_seed(99)
    loaded = LM4LV.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.adapter.weight, model.adapter.weight)
    assert torch.equal(loaded.task_tokens, model.task_tokens)
