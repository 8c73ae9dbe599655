"""The paper's widths through the real commands, and the memory plan checked against them.

    python benchmarks/scale.py [--layers 2] [--micro-batch 4] [--precision bf16|fp32] [--out DIR]

Builds, offline, random models of the paper's widths as real Hugging Face folders (bfloat16
safetensors): a Llama with hidden 4096, MLP 11008, 32 heads, vocab 32000 and ``--layers`` layers,
and an MAE-Large (width 1024, 24 layers, 224 px, 16 px patches: 197 tokens; decoder 512 wide,
8 layers). Then runs, as subprocesses, ``lm4lv train`` for 2 steps without and with
``--gradient-checkpointing`` and ``lm4lv generate`` of one image in bf16, every worker measuring
itself (``LM4LV_MEMORY_REPORT``, see ``lm4lv_core/util/memreport.py``), and prints one JSON object
(the last thing on stdout):

* ``params`` (LLM, encoder, decoder, trainable) and ``bytes_by_dtype`` of the model as loaded by
  ``generate --precision bf16`` and by ``train``;
* ``frozen_params_not_bf16``: frozen parameters not in bfloat16 after the bf16 load (0);
* ``load_peak_rss_over_bf16_weights``: rise of peak RSS while ``generate`` loads the model, over
  the bfloat16 size of all its parameters;
* ``step_s``: time of the second training step with and without checkpointing (``metrics.csv``);
* ``activation_bytes`` kept for the backward without / with checkpointing and their ratio
  ``activation_ratio``;
* ``plan_vs_measured``: the plan's estimate (``lm4lv_core.model.memplan``, the plan of
  ``lm4lv train --dry-run``) next to each measurement, with ``ratio`` = estimate / measured;
* ``paper_plan``: the plan of the full paper configuration (32 layers, micro-batch 16, bf16,
  ZeRO-1 and ZeRO-2) on 4 × 80 GB and 8 × 24 GB, planned from a configuration-only folder.

``--precision`` (of the training runs) defaults to bf16 on a GPU and fp32 on a CPU: a CPU without
bf16 matrix instructions (AVX512-BF16 / AMX) runs the bf16 backward's matrix products around
100× slower than fp32, hours per step at these widths. The bf16 load is still measured by
``generate``. On a CPU the step is measured with the profiler's allocator events, on a GPU with
``torch.cuda.max_memory_allocated`` (then ``plan_vs_measured`` also compares the whole rank).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import write_data  # noqa: E402  (the benchmarks' synthetic restoration pairs)

LLAMA = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
             num_key_value_heads=32, max_position_embeddings=4096)
MAE_LARGE = dict(image_size=224, patch_size=16, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=4096, decoder_hidden_size=512, decoder_num_hidden_layers=8,
                 decoder_num_attention_heads=16, decoder_intermediate_size=2048, mask_ratio=0.0, norm_pix_loss=False)


def log(msg: str) -> None:
    print(f"[scale] {msg}", file=sys.stderr, flush=True)


def build_folders(root: Path, layers: int, weights: bool = True) -> tuple[Path, Path]:
    """``root/llm`` and ``root/mae`` (reused when already built with the same shape); without
    ``weights`` only configs and tokenizer (enough for planning)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, ViTMAEConfig, ViTMAEForPreTraining

    from lm4lv_core.sources.presets import build_tokenizer

    llm, mae = root / "llm", root / "mae"
    stamp = root / "shape.json"
    shape = {"layers": layers, "weights": weights, **LLAMA}
    if stamp.is_file() and json.loads(stamp.read_text()) == shape:
        return llm, mae
    tok = build_tokenizer(llm)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    llm_cfg = LlamaConfig(num_hidden_layers=layers, **LLAMA, **ids)
    mae_cfg = ViTMAEConfig(**MAE_LARGE)
    if not weights:
        llm_cfg.save_pretrained(llm)
        mae_cfg.save_pretrained(mae)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        for cls, cfg, path in ((LlamaForCausalLM, llm_cfg, llm), (ViTMAEForPreTraining, mae_cfg, mae)):
            t = time.perf_counter()
            with torch.device(device):
                model = cls._from_config(cfg, dtype=torch.bfloat16)
            model.save_pretrained(path)
            log(f"built {path.name}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params "
                f"in {time.perf_counter() - t:.0f} s")
            del model
    stamp.write_text(json.dumps(shape))
    return llm, mae


def write_generation_data(train_json: Path) -> Path:
    """One restoration prompt (the degraded image of the first training pair, empty answer)."""
    first = json.loads(train_json.read_text())[0]
    sample = {"image": first["image"][:1], "task_type": "conversation",
              "conversations": [{"from": "human", "value": "<image> <task>"}, {"from": "gpt", "value": ""}]}
    path = train_json.with_name("test.json")
    path.write_text(json.dumps([sample]))
    return path


def lm4lv(args: list[str], report: Path) -> float:
    """Run ``lm4lv ARGS`` with the memory report switched on; returns its wall time."""
    env = dict(os.environ, LM4LV_MEMORY_REPORT=str(report))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lm4lv_cli.app", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"lm4lv {args[0]} failed (exit {proc.returncode})")
    return time.perf_counter() - t


def step_seconds(run: Path, batch: int) -> list[float]:
    with open(run / "metrics.csv", newline="") as f:
        return [round(batch / float(r["samples/s"]), 3) for r in csv.DictReader(f)]


def entry(config: str, estimate: float, measured: float) -> dict:
    return {"config": config, "estimate_bytes": int(estimate), "measured_bytes": int(measured),
            "ratio": round(estimate / measured, 3)}


def plan_summary(plan) -> dict:
    from lm4lv_core.model.memplan import GiB

    r = plan.run
    return {"world": r.world, "zero_stage": r.zero_stage, "precision": r.precision, "micro_batch": r.micro_batch,
            "seq_len": plan.data.seq_len, "gpu_gib": round(plan.gpu_memory / GiB, 1),
            "gradient_checkpointing": r.gradient_checkpointing,
            "rows_gib": {k: round(v / GiB, 3) for k, v in plan.states.items()}
            | {"activations_saved": round(plan.activations["saved"] / GiB, 3),
               "activations_peak": round(plan.activations["peak"] / GiB, 3),
               "inputs": round(plan.activations["inputs"] / GiB, 3)},
            "total_gib": round(plan.total / GiB, 2), "fits": plan.fits, "max_micro_batch": plan.max_micro_batch,
            "total_gib_other_checkpointing": round(plan.total_other / GiB, 2),
            "max_micro_batch_other_checkpointing": plan.max_micro_batch_other}


def paper_plans(root: Path, data: Path) -> dict:
    """The full paper configuration, planned from configs only (no weights written or read)."""
    from lm4lv_core.data.format import load_samples
    from lm4lv_core.engine.config import TrainConfig
    from lm4lv_core.model.memplan import plan_training
    from lm4lv_core.model.options import resolve_model_config

    llm, mae = build_folders(root, 32, weights=False)
    model = resolve_model_config(llm=str(llm), mae=str(mae))
    samples = load_samples(data)
    out = {}
    for world, gib in ((4, 80), (8, 24)):
        for stage in (1, 2):
            for ckpt in (False, True):
                cfg = TrainConfig(data=str(data), out="-", nproc=world, zero_stage=stage, precision="bf16",
                                  micro_batch=16, gradient_checkpointing=ckpt)
                t = time.perf_counter()
                plan = plan_training(cfg, model, samples, gib)
                key = f"{world}x{gib}GB_zero{stage}" + ("_checkpointing" if ckpt else "")
                out[key] = plan_summary(plan) | {"plan_seconds": round(time.perf_counter() - t, 2)}
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None)
    ap.add_argument("--out", type=Path, default=None, help="work folder (kept; models are reused) [a temporary one]")
    return ap.parse_args()


def prepare_data(work: Path, micro_batch: int) -> tuple[Path, Path]:
    """The training pairs (two steps' worth, reused when present) and the generation prompt."""
    data_dir = work / "data"
    train_json = data_dir / "train.json"
    if not train_json.is_file():
        write_data(data_dir, n=2 * micro_batch, size=MAE_LARGE["image_size"])
    return train_json, write_generation_data(train_json)


def measure_training(args, work: Path, precision: str, llm: Path, mae: Path, train_json: Path,
                     wall: dict) -> tuple[dict, dict]:
    """``lm4lv train`` for 2 steps without and with ``--gradient-checkpointing``: each run's
    memory report and the memory plan of the same options."""
    from lm4lv_core.data.format import load_samples
    from lm4lv_core.jobs.train import resolve_options
    from lm4lv_core.model.memplan import plan_training

    samples = load_samples(train_json)
    common = ["--data", str(train_json), "--llm", str(llm), "--mae", str(mae), "--precision", precision,
              "--micro-batch", str(args.micro_batch), "--max-steps", "2", "--warmup-ratio", "0",
              "--save-every", "1000", "--preview-every", "1000", "--overwrite"]
    runs, plans = {}, {}
    for name, extra in (("plain", []), ("checkpointing", ["--gradient-checkpointing"])):
        log(f"train {name} ({precision}, micro-batch {args.micro_batch}, {args.layers} layers)")
        wall[name] = lm4lv(["train", *common, "--out", str(work / "runs" / name), *extra], work / "reports" / name)
        runs[name] = json.loads((work / "reports" / name / "train-rank0.json").read_text())
        opts = {"data": str(train_json), "out": "-", "llm": str(llm), "mae": str(mae), "precision": precision,
                "micro_batch": args.micro_batch, "gradient_checkpointing": bool(extra)}
        plans[name] = plan_training(*resolve_options(opts), samples)
    return runs, plans


def measure_generate(work: Path, test_json: Path, wall: dict) -> dict:
    """``lm4lv generate`` of one image in bf16 from the plain run: its load report."""
    log("generate one image (bf16)")
    gen_dir = work / "generated"
    wall["generate"] = lm4lv(["generate", "--run", str(work / "runs" / "plain"), "--data", str(test_json),
                              "--out", str(gen_dir), "--precision", "bf16", "--batch-size", "1", "--overwrite"],
                             work / "reports" / "generate")
    return json.loads((work / "reports" / "generate" / "generate-rank0.json").read_text())["load"]


def plan_vs_measured(args, precision: str, runs: dict, plans: dict, gen: dict) -> list[dict]:
    """The plan's estimates next to the measured training steps and generate's loaded parameters."""
    plan = plans["plain"]
    comparisons = []
    for name in ("plain", "checkpointing"):
        step, p = runs[name]["step"], plans[name]
        label = f"train {precision} micro-batch {args.micro_batch} {args.layers} layers, {name}"
        comparisons.append(entry(f"{label}: activations kept for backward", p.activations["saved"],
                                 step["activation_bytes"]))
        comparisons.append(entry(f"{label}: step peak above the step's start", p.activations["peak"],
                                 step["peak_bytes"]))
        if "max_memory_allocated" in step:
            comparisons.append(entry(f"{label}: whole rank (max_memory_allocated)", p.total, step["max_memory_allocated"]))
    gen_plan = sum(v for part in gen["param_bytes"].values() for v in part.values())
    comparisons.append(entry("generate bf16: parameter bytes of the loaded model",
                             2 * sum(plan.model.frozen.values()) + 2 * sum(plan.model.trainable.values()), gen_plan))
    return comparisons


def main() -> None:
    import torch

    args = parse_args()
    cuda = torch.cuda.is_available()
    precision = args.precision or ("bf16" if cuda else "fp32")
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="lm4lv-scale-")
    work = Path(args.out or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)

    llm, mae = build_folders(work / "models", args.layers)
    train_json, test_json = prepare_data(work, args.micro_batch)
    wall: dict[str, float] = {}
    runs, plans = measure_training(args, work, precision, llm, mae, train_json, wall)
    gen = measure_generate(work, test_json, wall)

    plan = plans["plain"]
    params = {**{k: v for k, v in plan.model.frozen.items()}, "trainable": sum(plan.model.trainable.values())}
    bf16_weights = 2 * gen["params"]
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "precision": precision, "layers": args.layers,
        "micro_batch": args.micro_batch, "seq_len": plan.data.seq_len, "params": params,
        "bytes_by_dtype": {"generate_bf16": gen["param_bytes"], "train": runs["plain"]["load"]["param_bytes"],
                           "train_after_engine": runs["plain"]["engine"]["param_bytes"]},
        "frozen_params_not_bf16": gen["frozen_params_not_compute_dtype"],
        "load_peak_rss_over_bf16_weights": round((gen["peak_rss"] - gen["rss_before"]) / bf16_weights, 3),
        "load_rss": {"before": gen["rss_before"], "peak": gen["peak_rss"], "bf16_weights": bf16_weights,
                     "peak_reset": gen["peak_reset"], "seconds": round(gen["seconds"], 1)},
        "step_s": {name: step_seconds(work / "runs" / name, args.micro_batch) for name in runs},
        "peak_rss_during_step": {name: runs[name]["step"]["peak_rss"] for name in runs},
        "activation_bytes": {name: runs[name]["step"]["activation_bytes"] for name in runs},
        "activation_ratio": round(runs["plain"]["step"]["activation_bytes"]
                                  / runs["checkpointing"]["step"]["activation_bytes"], 2),
        "plan_vs_measured": plan_vs_measured(args, precision, runs, plans, gen),
        "command_wall_s": {k: round(v, 1) for k, v in wall.items()},
        "paper_plan": paper_plans(work / "paper-config", train_json),
    }
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
