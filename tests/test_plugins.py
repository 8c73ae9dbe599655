"""A user's own vision module (the example of docs/vision.md, run as written) through the installed ``lm4lv``
command: trained on two workers and on two localhost nodes, resumed, generated from in new
processes without ``--plugin`` (the run records it), and a missing or edited plugin file, an unknown
module, a missing class or a class that does not answer the interface are one ``error:`` line.
Also: ``module:Class`` targets, ``LM4LV_PLUGINS``, entry points, a codes adapter and a loss that
declare what they take, and plugin degradations / metrics in make-data and eval."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli, write_pairs

ROOT = Path(__file__).resolve().parent.parent
LM4LV = Path(sys.executable).parent / "lm4lv"


def readme_example() -> str:
    """The Python block of the "Your own vision module" section of docs/vision.md."""
    text = (ROOT / "docs" / "vision.md").read_text()
    section = text[text.index("## Your own vision module"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugins")
    write_pairs(root / "data", n=2)
    (root / "my_vision.py").write_text(readme_example())
    return root


def lm4lv(*args, cwd: Path, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([str(LM4LV), *map(str, args)], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=timeout)


def last_line(p: subprocess.CompletedProcess) -> str:
    return (p.stderr or p.stdout).strip().splitlines()[-1]


def test_readme_example_is_an_exact_patch_family(work):
    sys.path.insert(0, str(work))
    try:
        import my_vision
    finally:
        sys.path.remove(str(work))
    x = torch.rand(2, 3, 32, 32)
    tokens = my_vision.PatchEncoder()(x)
    assert tokens.shape == (2, 16, 192)
    assert torch.equal(my_vision.PatchDecoder()(tokens), x)


@pytest.mark.slow
def test_plugin_trains_on_two_workers_resumes_and_generates_in_new_processes(work, tmp_path):
    run = tmp_path / "run"
    p = lm4lv("train", "--plugin", "my_vision.py", "--preset", "tiny", "--encoder", "patch", "--adapter", "gated",
              "--data", work / "data" / "train.json", "--out", run, "--max-steps", "3", "--stop-after", "2",
              "--nproc", "2", cwd=work)
    assert p.returncode == 0, p.stderr
    model = json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())["model"]))
    assert model["encoder"]["name"] == "patch" and model["adapter"]["name"] == "gated"
    assert model["plugins"] == [{"file": str(work / "my_vision.py"), "module": "my_vision",
                                 "sha256": __import__("hashlib").sha256((work / "my_vision.py").read_bytes()).hexdigest()}]
    # resume from another folder, no --plugin: the run's record brings it back (the workers above
    # already found it by the record alone)
    p = lm4lv("train", "--data", work / "data" / "train.json", "--out", run, "--max-steps", "3", "--resume",
              cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "plugins" in (run / "final" / "lm4lv.yaml").read_text()
    p = lm4lv("generate", "--run", run, "--data", work / "data" / "train.json", "--out", tmp_path / "gen", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in (tmp_path / "gen" / "images").iterdir()) == ["0.png", "1.png"]
    # the Python API in a fresh interpreter reads the recorded plugin too
    code = (f"from lm4lv_core.model.lm4lv import LM4LV; m = LM4LV.from_pretrained({str(run / 'final')!r}); "
            "print(type(m.encoder).__module__, m.num_visual_tokens)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=200)
    assert out.stdout.split() == ["my_vision", "16"], out.stderr
    # an edited plugin file, then a missing one: one line each, nothing written
    source = (work / "my_vision.py").read_text()
    try:
        (work / "my_vision.py").write_text(source + "# edited\n")
        p = lm4lv("generate", "--run", run, "--data", work / "data" / "train.json", "--out", tmp_path / "g2",
                  cwd=tmp_path)
        assert p.returncode == 2 and re.fullmatch(
            rf"error: plugin {re.escape(str(work / 'my_vision.py'))} changed since the run used it: recorded sha256 "
            r"[0-9a-f]{64}, now [0-9a-f]{64}; restore that file, or start a new run", last_line(p)), p.stderr
        (work / "my_vision.py").unlink()
        p = lm4lv("generate", "--run", run, "--input", work / "data" / "lq", "--out", tmp_path / "g3", cwd=tmp_path)
        assert p.returncode == 2 and last_line(p).startswith(
            f"error: plugin {work / 'my_vision.py'} recorded by the run is missing"), p.stderr
        assert not (tmp_path / "g2").exists() and not (tmp_path / "g3").exists()
    finally:
        (work / "my_vision.py").write_text(source)


@pytest.mark.slow
def test_plugin_trains_on_two_localhost_nodes(work, tmp_path):
    from test_multinode import _port

    run, port = tmp_path / "run", _port()
    args = ["train", "--plugin", work / "my_vision.py", "--preset", "tiny", "--encoder", "patch",
            "--data", work / "data" / "train.json", "--out", run, "--max-steps", "2", "--num-nodes", "2",
            "--master-addr", "127.0.0.1", "--master-port", port, "--launcher", "torchrun"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([str(LM4LV), *map(str, args), "--node-rank", str(r)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    results = [(p.wait(timeout=400), p.stderr.read()) for p in procs]
    assert [c for c, _ in results] == [0, 0], results
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2
    assert (run / "final" / "trainable.safetensors").is_file()


def test_plugin_mistakes_are_one_line(work, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(work)
    base = ["train", "--plugin", "my_vision.py", "--preset", "tiny", "--data", work / "data" / "train.json",
            "--out", tmp_path / "run", "--max-steps", "1"]
    cases = {
        ("--encoder", "no_such_module:Enc"): "error: vision encoder no_such_module:Enc: no module named "
                                             "'no_such_module' (give its file with --plugin FILE.py",
        ("--encoder", "my_vision:Nope"): "error: vision encoder my_vision:Nope: module my_vision has no 'Nope'",
        ("--encoder", "my_vision:gated"): "error: vision encoder my_vision:gated does not answer the vision encoder "
                                          "interface: missing source_kwargs, token_space, meta, plan_shape, forward "
                                          "(subclass lm4lv_core.vision.VisionEncoder)",
        ("--plugin", "no_such_plugin"): "error: --plugin no_such_plugin: no module named 'no_such_plugin'",
        ("--plugin", "missing.py"): "error: --plugin missing.py: plugin file not found",
    }
    for extra, want in cases.items():
        code, out = run_cli(monkeypatch, capsys, *base, *extra)
        assert code == 2 and out.strip().splitlines()[-1].startswith(want), (extra, out)
        assert not (tmp_path / "run").exists()


CODES_PLUGIN = '''
import torch.nn.functional as F
from torch import nn

from lm4lv_core.registry import ADAPTERS, VISION_LOSSES
from lm4lv_core.vision import ADAPTER, CODES, FEATURES, VisionLoss, declare_adapter

SEEN = []


@ADAPTERS.register("code_bag")
@declare_adapter(accepts=(CODES,), roles=(ADAPTER,))
def code_bag(in_dim, out_dim):
    return nn.Sequential(nn.Embedding(in_dim, out_dim), nn.LayerNorm(out_dim))


def ce_and_adapter(pred, target, adapter, hidden):
    SEEN.append(hidden.shape)
    return F.cross_entropy(pred.float().flatten(0, 1), target.long().flatten()) + 0 * adapter[0].weight.sum()


VISION_LOSSES.register("ce_plus")(VisionLoss("ce_plus", CODES, False, ce_and_adapter, "codes CE",
                                             inputs=("pred", "target", "adapter", "hidden")))
'''


def test_codes_adapter_and_loss_declare_what_they_take(work, tmp_path, monkeypatch, capsys):
    (tmp_path / "codes_plugin.py").write_text(CODES_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out = run_cli(monkeypatch, capsys, "train", "--preset", "tiny-vq", "--adapter", "codes_plugin:code_bag",
                        "--vision-loss", "ce_plus", "--plugin", tmp_path / "codes_plugin.py",
                        "--data", work / "data" / "train.json", "--out", tmp_path / "run", "--max-steps", "1")
    assert code == 0, out
    import codes_plugin

    assert codes_plugin.SEEN and codes_plugin.SEEN[0][-1] == 64  # the LLM's hidden states reached the loss
    # the features family refuses the codes adapter in one line
    code, out = run_cli(monkeypatch, capsys, "train", "--preset", "tiny", "--adapter", "code_bag",
                        "--data", work / "data" / "train.json", "--out", tmp_path / "run2", "--max-steps", "1")
    assert code == 2 and out.strip().splitlines()[-1].startswith(
        "error: --adapter code_bag does not take features of encoder mae (it takes codes)")


DEGRADE_PLUGIN = '''
import numpy as np

from lm4lv_core.image.degrade import Param, register
from lm4lv_core.image.metrics import METRICS, Metric


def invert(img, rng, strength=1.0):
    return (255 - img.astype(np.float32) * strength).clip(0, 255).astype(np.uint8)


register("invert", invert, "photographic negative", Param("strength", float, 1.0, "how much", 0, 1))
METRICS.register("mean_abs")(Metric("mean_abs", False, lambda gt, pred, cb, y, lp: float(
    np.abs(gt.astype(float) - pred.astype(float)).mean())))
'''


def test_degradation_and_metric_plugins_reach_make_data_workers_and_eval(work, tmp_path):
    pkg = tmp_path / "site"
    (pkg / "deg_plugin").mkdir(parents=True)
    (pkg / "deg_plugin" / "__init__.py").write_text(DEGRADE_PLUGIN)
    # an installed package's entry point, found on the path like any installed distribution
    (pkg / "deg_plugin-1.0.dist-info").mkdir()
    (pkg / "deg_plugin-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: deg-plugin\nVersion: 1.0\n")
    (pkg / "deg_plugin-1.0.dist-info" / "entry_points.txt").write_text("[lm4lv.plugins]\ninvert = deg_plugin\n")
    env = {"PYTHONPATH": os.pathsep.join([str(pkg), os.environ.get("PYTHONPATH", "")])}
    p = lm4lv("make-data", work / "data" / "hq", "--out", tmp_path / "set", "-d", "invert:strength=1", "--size", "32",
              "--workers", "2", cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    lq = sorted((tmp_path / "set").rglob("lq/**/*.png"))
    assert lq, list((tmp_path / "set").rglob("*"))
    p = lm4lv("eval", "psnr,mean_abs", tmp_path / "set" / "hq", *sorted({f.parent for f in lq}), "--crop-border", "0",
              "--json", tmp_path / "scores.json", cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr + p.stdout
    assert "mean_abs" in (tmp_path / "scores.json").read_text()
    # without the plugin the degradation is unknown: one line naming it
    p = lm4lv("make-data", work / "data" / "hq", "--out", tmp_path / "set2", "-d", "invert", cwd=tmp_path)
    assert p.returncode == 2 and "unknown degradation 'invert'" in last_line(p)
    # LM4LV_PLUGINS names it as well
    p = lm4lv("make-data", work / "data" / "hq", "--out", tmp_path / "set3", "-d", "invert", "--size", "32",
              cwd=tmp_path, env={"PYTHONPATH": str(pkg), "LM4LV_PLUGINS": "deg_plugin"})
    assert p.returncode == 0, p.stderr
