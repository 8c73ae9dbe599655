"""Generation benchmark: the reference algorithm against KV-cached, batched generation.

Prints one JSON object. The model has the real MAE geometry (224 px, 16 px patches: 197 visual
tokens, from the ``tiny-224`` preset's MAE) and a random Llama whose width is chosen so the naive
path takes under a minute on two CPU cores:

* ``naive_s``: batch 1, the whole sequence recomputed for each of the 197 visual tokens;
* ``cached_s``: the same sample with ``lm4lv_core.model.generate`` (KV cache, one embedding per step);
  ``speedup = naive_s / cached_s``; ``max_abs_diff`` between the two feature sets;
* ``llm_decode_s``: the same LLM's own KV-cached ``generate`` of 197 greedy tokens from a prompt of
  the same length; ``overhead_vs_llm_decode = cached_s / llm_decode_s``;
* ``batch8_vs_batch1_throughput``: samples per second with batch 8 (mixed prompt lengths) over
  batch 1;
* ``compiled_s``: the batch-1 sample with the decode step under ``torch.compile`` (``generate
  --compile``; static KV cache), after a first call that compiles (``compile_s``);
  ``compiled_vs_eager = cached_s / compiled_s``; ``compiled_max_abs_diff`` against the eager
  features;
* ``throughput``: per ``--batch-sizes`` entry, eager (and compiled) seconds per batch, images/s and
  visual tokens/s per sample;
* ``query_s`` / ``query_batch8_s``: the same model (it holds a learnable query) reading the images
  of the same prompts from its N query slots in one forward pass (``<query>``), batch 1 and 8;
  ``query_vs_cached = cached_s / query_s`` and ``query_vs_cached_batch8 = batch8_s / query_batch8_s``
  (measured interleaved with the cached runs, in the same process).

Usage: ``python benchmarks/generate.py [--threads 1] [--device cuda --precision bf16]``. On a CPU
shared with other work, ``--threads 1`` gives stable timings (two OpenMP threads on two busy cores
spend most of their time waiting for each other). The paper's shape on a GPU:
``--hidden 4096 --layers 32 --heads 32 --intermediate 11008 --vocab 32000 --mae MAE_LARGE_FOLDER``
(or ``--llm FOLDER`` for an LLM folder already built, e.g. by ``benchmarks/scale.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = [
    "<image> <task>",
    "Restore the image <image> <task> please: remove the noise, the blur and the rain",
    "<task> <image>",
    "a cat <image> <task>",
    "<image> <task> the quick brown fox jumps over the lazy dog 0123456789",
    "Restore <image> <task>",
    "<image>\n<task>",
    "olive oil <task> <image> is a healthy ingredient",
]


def build_llm(hidden: int, layers: int, heads: int, intermediate: int, vocab: int | None = None) -> Path:
    """A random Llama with the presets' tokenizer, built once under ``$LM4LV_HOME/bench``
    (``vocab``: embedding rows, at least the tokenizer's; e.g. Llama-2's 32000)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lm4lv_core.sources.presets import build_tokenizer, preset_home

    name = f"llama-h{hidden}-l{layers}-a{heads}-i{intermediate}" + (f"-v{vocab}" if vocab else "")
    out = preset_home().parent / "bench" / name
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    tok = build_tokenizer(out)
    cfg = LlamaConfig(vocab_size=max(len(tok), vocab or 0), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    return out


@torch.no_grad()
def scale_adapter_to_embeddings(model, pixels: torch.Tensor) -> float:
    """Scale the random adapter so its outputs have the spread of the LLM's token embeddings, as
    a trained adapter's do. Left at its default init, a wide random model feeds inputs ~20x
    larger than any embedding back into itself, and that loop amplifies float rounding
    exponentially over 197 steps, so no two exact algorithms could agree on its features."""
    emb_std = model.llm.get_input_embeddings().weight.float().std()
    scale = float(emb_std / model.adapter(model.encode_images(pixels).to(model.adapter_dtype)).float().std())
    model.adapter.weight.mul_(scale)
    model.adapter.bias.mul_(scale)
    return scale


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each fast measurement (median)")
    ap.add_argument("--llm", default=None, help="LLM folder to use instead of building one (its own widths)")
    ap.add_argument("--mae", default=None, help="MAE folder (default: the tiny-224 preset's)")
    ap.add_argument("--vocab", type=int, default=None, help="LLM vocabulary size (default: the tokenizer's)")
    ap.add_argument("--batch-sizes", default="1,8", help="batch sizes of the throughput table")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    ap.add_argument("--skip-naive", action="store_true", help="skip the naive reference algorithm")
    return ap.parse_args()


def build_model(args, device: torch.device, dtype: torch.dtype):
    """The benchmark model on ``device`` in ``dtype`` (its adapter scaled to the embeddings) and
    the generation items of the eight ``PROMPTS``, each with a random image."""
    from PIL import Image

    from lm4lv_core.config import ModelConfig, ModuleSpec
    from lm4lv_core.data.format import parse_sample
    from lm4lv_core.model.generate import build_items
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.sources.presets import preset_config

    mae = preset_config("tiny-224")
    encoder, decoder = mae.encoder, mae.decoder
    if args.mae:
        encoder = decoder = ModuleSpec("mae", {"path": str(Path(args.mae).resolve())})
    llm = Path(args.llm).resolve() if args.llm else build_llm(args.hidden, args.layers, args.heads,
                                                              args.intermediate, args.vocab)
    torch.manual_seed(0)
    # frozen weights read in the compute dtype; the adapters are scaled, then cast, below; the model
    # holds a learnable query (<query>) for the one-pass measurements
    model = LM4LV.from_config(ModelConfig(llm=str(llm), encoder=encoder, decoder=decoder, query=True), dtype,
                              trainable_dtype=torch.float32)
    model.eval()

    rng = np.random.default_rng(0)
    size = model.encoder.image_size
    images = {f"mem:{i}": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for i in range(8)}
    samples = [parse_sample({"image": [f"mem:{i}"], "conversations": [{"from": "human", "value": p},
                                                                      {"from": "gpt", "value": ""}]}, i)
               for i, p in enumerate(PROMPTS)]
    items, _ = build_items(model, samples, "image", loader=lambda p: images[p], query=False)
    query_items, _ = build_items(model, samples, "image", loader=lambda p: images[p], query=True)
    scale_adapter_to_embeddings(model, items[0].pixels)
    return model.to(device, dtype), items, query_items


def batch_of(model, items, device: torch.device, dtype: torch.dtype):
    from lm4lv_core.data.dataset import collate

    return collate(items, pad_id=model.builder.pad_id, padding_side="left").to(device, dtype)


def runner(model, batch, compile: bool = False):
    """A call that generates the image of every sample of ``batch`` (features only)."""
    from lm4lv_core.model.generate import GenerationConfig, generate_batch

    cfg = GenerationConfig(mode="image")
    flags = [True] * batch.size
    return lambda: generate_batch(model, batch, cfg, image_only=flags, decode_images=False, compile=compile)


def measure_eager(args, model, items, device: torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
    """The naive algorithm, cached generation of batches 1 and 8 and the LLM's own decode of as
    many tokens (interleaved, so that load from other processes hits all alike). Returns the
    result entries and what later measurements compare against (``b1``, ``cached``, ``cached_s``)."""
    from lm4lv_core.model.generate import naive_generate_images

    b1, b8 = batch_of(model, items[:1], device, dtype), batch_of(model, items, device, dtype)
    prompt_len = int(b1.input_ids.shape[1])
    run1, run8 = runner(model, b1), runner(model, b8)
    n = model.num_visual_tokens
    ids = torch.randint(4, len(model.tokenizer), (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    gen_kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                  use_cache=True, pad_token_id=model.builder.pad_id)

    def run_llm():
        with torch.inference_mode():
            return model.llm.generate(ids, **gen_kw)

    for fn in (run1, run8, run_llm):  # warm-up
        fn()
    naive_s, naive = timed(lambda: naive_generate_images(model, b1), device) if not args.skip_naive else (None, None)
    times: dict[str, list[float]] = {"cached": [], "batch8": [], "llm": []}
    for _ in range(args.repeats):
        t, cached = timed(run1, device)
        times["cached"].append(t)
        times["batch8"].append(timed(run8, device)[0])
        t, llm_out = timed(run_llm, device)
        times["llm"].append(t)
    assert llm_out.shape[1] == prompt_len + n
    cached_s, b8_s, llm_s = (statistics.median(times[k]) for k in ("cached", "batch8", "llm"))
    diff = (cached[0].features[0].float() - naive.float()).abs().max().item() if naive is not None else None
    result = {
        "visual_tokens": n, "prompt_tokens": prompt_len,
        "batch8_prompt_tokens": sorted(len(it.encoded) for it in items),
        "naive_s": round(naive_s, 4) if naive_s else None, "cached_s": round(cached_s, 4),
        "speedup": round(naive_s / cached_s, 2) if naive_s else None,
        "max_abs_diff": diff,
        "llm_decode_s": round(llm_s, 4), "overhead_vs_llm_decode": round(cached_s / llm_s, 3),
        "batch8_s": round(b8_s, 4), "batch8_vs_batch1_throughput": round(8 * cached_s / b8_s, 2),
    }
    return result, {"b1": b1, "b8": b8, "cached": cached, "cached_s": cached_s, "runs_s": times}


def measure_query(args, model, query_items, ref: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """One-pass ``<query>`` generation of the same prompts by the same model, batch 1 and 8, each
    run next to the cached autoregressive run it is compared with."""
    q1, q8 = batch_of(model, query_items[:1], device, dtype), batch_of(model, query_items, device, dtype)
    runq1, runq8 = runner(model, q1), runner(model, q8)
    run1, run8 = runner(model, ref["b1"]), runner(model, ref["b8"])
    for fn in (runq1, runq8):  # warm-up
        fn()
    times: dict[str, list[float]] = {"query": [], "query_batch8": [], "cached": [], "batch8": []}
    for _ in range(args.repeats):
        times["query"].append(timed(runq1, device)[0])
        times["cached"].append(timed(run1, device)[0])
        times["query_batch8"].append(timed(runq8, device)[0])
        times["batch8"].append(timed(run8, device)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"query_s": round(med["query"], 4), "query_batch8_s": round(med["query_batch8"], 4),
            "query_vs_cached": round(med["cached"] / med["query"], 2),
            "query_vs_cached_batch8": round(med["batch8"] / med["query_batch8"], 2),
            "query_prompt_tokens": int(q1.input_ids.shape[1]),
            "query_runs_s": {k: [round(t, 4) for t in v] for k, v in times.items()}}


def measure_compiled(args, model, ref: dict, device: torch.device) -> dict:
    """torch.compile of the decode step (static KV cache): batch 1, the same sample as ``cached_s``."""
    from lm4lv_core.errors import ConfigError

    if args.no_compile:
        return {}
    try:
        compile_s, first = timed(runner(model, ref["b1"], compile=True), device)  # includes compilation
        ts = [timed(runner(model, ref["b1"], compile=True), device)[0] for _ in range(args.repeats)]
        return {"compile_s": round(compile_s, 2), "compiled_s": round(statistics.median(ts), 4),
                "compiled_vs_eager": round(ref["cached_s"] / statistics.median(ts), 3),
                "compiled_max_abs_diff": (first[0].features[0].float()
                                          - ref["cached"][0].features[0].float()).abs().max().item()}
    except ConfigError as e:
        return {"compiled_s": None, "compiled_vs_eager": None, "compile_error": str(e)}


def measure_throughput(args, model, items, compiled: dict, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Per ``--batch-sizes`` entry: eager (and compiled) seconds per batch, images/s and visual
    tokens/s per sample."""
    n = model.num_visual_tokens
    throughput = []
    for bs in [int(b) for b in args.batch_sizes.split(",") if b.strip()]:
        batch = batch_of(model, [items[i % len(items)] for i in range(bs)], device, dtype)
        row = {"batch": bs}
        for key, comp in (("eager", False), ("compiled", True)):
            if comp and (args.no_compile or compiled.get("compiled_s") is None):
                continue
            run = runner(model, batch, comp)
            run()  # warm-up (and compilation for this shape)
            t = statistics.median(timed(run, device)[0] for _ in range(args.repeats))
            row.update({f"{key}_s": round(t, 4), f"{key}_images_per_s": round(bs / t, 3),
                        f"{key}_visual_tokens_per_s_per_sample": round(n / t, 2)})
        throughput.append(row)
    return throughput


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # deepspeed (imported by peft) stays quiet
    load0 = os.getloadavg()[0]  # other processes on the machine skew the timings
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    model, items, query_items = build_model(args, device, dtype)
    eager, ref = measure_eager(args, model, items, device, dtype)
    query = measure_query(args, model, query_items, ref, device, dtype)
    compiled = measure_compiled(args, model, ref, device)
    throughput = measure_throughput(args, model, items, compiled, device, dtype)

    params = sum(p.numel() for p in model.llm.parameters())
    c = model.llm.config
    result = {
        "device": str(device), "precision": args.precision, "threads": torch.get_num_threads(),
        "llm": {"hidden": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
                "intermediate": c.intermediate_size, "vocab": c.vocab_size, "params": params},
        "encoder_width": model.encoder.dim,
        **eager, **query, **compiled, "throughput": throughput,
        "runs_s": {k: [round(t, 4) for t in v] for k, v in ref["runs_s"].items()},
        "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
        result["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
