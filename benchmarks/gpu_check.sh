#!/usr/bin/env bash
# The paper's configuration measured on a CUDA machine, with random weights of the full shape
# (a Llama-2-7B-shaped LLM, 32 layers, and an MAE-Large, bf16); no real weights are needed.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: gpu-check)
#
# Runs, one after the other (each step's stdout/stderr in OUT_DIR/logs/):
#   1. scale:       python benchmarks/scale.py --layers 32 (micro-batch 4: load, step, plan vs measured)
#   2. train_mb16:  the same at micro-batch 16: one training step with and without
#                   --gradient-checkpointing, one process
#   3. zero2_*:     with two or more GPUs, lm4lv train on 2 processes, DeepSpeed ZeRO-2, micro-batch 16,
#                   with and without --gradient-checkpointing (3 steps)
#   4. restore:     python benchmarks/generate.py on the same LLM and MAE: image restoration at batch
#                   1, 8 and 32, eager and with torch.compile (generate --compile)
# and writes OUT_DIR/gpu_check.json: images/s and visual tokens/s per sample, step times, peak memory
# per rank (torch.cuda.max_memory_allocated from LM4LV_MEMORY_REPORT, and nvidia-smi's peak per GPU),
# the memory plan next to each measurement, and the decode bandwidth bound to compare with. A step that
# fails is recorded with its exit code and the rest still runs; the exit code is 1 if any failed.
#
# Environment: PYTHON (default: python), MODELS (the folder holding llm/ and mae/, default: the
# models scale.py keeps in OUT_DIR/scale/models), LAYERS (default 32), STEPS (ZeRO-2 steps, 3),
# BATCH_SIZES (restoration, default 1,8,32), RESTORE_ARGS (more options of benchmarks/generate.py).
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU (two CPU workers for the ZeRO-2 step): a smoke
# test of this script, not a measurement.
set -euo pipefail

OUT=${1:-gpu-check}
PY=${PYTHON:-python}
LAYERS=${LAYERS:-32}
STEPS=${STEPS:-3}
BATCH_SIZES=${BATCH_SIZES:-1,8,32}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT/logs" "$OUT/reports"
OUT=$(cd "$OUT" && pwd)
MODELS=${MODELS:-$OUT/scale/models}

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$DEVICE" = cpu ]; then
    NGPU=2  # two CPU workers for the ZeRO-2 step
    export DS_ACCELERATOR=cpu
elif [ "$NGPU" -lt 1 ]; then
    echo "error: benchmarks/gpu_check.sh needs a CUDA GPU (torch sees none)" >&2
    exit 2
fi

# GPU memory of every device, sampled every 200 ms for the whole check
SMI_PID=""
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 \
        | while IFS= read -r line; do printf '%s,%s\n' "$(date +%s.%N)" "$line"; done \
        > "$OUT/logs/nvidia-smi.csv" &
    SMI_PID=$!
fi
cleanup() { [ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null || true; }
trap cleanup EXIT

: > "$OUT/logs/steps.tsv"
FAILED=0
# step NAME CMD...: run CMD with its output in logs/NAME.{out,err}; record start, end and exit code
step() {
    local name=$1 rc=0 t0
    shift
    t0=$(date +%s.%N)
    echo "[gpu_check] $name: $*" >&2
    "$@" > "$OUT/logs/$name.out" 2> "$OUT/logs/$name.err" || rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$t0" "$(date +%s.%N)" "$rc" >> "$OUT/logs/steps.tsv"
    if [ "$rc" -ne 0 ]; then
        FAILED=1
        echo "[gpu_check] $name failed (exit $rc), see $OUT/logs/$name.err" >&2
    fi
}

step scale "$PY" "$ROOT/benchmarks/scale.py" --layers "$LAYERS" --out "$OUT/scale"
step train_mb16 "$PY" "$ROOT/benchmarks/scale.py" --layers "$LAYERS" --micro-batch 16 --out "$OUT/scale"

if [ ! -f "$MODELS/llm/config.json" ] || [ ! -f "$MODELS/mae/config.json" ]; then
    echo "error: no llm/ and mae/ model folders in $MODELS (set MODELS=...)" >&2
    FAILED=1
else
    DATA=$OUT/data/train.json  # 32 synthetic 224 px restoration pairs
    "$PY" -c "import sys; sys.path.insert(0, '$ROOT/benchmarks'); from pathlib import Path; \
from train_step import write_data; write_data(Path('$OUT/data'), n=32, size=224)"
    if [ "$NGPU" -ge 2 ]; then
        for mode in plain checkpointing; do
            extra=()
            [ "$mode" = checkpointing ] && extra=(--gradient-checkpointing)
            step "zero2_$mode" env LM4LV_MEMORY_REPORT="$OUT/reports/zero2_$mode" \
                "$PY" -m lm4lv_cli.app train --data "$DATA" --llm "$MODELS/llm" --mae "$MODELS/mae" \
                --out "$OUT/runs/zero2_$mode" --overwrite --nproc 2 --zero-stage 2 --precision bf16 \
                --micro-batch 16 --max-steps "$STEPS" --warmup-ratio 0 --save-every 100000 \
                --preview-every 100000 ${extra[@]+"${extra[@]}"}
        done
    fi
    # shellcheck disable=SC2086  # RESTORE_ARGS holds several options
    step restore "$PY" "$ROOT/benchmarks/generate.py" --device "$DEVICE" --precision bf16 --llm "$MODELS/llm" \
        --mae "$MODELS/mae" --batch-sizes "$BATCH_SIZES" --repeats 3 ${RESTORE_ARGS:-}
fi
cleanup

"$PY" - "$OUT" "$NGPU" "$DEVICE" <<'PYEOF'
"""Assemble OUT/gpu_check.json from the steps' outputs."""
import csv
import json
import sys
from pathlib import Path

out, ngpu, device = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


def last_json(text):
    """The last JSON object printed on stdout (it may span several lines)."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    return None


steps = {}
for row in csv.reader((out / "logs" / "steps.tsv").read_text().splitlines(), delimiter="\t"):
    name, t0, t1, rc = row
    steps[name] = {"start": float(t0), "end": float(t1), "exit_code": int(rc), "seconds": round(float(t1) - float(t0), 1)}

smi = []  # (time, gpu, MiB used)
smi_file = out / "logs" / "nvidia-smi.csv"
if smi_file.is_file():
    for line in smi_file.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            try:
                smi.append((float(parts[0]), int(parts[1]), float(parts[2])))
            except ValueError:
                pass


def smi_peaks(step):
    peaks = {}
    for t, gpu, mib in smi:
        if step["start"] <= t <= step["end"]:
            peaks[gpu] = max(peaks.get(gpu, 0.0), mib)
    return {f"gpu{g}": round(v / 1024, 2) for g, v in sorted(peaks.items())}


result = {"device": device, "gpus": ngpu, "steps": {}}
try:
    import torch

    result["torch"] = torch.__version__
    result["gpu"] = torch.cuda.get_device_name(0) if device == "cuda" else None
    if device == "cuda":
        result["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
except Exception as e:  # noqa: BLE001
    result["gpu"] = f"unknown ({e})"

for name, info in steps.items():
    entry = {k: v for k, v in info.items() if k not in ("start", "end")}
    entry["nvidia_smi_peak_gib"] = smi_peaks(info)
    stdout = out / "logs" / f"{name}.out"
    parsed = last_json(stdout.read_text()) if stdout.is_file() else None
    if parsed is not None:
        entry["result"] = parsed
    if info["exit_code"] != 0:
        err = out / "logs" / f"{name}.err"
        entry["error_tail"] = err.read_text()[-2000:] if err.is_file() else ""
    result["steps"][name] = entry

# ZeRO-2 runs: step times (metrics.csv) and per-rank peak memory (the workers' memory reports)
for mode in ("plain", "checkpointing"):
    name = f"zero2_{mode}"
    if name not in result["steps"]:
        continue
    entry = result["steps"][name]
    metrics = out / "runs" / name / "metrics.csv"
    if metrics.is_file():
        rows = list(csv.DictReader(metrics.read_text().splitlines()))
        entry["step_s"] = [round(32 / float(r["samples/s"]), 3) for r in rows]  # 2 ranks x micro-batch 16
    ranks = {}
    for f in sorted((out / "reports" / name).glob("train-rank*.json")):
        rep = json.loads(f.read_text())
        ranks[f.stem.split("-")[-1]] = rep.get("step", {})
    entry["ranks"] = {r: {"max_memory_allocated_gib": round(s["max_memory_allocated"] / 2**30, 2)}
                      for r, s in ranks.items() if "max_memory_allocated" in s}
    try:  # the memory plan of the same run, next to the measurement
        from lm4lv_core.data.format import load_samples
        from lm4lv_core.engine.options import resolve_options
        from lm4lv_core.model.memplan import plan_training

        import yaml

        cfg = yaml.safe_load((out / "runs" / name / "config.yaml").read_text())
        opts = {"data": cfg["train"]["data"], "out": "-", "llm": cfg["model"]["llm"],
                "mae": cfg["model"]["encoder"]["kwargs"]["path"], "precision": "bf16", "micro_batch": 16,
                "nproc": 2, "zero_stage": 2, "gradient_checkpointing": mode == "checkpointing"}
        plan = plan_training(*resolve_options(opts), load_samples(cfg["train"]["data"]))
        entry["plan_vs_measured"] = [
            {"config": f"ZeRO-2, 2 ranks, micro-batch 16, {mode}, rank {r}", "estimate_bytes": int(plan.total),
             "measured_bytes": int(s["max_memory_allocated"]), "ratio": round(plan.total / s["max_memory_allocated"], 3)}
            for r, s in ranks.items() if "max_memory_allocated" in s]
    except Exception as e:  # noqa: BLE001 - the plan is optional next to the measurement
        entry["plan_error"] = f"{type(e).__name__}: {e}"

# the bandwidth bound of one decode step: every bf16 weight of the LLM read once
restore = result["steps"].get("restore", {}).get("result")
if restore:
    weight_bytes = 2 * restore["llm"]["params"]
    n = restore["visual_tokens"]
    bound = {"llm_bf16_weight_bytes": weight_bytes, "visual_tokens": n,
             "h100_sxm_bandwidth_bytes_per_s": 3.35e12,
             "h100_min_step_s": round(weight_bytes / 3.35e12, 5),
             "h100_min_image_batch_s": round(n * weight_bytes / 3.35e12, 3)}
    for row in restore.get("throughput", []):
        for key in ("eager", "compiled"):
            if f"{key}_s" in row:
                row[f"{key}_step_s"] = round(row[f"{key}_s"] / n, 5)
    result["decode_bandwidth_bound"] = bound

result["failed_steps"] = [k for k, v in result["steps"].items() if v["exit_code"] != 0]
(out / "gpu_check.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
PYEOF

exit "$FAILED"
