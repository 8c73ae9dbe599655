"""`lm4lv train` on one in-process worker: outputs, exact resume, ZeRO stages, LoRA, losses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm4lv_core.config import LoraConfig
from lm4lv_core.engine.config import TrainConfig
from lm4lv_core.jobs.train import train
from lm4lv_core.errors import ConfigError, DataError


def run(model_cfg, data: Path, out: Path, **kw):
    opts = dict(data=str(data), out=str(out), micro_batch=2, max_steps=4, save_every=2, preview_every=2,
                record_order=True)
    opts.update(kw)
    return train(TrainConfig(**opts), model_cfg)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "trainable.safetensors"))


def assert_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].numel() > 0, k
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), (k, (a[k] - b[k]).abs().max())


def metrics(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_run_outputs_and_exact_resume(tiny_config, pairs_file, tmp_path):
    from lm4lv_core.model.lm4lv import LM4LV

    straight = tmp_path / "straight"
    summary = run(tiny_config, pairs_file, straight)
    assert summary == {"step": 4, "total_steps": 4, "finished": True, "world_size": 1, "skipped_steps": 0}
    for name in ("config.yaml", "metrics.csv", "loss.png", "run.json", "previews/step-2.png",
                 "previews/step-4.png", "checkpoints/step-2/state.json", "checkpoints/step-4/trainable.safetensors",
                 "checkpoints/step-2/rng-rank0.safetensors", "final/lm4lv.yaml"):
        assert (straight / name).is_file(), name
    rows = metrics(straight)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert set(rows[0]) == {"step", "loss", "text_loss", "vision_loss", "lr", "samples/s", "skipped_steps"}
    from test_lr_schedule import reference_lrs

    assert [float(r["lr"]) for r in rows] == pytest.approx(reference_lrs(4, 0.1), rel=1e-5)
    info = json.loads((straight / "run.json").read_text())
    assert info["world_size"] == 1 and info["trainable_param_count"] == info["optimizer_param_count"]
    # defaults of the reference recipe, resolved into config.yaml
    import yaml

    saved = yaml.safe_load((straight / "config.yaml").read_text())
    assert saved["train"]["beta2"] == 0.95 and saved["train"]["lr"] == 3e-4 and saved["train"]["weight_decay"] == 0
    assert saved["model"]["llm"] == tiny_config.llm

    stopped = tmp_path / "stopped"
    summary = run(tiny_config, pairs_file, stopped, stop_after=2)
    assert summary["step"] == 2 and not summary["finished"] and not (stopped / "final").exists()
    with pytest.raises(ConfigError, match="not empty"):
        run(tiny_config, pairs_file, stopped)
    run(tiny_config, pairs_file, stopped, resume=True)
    assert_close(final_weights(stopped), final_weights(straight), 1e-6)
    assert (stopped / "data_order.csv").read_text() == (straight / "data_order.csv").read_text()
    assert [r["step"] for r in metrics(stopped)] == ["1", "2", "3", "4"]

    model = LM4LV.from_pretrained(straight / "final")
    assert_close({k: v for k, v in model.trainable_state_dict().items()}, final_weights(straight), 0)


def test_accelerate_engine_resumes_exactly(tiny_config, pairs_file, tmp_path):
    run(tiny_config, pairs_file, tmp_path / "a", engine="accelerate", grad_accum=2, micro_batch=1)
    run(tiny_config, pairs_file, tmp_path / "b", engine="accelerate", grad_accum=2, micro_batch=1, stop_after=3)
    run(tiny_config, pairs_file, tmp_path / "b", engine="accelerate", grad_accum=2, micro_batch=1, resume=True)
    from test_lr_schedule import reference_lrs

    for d in ("a", "b"):  # the same schedule as under DeepSpeed, resumed exactly
        assert [float(r["lr"]) for r in metrics(tmp_path / d)] == pytest.approx(reference_lrs(4, 0.1), rel=1e-5)
    assert_close(final_weights(tmp_path / "b"), final_weights(tmp_path / "a"), 1e-6)
    assert (tmp_path / "a" / "checkpoints" / "step-2" / "optimizer.pt").is_file()
    # the optimizer state is plain tensors and numbers
    torch.load(tmp_path / "a" / "checkpoints" / "step-2" / "optimizer.pt", weights_only=True)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_save_and_resume(stage, tiny_config, pairs_file, tmp_path):
    ds = tmp_path / "ds.json"  # no persistence threshold: even tiny tensors are partitioned
    ds.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    kw = dict(zero_stage=stage, deepspeed_config=str(ds), max_steps=3, save_every=1, preview_every=3,
              keep_checkpoints=0)
    run(tiny_config, pairs_file, tmp_path / "a", **kw)
    run(tiny_config, pairs_file, tmp_path / "b", stop_after=2, **kw)
    run(tiny_config, pairs_file, tmp_path / "b", resume=True, **kw)
    assert_close(final_weights(tmp_path / "b"), final_weights(tmp_path / "a"), 1e-6)
    ckpt = load_file(str(tmp_path / "a" / "checkpoints" / "step-1" / "trainable.safetensors"))
    assert ckpt["adapter.weight"].shape == final_weights(tmp_path / "a")["adapter.weight"].shape
    assert (tmp_path / "a" / "previews" / "step-3.png").is_file()


def test_lora_run_saves_peft_adapters_that_reload(tiny_config, pairs_file, tmp_path):
    from lm4lv_core.model.lm4lv import LM4LV

    cfg = dataclasses.replace(tiny_config, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.1))
    run(cfg, pairs_file, tmp_path / "a", max_steps=3, stop_after=2, lr=1e-2)
    run(cfg, pairs_file, tmp_path / "a", max_steps=3, resume=True, lr=1e-2)
    run(cfg, pairs_file, tmp_path / "b", max_steps=3, lr=1e-2)
    final = tmp_path / "a" / "final"
    assert (final / "lora" / "adapter_model.safetensors").is_file()
    assert_close(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"), 1e-6)  # dropout RNG restored
    model = LM4LV.from_pretrained(final)
    lora = {k: v for k, v in model.trainable_state_dict().items() if "lora_B" in k}
    assert lora and all(v.abs().max() > 0 for v in lora.values())  # trained (lora_B starts at zero)
    saved = load_file(str(final / "lora" / "adapter_model.safetensors"))
    assert len([k for k in saved if "lora_B" in k]) == len(lora)


def _text_samples(pairs_file: Path, mixed: bool) -> Path:
    data = json.loads(pairs_file.read_text())
    out = []
    for i, s in enumerate(data):
        if mixed and i % 2:
            out.append(s)
        else:
            out.append({"image": [s["image"][1]], "task_type": "conversation",
                        "conversations": [{"from": "human", "value": "<image>\n"},
                                          {"from": "gpt", "value": "A picture of a cat sitting on a wooden table ."}]})
    path = pairs_file.with_name("mixed.json" if mixed else "caption.json")
    path.write_text(json.dumps(out))
    return path


def test_captioning_trains_text_alone_and_mixed_trains_both(tiny_config, pairs_file, tmp_path):
    cap = _text_samples(pairs_file, mixed=False)
    run(tiny_config, cap, tmp_path / "cap", max_steps=3, lr=1e-2, lr_schedule="constant")
    rows = metrics(tmp_path / "cap")
    assert all(float(r["vision_loss"]) == 0 for r in rows)
    assert float(rows[-1]["text_loss"]) < float(rows[0]["text_loss"])
    assert not list((tmp_path / "cap").glob("previews/*.png"))  # nothing to preview without image answers
    mixed = _text_samples(pairs_file, mixed=True)
    run(tiny_config, mixed, tmp_path / "mixed", max_steps=2, micro_batch=4)
    rows = metrics(tmp_path / "mixed")
    assert all(float(r["vision_loss"]) > 0 and float(r["text_loss"]) > 0 for r in rows)


def test_cache_features_gives_the_same_losses(tiny_config, pairs_file, tmp_path):
    run(tiny_config, pairs_file, tmp_path / "a", max_steps=2)
    run(tiny_config, pairs_file, tmp_path / "b", max_steps=2, cache_features=True)
    for ra, rb in zip(metrics(tmp_path / "a"), metrics(tmp_path / "b")):
        assert abs(float(ra["loss"]) - float(rb["loss"])) < 1e-4
    assert_close(final_weights(tmp_path / "b"), final_weights(tmp_path / "a"), 1e-5)
    with pytest.raises(ConfigError, match="frozen encoder"):
        run(dataclasses.replace(tiny_config, train_encoder=True), pairs_file, tmp_path / "c", cache_features=True)
    assert not (tmp_path / "c").exists()


def test_invalid_data_stops_before_any_worker_starts(tiny_config, pairs_file, tmp_path):
    (pairs_file.parent / "lq" / "1.png").write_bytes(b"broken")
    (pairs_file.parent / "hq" / "3.png").unlink()
    with pytest.raises(DataError) as e:
        run(tiny_config, pairs_file, tmp_path / "run", nproc=2)
    assert "sample 1" in str(e.value) and "sample 3" in str(e.value)
    assert not (tmp_path / "run").exists()


def test_overwrite_keeps_user_files(tiny_config, pairs_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--resume"):
        run(tiny_config, pairs_file, out, max_steps=1)
    run(tiny_config, pairs_file, out, max_steps=1, overwrite=True)
    run(tiny_config, pairs_file, out, max_steps=1, overwrite=True, save_every=1)
    assert (out / "notes.txt").read_text() == "mine" and (out / "final").is_dir()
    assert [r["step"] for r in metrics(out)] == ["1"]
