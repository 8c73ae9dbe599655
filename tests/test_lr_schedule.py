"""``--lr-schedule``: ``reference`` is DeepSpeed's WarmupDecayLR step for step."""

import math

import pytest
import torch

from lm4lv_core.engine.config import TrainConfig
from lm4lv_core.engine.schedule import lr_lambda, warmup_steps_for
from lm4lv_core.errors import ConfigError


def reference_lrs(total: int, warmup_ratio: float, lr: float = 3e-4) -> list[float]:
    """The rate of each optimizer step of a DeepSpeed engine configured as the reference does."""
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = WarmupDecayLR(opt, total_num_steps=total, warmup_min_lr=0, warmup_max_lr=lr,
                          warmup_num_steps=max(10, int(total * warmup_ratio)))
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()  # what DeepSpeedEngine.step() does after each optimizer step
    return out


def ours(schedule: str, total: int, warmup_ratio: float, lr: float = 3e-4) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(schedule, total, warmup_steps_for(schedule, total, warmup_ratio)))
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("total,ratio", [(4, 0.1), (100, 0.1), (257, 0.1), (40, 0.5), (1000, 0.03)])
def test_reference_schedule_equals_deepspeed_warmup_decay(total, ratio):
    want = reference_lrs(total, ratio)
    got = ours("reference", total, ratio)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)
    w = max(10, int(total * ratio))
    assert got[0] == got[1] == 0.0  # DeepSpeed's first two steps train at warmup_min_lr
    if total > w + 1:
        assert got[w] == pytest.approx(3e-4)  # peak right after the log warmup, then linear decay
        assert got[-1] == pytest.approx(3e-4 * 2 / (total - w))


def test_warmup_length_and_default():
    assert TrainConfig(data="d", out="o").lr_schedule == "reference"
    assert warmup_steps_for("reference", 100, 0.1) == 10 and warmup_steps_for("reference", 2000, 0.1) == 200
    assert warmup_steps_for("reference", 2000, 0.0) == 10  # the reference's floor of 10 steps
    assert warmup_steps_for("cosine", 2000, 0.0) == 0 and warmup_steps_for("cosine", 105, 0.1) == 10


def test_cosine_and_constant_schedules():
    cos = ours("cosine", 20, 0.1)
    assert cos[:2] == pytest.approx([1.5e-4, 3e-4])  # linear warmup over 2 steps
    assert cos[2] == pytest.approx(3e-4) and cos[-1] == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * 17 / 18)))
    assert all(a >= b for a, b in zip(cos[1:], cos[2:]))
    const = ours("constant", 20, 0.1)
    assert const[:2] == pytest.approx([1.5e-4, 3e-4]) and const[2:] == pytest.approx([3e-4] * 18)
    assert ours("constant", 5, 0.0) == pytest.approx([3e-4] * 5)


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="--lr-schedule must be one of reference, cosine, constant"):
        TrainConfig(data="d", out="o", lr_schedule="linear")


def test_cli_option_reaches_both_commands(pairs_file, tmp_path):
    from typer.testing import CliRunner

    from lm4lv_cli.app import app
    from lm4lv_core.jobs.train import resolve_options
    from lm4lv_core.jobs.ft_mae import resolve_finetune_options

    train_cfg, _ = resolve_options({"data": str(pairs_file), "out": str(tmp_path / "r"), "preset": "tiny",
                                    "lr_schedule": "cosine"})
    assert train_cfg.lr_schedule == "cosine"
    mae_cfg, _ = resolve_finetune_options({"data": str(tmp_path), "out": str(tmp_path / "m"), "preset": "tiny",
                                           "lr_schedule": "constant"})
    assert mae_cfg.lr_schedule == "constant"
    res = CliRunner().invoke(app, ["train", "--data", str(pairs_file), "--out", str(tmp_path / "r"),
                                   "--preset", "tiny", "--lr-schedule", "linear", "--dry-run"])
    assert isinstance(res.exception, ConfigError)  # `lm4lv` prints it as one error line, exit code 2
    assert "--lr-schedule must be one of reference, cosine, constant" in str(res.exception)


def test_both_commands_layer_options_the_same_way(pairs_file, tmp_path):
    """A run's own config.yaml works as --config for train and ft-mae alike, and --resume never
    carries the earlier invocation's --stop-after (or --out/--verbose) into the next one."""
    import yaml

    from lm4lv_core.jobs.ft_mae import resolve_finetune_options
    from lm4lv_core.jobs.train import resolve_options

    run = tmp_path / "m"
    run.mkdir()
    saved = {"task": "mae", "train": {"data": str(tmp_path), "out": str(run), "lr": 1e-3, "stop_after": 5,
                                      "verbose": True},
             "mae": {"mae": None, "lpips_weight": 0.5, "lpips_net": "vgg", "lpips_weights": None,
                     "train_encoder": False, "hub": {}}}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    train_cfg, mae_cfg = resolve_finetune_options({"data": str(tmp_path), "out": str(tmp_path / "m2"),
                                                   "preset": "tiny"}, str(run / "config.yaml"))
    assert (train_cfg.lr, mae_cfg.lpips_weight, train_cfg.stop_after, train_cfg.verbose) == (1e-3, 0.5, None, False)
    train_cfg, mae_cfg = resolve_finetune_options({"data": str(tmp_path), "out": str(run), "preset": "tiny",
                                                   "resume": True})
    assert (train_cfg.lr, mae_cfg.lpips_weight, train_cfg.stop_after, train_cfg.out) == (1e-3, 0.5, None, str(run))

    train_run = tmp_path / "t"
    train_run.mkdir()
    cfg, model = resolve_options({"data": str(pairs_file), "out": str(train_run), "preset": "tiny", "lr": 2e-3,
                                  "stop_after": 3})
    (train_run / "config.yaml").write_text(yaml.safe_dump({"task": "lm4lv", "train": vars(cfg),
                                                           "model": __import__("dataclasses").asdict(model)}))
    cfg2, _ = resolve_options({"out": str(train_run), "resume": True})
    assert (cfg2.lr, cfg2.stop_after, cfg2.data) == (2e-3, None, str(pairs_file))
    with pytest.raises(ConfigError, match="unknown option"):
        resolve_finetune_options({"data": str(tmp_path), "out": str(run), "preset": "tiny", "num_task_tokens": 3})
