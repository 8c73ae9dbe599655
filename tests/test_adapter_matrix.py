"""Every registered adapter end to end, for each token kind it declares: it trains through the
model, generates with the KV cache exactly as the no-cache reference algorithm, and saves /
reloads / generates the same; the weightless ones (identity, pseudo_inverse) included. Choices
the declarations refuse are one ConfigError line at config time; the CLI trains and then
generates in a new process with the weightless adapters."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm4lv_core.config import ModuleSpec
from lm4lv_core.data.dataset import collate
from lm4lv_core.errors import ConfigError
from lm4lv_core.model.generate import GenerationConfig, build_items, generate_samples, naive_generate_images
from lm4lv_core.model.lm4lv import LM4LV
from lm4lv_core.registry import ADAPTERS
from lm4lv_core.sources.presets import PRESETS, _build_mae, preset_config
from lm4lv_core.vision import ADAPTER, CODES, DEADAPTER, FEATURES, adapter_traits, complete_config, declare_adapter

from test_vision_families import _gen_samples, _train_batch

BUILT_IN = ("linear", "mlp", "lowrank", "embedding", "identity", "pseudo_inverse")


def wide_mae(root: Path) -> Path:
    """A tiny MAE as wide as the ``tiny`` preset's LLM (64), so ``identity`` fits."""
    out = root / "mae64"
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        _build_mae(dataclasses.replace(PRESETS["tiny"], mae_hidden=64), out)
    return out


def _config(kind: str, adapter: str, deadapter: str, root: Path):
    kw = dict(adapter=ModuleSpec(adapter), deadapter=ModuleSpec(deadapter))
    if kind == CODES:
        return preset_config("tiny-vq", **kw)
    if "identity" in (adapter, deadapter):
        mae = {"path": str(wide_mae(root))}
        return preset_config("tiny", encoder=ModuleSpec("mae", mae), decoder=ModuleSpec("mae", mae), **kw)
    return preset_config("tiny", **kw)


# (token kind, adapter, deadapter): each built-in adapter in each role it declares, for each kind it reads
CASES = [
    (FEATURES, "linear", "linear"),
    (FEATURES, "mlp", "mlp"),
    (FEATURES, "lowrank", "lowrank"),
    (FEATURES, "identity", "identity"),
    (FEATURES, "linear", "pseudo_inverse"),
    (CODES, "embedding", "linear"),
    (CODES, "embedding", "mlp"),
    (CODES, "embedding", "lowrank"),
]


def test_cases_cover_every_built_in_adapter_in_every_declared_role_and_kind():
    covered = {(a, ADAPTER, k) for k, a, _ in CASES} | {(d, DEADAPTER) for _, _, d in CASES}
    for name in BUILT_IN:
        traits = adapter_traits(ADAPTERS.get(name))
        if ADAPTER in traits.roles:
            assert {(name, ADAPTER, k) for k in traits.accepts} <= covered, name
        if DEADAPTER in traits.roles:
            assert (name, DEADAPTER) in covered, name


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from conftest import write_pairs

    root = tmp_path_factory.mktemp("adapters")
    data = write_pairs(root, n=2)
    return root, json.loads(data.read_text())


@pytest.mark.parametrize("kind,adapter,deadapter", CASES, ids=[f"{k}-{a}-{d}" for k, a, d in CASES])
def test_adapter_trains_generates_and_round_trips(kind, adapter, deadapter, pairs, tmp_path):
    from conftest import overfit

    root, raw = pairs
    torch.manual_seed(0)
    model = LM4LV.from_config(_config(kind, adapter, deadapter, root))
    assert model.space.kind == kind
    # train 2 steps: finite losses, every trainable parameter moves
    model.train()
    batch = _train_batch(model, root, raw)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    first, last = overfit(model, batch, 2)
    assert torch.isfinite(torch.tensor([first, last])).all()
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert moved == set(before)
    weightless = (adapter, deadapter) == ("identity", "identity")  # only the task tokens train
    assert any(n.startswith(("adapter.", "deadapter.")) for n in before) != weightless
    # cached batched generation == the no-cache reference algorithm, per sample
    model.eval()
    samples = _gen_samples(root, ["<image> <task>", "Restore the image <image> <task> please"])
    cfg_gen = GenerationConfig(mode="image")
    outs = generate_samples(model, samples, cfg_gen, batch_size=2)
    for s, o in zip(samples, outs):
        items, _ = build_items(model, [s], "image")
        ref = naive_generate_images(model, collate(items, pad_id=model.builder.pad_id, padding_side="left"))
        got = o.features[0]
        if kind == CODES:
            assert got.dtype == torch.long and torch.equal(got, ref)
        else:
            assert (got - ref).abs().max().item() <= 1e-4
        assert o.images[0].shape == (3, model.decoder.image_size, model.decoder.image_size)
    # save / reload / generate the same
    model.save_pretrained(tmp_path / "m")
    back = LM4LV.from_pretrained(tmp_path / "m").eval()
    assert (back.config.adapter.name, back.config.deadapter.name) == (adapter, deadapter)
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    again = generate_samples(back, samples[:1], cfg_gen, batch_size=1)[0].features[0]
    want = outs[0].features[0]
    assert torch.equal(again, want) if kind == CODES else (again - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("preset,adapter,deadapter,message", [
    ("tiny", "pseudo_inverse", "linear", "--adapter pseudo_inverse serves only as --deadapter"),
    ("tiny", "linear", "embedding", "--deadapter embedding serves only as --adapter"),
    ("tiny", "embedding", "linear", r"--adapter embedding does not take features of encoder mae \(it takes codes\); "
                                    "use linear | mlp | lowrank | identity"),
    ("tiny-vq", "identity", "linear", r"--adapter identity does not take codes .*\(it takes features\); use embedding"),
    ("tiny", "mlp", "pseudo_inverse", "--deadapter pseudo_inverse inverts the input adapter and needs --adapter linear, "
                                      "got mlp"),
    ("tiny-vq", "embedding", "pinv", "needs --adapter linear, got embedding"),
])
def test_refused_choices_are_one_config_error_line(preset, adapter, deadapter, message):
    with pytest.raises(ConfigError, match=message) as e:
        complete_config(preset_config(preset, adapter=ModuleSpec(adapter), deadapter=ModuleSpec(deadapter)))
    assert "\n" not in str(e.value)


def test_a_third_party_adapter_declares_the_same_or_gets_the_default():
    @declare_adapter(accepts=(FEATURES, CODES), roles=(ADAPTER,))
    def both_kinds(in_dim, out_dim):
        return torch.nn.Linear(in_dim, out_dim)

    def plain(in_dim, out_dim):
        return torch.nn.Linear(in_dim, out_dim)

    t = adapter_traits(both_kinds)
    assert (t.accepts, t.roles) == ((FEATURES, CODES), (ADAPTER,))
    t = adapter_traits(plain)  # nothing declared: reads features, serves both roles
    assert (t.accepts, t.roles, t.inverts) == ((FEATURES,), (ADAPTER, DEADAPTER), ())
    with pytest.raises(ValueError, match="accepts takes features, codes"):
        declare_adapter(accepts=("pixels",))


def _lm4lv(*args, cwd: Path) -> subprocess.CompletedProcess:
    """The installed ``lm4lv`` command, in a new process."""
    exe = Path(sys.executable).with_name("lm4lv")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.parametrize("adapter,deadapter", [("identity", "linear"), ("linear", "pseudo_inverse")])
def test_cli_trains_then_generates_in_a_new_process(adapter, deadapter, tmp_path, monkeypatch, capsys):
    """``lm4lv train`` (in this process, for speed), then ``lm4lv generate`` in a new one: the
    saved run alone rebuilds the weightless adapter and paints."""
    from conftest import run_cli, write_pairs

    data = write_pairs(tmp_path / "data", n=2)
    run = tmp_path / "run"
    model = ["--preset", "tiny"] + (["--encoder", f"mae:{wide_mae(tmp_path)}"] if adapter == "identity" else [])
    args = ["--data", data, *model, "--adapter", adapter, "--deadapter", deadapter, "--max-steps", "2",
            "--micro-batch", "1"]
    code, log = run_cli(monkeypatch, capsys, "train", *args, "--out", tmp_path / "dry", "--dry-run", "--gpu-memory", "10")
    flat = " ".join(log.split())  # the console wraps long lines
    assert code == 0 and f"adapter {adapter}, deadapter {deadapter}" in flat and "FITS in 10 GiB" in flat, log  # memory plan
    code, log = run_cli(monkeypatch, capsys, "train", *args, "--out", run, "--save-every", "2")
    assert code == 0, log
    test = data.parent / "test.json"
    test.write_text(json.dumps([{"image": [f"lq/{i}.png"], "conversations": [
        {"from": "human", "value": "<image> <task>"}, {"from": "gpt", "value": ""}]} for i in range(2)]))
    out = tmp_path / "gen"
    res = _lm4lv("generate", "--run", run, "--data", test, "--out", out, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["0.png", "1.png"]


def test_cli_adapter_help_lists_every_adapter_for_the_roles_it_declares():
    import inspect
    import re

    from lm4lv_cli.cmd_train import train

    opts = inspect.signature(train).parameters
    for role in (ADAPTER, DEADAPTER):
        listed = set(re.findall(r"\w+", opts[role].default.help.split("[")[0]))
        want = {n for n in ADAPTERS if role in adapter_traits(ADAPTERS.get(n)).roles}
        assert want <= listed, (role, want - listed)
        assert not (set(BUILT_IN) - want) & listed, role  # none listed for a role it does not serve


@pytest.mark.parametrize("adapter,deadapter,message", [
    ("pseudo_inverse", "linear", "--adapter pseudo_inverse serves only as --deadapter"),
    ("linear", "embedding", "--deadapter embedding serves only as --adapter"),
])
def test_cli_refuses_a_role_an_adapter_does_not_serve_in_one_line(adapter, deadapter, message, tmp_path,
                                                                   monkeypatch, capsys):
    from conftest import run_cli, write_pairs

    data = write_pairs(tmp_path / "data", n=1)
    code, log = run_cli(monkeypatch, capsys, "train", "--data", data, "--out", tmp_path / "run", "--preset", "tiny",
                        "--adapter", adapter, "--deadapter", deadapter, "--max-steps", "1")
    assert code == 2 and message in " ".join(log.split()) and "Traceback" not in log, log
    assert not (tmp_path / "run").exists()
