"""Shared fixtures: offline environment, tiny presets, small image datasets on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

# Offline and CPU everywhere, for this process and the workers it launches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LM4LV_HOME", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "lm4lv_home"))

REFERENCE = Path(__file__).resolve().parent / "data"


# What DeepSpeed's ZeRO-3 replaces in torch (deepspeed.runtime.zero.partition_parameters): ``F.linear``
# for good (``zero3_linear_wrap``, "persists unless manually reset"), ``F.embedding`` under quantized
# weights, and inside ``zero.Init`` the tensor constructors, ``Tensor.__new__`` and ``Module``'s
# ``__init_subclass__`` / ``apply`` (restored on a clean exit only). (owner, attribute) pairs.
def _patched_by_deepspeed():
    import torch

    F = torch.nn.functional
    return [(F, "linear"), (F, "embedding"), (torch.Tensor, "__new__"), (torch.nn.Module, "__init_subclass__"),
            (torch.nn.Module, "apply")] + [(torch, name) for name in
                                           ("tensor", "empty", "zeros", "ones", "full", "arange", "eye", "randn")]


@pytest.fixture(autouse=True)
def _torch_as_it_was():
    """Every test starts with torch as the previous one found it: what an in-process ZeRO-3 run
    patched is put back after the test, so no test depends on the ones run before it."""
    import torch

    saved = [(owner, name, owner.__dict__.get(name, _MISSING)) for owner, name in _patched_by_deepspeed()]
    grad = torch.is_grad_enabled()
    yield
    for owner, name, value in saved:
        if owner.__dict__.get(name, _MISSING) is not value:
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
    torch.set_grad_enabled(grad)


_MISSING = object()


@pytest.fixture(scope="session")
def tiny_config():
    from lm4lv_core.sources.presets import preset_config

    return preset_config("tiny")


def _skimage_rgb(name: str, size: int) -> np.ndarray:
    import skimage.data
    from PIL import Image

    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    return np.asarray(Image.fromarray(arr[..., :3]).resize((size, size), Image.BICUBIC))


def write_pairs(root: Path, n: int = 4, size: int = 32, sigma: float = 40.0, seed: int = 0,
                names=("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "coins")) -> Path:
    """Write ``n`` noisy/clean pairs from scikit-image samples and a training data file."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "hq").mkdir(parents=True, exist_ok=True)
    (root / "lq").mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        clean = _skimage_rgb(names[i % len(names)], size)
        noisy = np.clip(clean + rng.normal(0, sigma, clean.shape), 0, 255).astype(np.uint8)
        Image.fromarray(clean).save(root / "hq" / f"{i}.png")
        Image.fromarray(noisy).save(root / "lq" / f"{i}.png")
        samples.append({"image": [f"lq/{i}.png", f"hq/{i}.png"],
                        "conversations": [{"from": "human", "value": "<image> <task>"},
                                          {"from": "gpt", "value": "<image>"}],
                        "task_type": "conversation"})
    (root / "train.json").write_text(json.dumps(samples, indent=1))
    return root / "train.json"


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_pairs(tmp_path / "data")


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """``lm4lv ARGS`` in this process (the app's ``main``): exit code and console output."""
    import sys

    from lm4lv_cli.app import main

    from lm4lv_core import plugins

    monkeypatch.setattr(sys, "argv", ["lm4lv", *map(str, args)])
    # a command's plugins stay with it (as in a process of its own): what it loads and exports is undone
    loaded, env = dict(plugins._loaded), os.environ.get(plugins.ENV)
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        plugins._loaded.clear()
        plugins._loaded.update(loaded)
        if env is None:
            os.environ.pop(plugins.ENV, None)
        else:
            os.environ[plugins.ENV] = env
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def overfit(model, batch, steps: int, lr: float = 3e-3, **adamw) -> tuple[float, float]:
    """Train ``model`` on one ``batch`` for ``steps`` AdamW steps: (first, last) vision loss."""
    import torch

    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr, **adamw)
    first = None
    for _ in range(steps):
        out = model(batch)
        first = first if first is not None else float(out.vision_loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return first, float(model(batch).vision_loss)
