"""What a new user types: understanding families (CLIP, SigLIP, DINOv2, timm) and ``--decoder none``
train captioning through ``lm4lv train`` and answer in text from their run; a truncated model
(``--num-visual-tokens``) refuses image answers at once and answers in text; a ``<query>`` run
restores ``--input`` images with its recorded prompt; ``--lora`` works on a family PEFT has no
default targets for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli, write_pairs


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    """Two images with captions (training) and the same prompts with empty answers (generation)."""
    root = tmp_path_factory.mktemp("captions")
    write_pairs(root, n=2)
    caps = [{"image": f"hq/{i}.png", "conversations": [{"from": "human", "value": "Describe <image>"},
                                                       {"from": "gpt", "value": "a small picture"}]} for i in range(2)]
    (root / "captions.json").write_text(json.dumps(caps))
    for c in caps:
        c["conversations"][1]["value"] = ""
    (root / "prompts.json").write_text(json.dumps(caps))
    return root


def _hf_tower(root: Path, cls: str, config: str) -> str:
    import transformers

    out = root / cls
    if not out.is_dir():
        torch.manual_seed(0)
        cfg = getattr(transformers, config)(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=8)
        getattr(transformers, cls)(cfg).save_pretrained(out)
    return str(out)


def _timm(root: Path) -> list[str]:
    """A tiny timm ViT's weights and the vision config that names it (its widths are model kwargs)."""
    import timm
    from safetensors.torch import save_file

    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    ckpt = root / "vit.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kw).state_dict(), str(ckpt))
    vc = root / "timm.yaml"
    vc.write_text(json.dumps({"encoder": {"name": "timm", "kwargs": {"model": "vit_tiny_patch16_224",
                                                                     "checkpoint": str(ckpt), "model_kwargs": kw}}}))
    return ["--vision-config", str(vc), "--decoder", "none"]


FAMILIES = {  # name → the options that choose it, given a scratch folder
    "clip": lambda r: ["--encoder", "clip:" + _hf_tower(r, "CLIPVisionModel", "CLIPVisionConfig")],
    "siglip": lambda r: ["--encoder", "siglip:" + _hf_tower(r, "SiglipVisionModel", "SiglipVisionConfig")],
    "dinov2": lambda r: ["--encoder", "dinov2:" + _hf_tower(r, "Dinov2Model", "Dinov2Config")],
    "timm": _timm,
    "mae --decoder none": lambda r: ["--decoder", "none"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_understanding_family_trains_and_answers_in_text(family, captions, tmp_path, monkeypatch, capsys):
    opts = FAMILIES[family](tmp_path)
    code, out = run_cli(monkeypatch, capsys, "train", "--data", captions / "captions.json", "--preset", "tiny",
                        *opts, "--out", tmp_path / "run", "--max-steps", "1")
    assert code == 0, out
    saved = (tmp_path / "run" / "final" / "lm4lv.yaml").read_text()
    assert "decoder: null" in saved
    code, out = run_cli(monkeypatch, capsys, "generate", "--run", tmp_path / "run", "--data", captions / "prompts.json",
                        "--out", tmp_path / "gen", "--mode", "text", "--max-new-tokens", "3")
    assert code == 0, out
    rows = [json.loads(line) for line in (tmp_path / "gen" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["outputs"] == [] and r["text"] for r in rows)


def test_truncated_model_refuses_image_answers_and_answers_in_text(captions, tmp_path, monkeypatch, capsys):
    code, out = run_cli(monkeypatch, capsys, "train", "--data", captions / "train.json", "--preset", "tiny",
                        "--num-visual-tokens", "4", "--out", tmp_path / "paint", "--max-steps", "1")
    assert code == 2 and out.strip().splitlines()[-1] == (
        f"error: {captions / 'train.json'}: sample 0 answers with an image, but --num-visual-tokens 4 keeps 4 of "
        "the 17 tokens of encoder mae, and a truncated model cannot paint (text answers only)")
    assert not (tmp_path / "paint").exists()
    code, out = run_cli(monkeypatch, capsys, "train", "--data", captions / "captions.json", "--preset", "tiny",
                        "--num-visual-tokens", "4", "--out", tmp_path / "run", "--max-steps", "1")
    assert code == 0, out
    code, out = run_cli(monkeypatch, capsys, "generate", "--run", tmp_path / "run", "--data", captions / "prompts.json",
                        "--out", tmp_path / "gen", "--mode", "text", "--max-new-tokens", "2")
    assert code == 0, out
    assert len((tmp_path / "gen" / "results.jsonl").read_text().splitlines()) == 2


def test_query_run_restores_inputs_with_its_recorded_prompt(captions, tmp_path, monkeypatch, capsys):
    raw = json.loads((captions / "train.json").read_text())
    for s in raw:
        s["conversations"][1]["value"] = "<query>"
    data = captions / "query.json"
    data.write_text(json.dumps(raw))
    code, out = run_cli(monkeypatch, capsys, "train", "--data", data, "--preset", "tiny", "--out", tmp_path / "run",
                        "--max-steps", "2", "--stop-after", "1")
    assert code == 0, out
    assert not (tmp_path / "run" / "final").exists()  # stopped: a checkpoint only
    code, out = run_cli(monkeypatch, capsys, "generate", "--run", tmp_path / "run", "--input", captions / "lq",
                        "--out", tmp_path / "restored")
    assert code == 0, out
    assert "has no final/ (yet): generating with its newest checkpoint" in out
    assert sorted(p.name for p in (tmp_path / "restored").glob("*.png")) == ["0.png", "1.png"]


def test_lora_without_targets_on_a_family_peft_does_not_know(captions, tmp_path, monkeypatch, capsys):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm4lv_core.sources.presets import preset_config

    tiny = preset_config("tiny")
    tok = AutoTokenizer.from_pretrained(tiny.llm)
    cfg = transformers.OlmoConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                  vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "olmo")
    tok.save_pretrained(tmp_path / "olmo")
    code, out = run_cli(monkeypatch, capsys, "train", "--data", captions / "train.json", "--llm", tmp_path / "olmo",
                        "--mae", tiny.encoder.kwargs["path"], "--lora", "--out", tmp_path / "run", "--max-steps", "1")
    assert code == 0, out
    assert "no default targets in PEFT's table, so every linear layer of the transformer (all-linear): " \
           "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in out
    import yaml

    lora = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["lora"]
    assert lora["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
