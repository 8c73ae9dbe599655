"""Training-step benchmark on a small preset; prints one JSON object.

    python benchmarks/train_step.py [--preset tiny-224] [--micro-batch 4] [--steps 12]

* ``step_s``: median optimizer step of a real ``lm4lv train`` run (one in-process DeepSpeed
  worker, fp32), from its ``metrics.csv`` (first two steps skipped);
* ``llm_fwd_bwd_s``: median forward + backward of the bare frozen LLM (inputs_embeds with
  gradient, no LoRA) at the same batch size and sequence length;
* ``overhead_ratio`` = ``step_s / llm_fwd_bwd_s`` (everything LM4LV adds: encoder, adapters,
  losses, optimizer, engine); ``overhead_ratio_cached`` the same with ``--cache-features``;
* ``cache_features_speedup`` = ``step_s / step_s_cached``;
* ``peak_rss_mb``, ``trainable_param_count`` and ``optimizer_param_count`` (equal when the
  optimizer holds exactly the trainable parameters).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_data(root: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        yy, xx = np.mgrid[0:size, 0:size] / size
        clean = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy))], -1) * 0.5 + 0.5
        noisy = np.clip(clean + rng.normal(0, 0.15, clean.shape), 0, 1)
        for name, arr in (("hq", clean), ("lq", noisy)):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray((arr * 255).astype(np.uint8)).save(root / name / f"{i}.png")
        samples.append({"image": [f"lq/{i}.png", f"hq/{i}.png"], "task_type": "conversation",
                        "conversations": [{"from": "human", "value": "<image> <task>"},
                                          {"from": "gpt", "value": "<image>"}]})
    (root / "train.json").write_text(json.dumps(samples))
    return root / "train.json"


def median_step(run_dir: Path, batch: int) -> float:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))[2:]
    return statistics.median(batch / float(r["samples/s"]) for r in rows)


def llm_fwd_bwd(model_cfg, batch: int, seq_len: int, reps: int) -> float:
    import torch

    from lm4lv_core.model.loading import load_llm

    llm, _ = load_llm(model_cfg.llm)
    llm.requires_grad_(False)
    backbone = llm.get_decoder()
    d = llm.get_input_embeddings().embedding_dim
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    times = []
    for _ in range(reps + 2):
        x = torch.randn(batch, seq_len, d, requires_grad=True)
        t0 = time.perf_counter()
        h = backbone(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
        h.float().pow(2).mean().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny-224")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()

    from lm4lv_core.data.format import load_samples
    from lm4lv_core.engine.config import TrainConfig
    from lm4lv_core.jobs.train import train
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.sources.presets import preset_config

    model_cfg = preset_config(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = LM4LV.from_config(model_cfg).encoder.image_size
        data = write_data(tmp / "data", n=2 * args.micro_batch, size=size)
        common = dict(data=str(data), micro_batch=args.micro_batch, max_steps=args.steps,
                      save_every=10**6, preview_every=10**6, warmup_ratio=0.0)
        train(TrainConfig(out=str(tmp / "plain"), **common), model_cfg)
        train(TrainConfig(out=str(tmp / "cached"), cache_features=True, **common), model_cfg)
        step_s = median_step(tmp / "plain", args.micro_batch)
        step_cached = median_step(tmp / "cached", args.micro_batch)
        info = json.loads((tmp / "plain" / "run.json").read_text())
        model = LM4LV.from_config(model_cfg)
        from lm4lv_core.data.dataset import LM4LVDataset

        ds = LM4LVDataset(load_samples(data), model.builder, size)
        seq_len = max(len(ds[i].encoded) for i in range(len(ds)))
        del model
    llm_s = llm_fwd_bwd(model_cfg, args.micro_batch, seq_len, reps=args.steps)
    print(json.dumps({
        "preset": args.preset, "micro_batch": args.micro_batch, "seq_len": seq_len,
        "step_s": round(step_s, 5), "llm_fwd_bwd_s": round(llm_s, 5),
        "overhead_ratio": round(step_s / llm_s, 3),
        "step_s_cached": round(step_cached, 5), "overhead_ratio_cached": round(step_cached / llm_s, 3),
        "cache_features_speedup": round(step_s / step_cached, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "trainable_param_count": info["trainable_param_count"],
        "optimizer_param_count": info["optimizer_param_count"],
    }, indent=2))


if __name__ == "__main__":
    sys.exit(main())
