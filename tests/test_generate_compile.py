"""`generate --compile`: compiled decode steps give the eager outputs; a clear error without a compiler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lm4lv_core.data.format import parse_sample
from lm4lv_core.errors import ConfigError
from lm4lv_core.model.generate import GenerationConfig, generate_samples
from lm4lv_core.model.lm4lv import LM4LV


@pytest.mark.slow  # one torch.compile of the tiny LLM's decode step (~20-60 s on a CPU)
def test_compiled_decode_matches_eager(tiny_config):
    torch.manual_seed(0)
    model = LM4LV.from_config(tiny_config).eval()
    rng = np.random.default_rng(0)
    size = model.encoder.image_size
    images = {f"mem:{i}": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for i in range(2)}
    prompts = ["<image> <task>", "Restore the image <image> <task> please"]  # left padding in the batch
    samples = [parse_sample({"image": [f"mem:{i}"], "conversations": [{"from": "human", "value": p},
                                                                      {"from": "gpt", "value": ""}]}, i)
               for i, p in enumerate(prompts)]
    cfg = GenerationConfig(mode="image")
    kw = dict(batch_size=2, loader=lambda p: images[p])
    eager = generate_samples(model, samples, cfg, **kw)
    compiled = generate_samples(model, samples, cfg, compile=True, **kw)
    for e, c in zip(eager, compiled):
        assert len(c.features) == 1 and c.features[0].shape == e.features[0].shape
        assert (c.features[0] - e.features[0]).abs().max() <= 1e-4
        assert (c.images[0] - e.images[0]).abs().max() <= 1e-4


def test_compile_without_a_cpp_compiler_is_a_clear_error(monkeypatch):
    import torch._inductor.config as inductor_config

    from lm4lv_core.model.compiled_decode import check_compile_available

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/g++"))
    with pytest.raises(ConfigError, match="--compile needs a C\\+\\+ compiler"):
        check_compile_available(torch.device("cpu"))
