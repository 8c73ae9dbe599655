"""Hugging Face ids wherever a model folder is taken, resolved through the hub cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lm4lv_core.sources import hub
from lm4lv_core.errors import ConfigError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LM4LV = Path(sys.executable).with_name("lm4lv")  # the installed console script


def _put(cache: Path, repo: str, src: Path, commit: str = COMMIT) -> Path:
    """``src`` laid out as the Hugging Face cache holds a downloaded model."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    shutil.copytree(src, snap)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    from lm4lv_core.sources.presets import preset_dir

    home = tmp_path_factory.mktemp("hf_home")
    d = preset_dir("tiny")
    _put(home / "hub", "lm4lv-test/tiny-llm", d / "llm")
    _put(home / "hub", "lm4lv-test/tiny-mae", d / "mae")
    return home


@pytest.fixture
def offline_cache(hf_home, monkeypatch):
    """This process reads the cache above, offline (huggingface_hub reads its settings at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home / "hub"


def test_ids_revisions_and_local_folders(offline_cache, tmp_path):
    snap = offline_cache / "models--lm4lv-test--tiny-llm" / "snapshots" / COMMIT
    path, rec = hub.resolve("lm4lv-test/tiny-llm", "--llm")
    assert path == str(snap.resolve())
    assert rec == {"id": "lm4lv-test/tiny-llm", "revision": "main", "commit": COMMIT, "path": path}
    path, rec = hub.resolve(f"lm4lv-test/tiny-llm@{COMMIT}", "--llm")
    assert path == str(snap.resolve()) and rec["revision"] == COMMIT
    assert hub.resolve(str(tmp_path)) == (str(tmp_path.resolve()), None)  # a folder is used as it is
    with pytest.raises(ConfigError, match="folder not found"):
        hub.resolve(str(tmp_path / "a" / "b"), "--mae")
    with pytest.raises(ConfigError) as e:
        hub.resolve("lm4lv-test/tiny-llm@v2", "--llm")
    assert "hf download lm4lv-test/tiny-llm --revision v2" in str(e.value)


def test_python_api_and_train_record_the_snapshot(offline_cache, pairs_file, tmp_path):
    from typer.testing import CliRunner

    from lm4lv_cli.app import app
    from lm4lv_core.config import ModelConfig, ModuleSpec
    from lm4lv_core.model.lm4lv import LM4LV

    cfg = ModelConfig(llm="lm4lv-test/tiny-llm", encoder=ModuleSpec("mae", {"path": "lm4lv-test/tiny-mae"}),
                      decoder=ModuleSpec("mae", {"path": "lm4lv-test/tiny-mae"}), num_task_tokens=2)
    model = LM4LV.from_config(cfg)
    assert Path(model.config.llm).parent.name == "snapshots" and model.config.hub["decoder"]["commit"] == COMMIT

    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--data", str(pairs_file), "--out", str(run), "--llm",
                                   "lm4lv-test/tiny-llm", "--mae", "lm4lv-test/tiny-mae", "--max-steps", "1",
                                   "--micro-batch", "2", "--preview-every", "1000"])
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    llm_snap = str((offline_cache / "models--lm4lv-test--tiny-llm" / "snapshots" / COMMIT).resolve())
    assert saved["llm"] == llm_snap
    assert saved["hub"]["llm"] == {"id": "lm4lv-test/tiny-llm", "revision": "main", "commit": COMMIT,
                                   "path": llm_snap}
    assert saved["hub"]["encoder"]["id"] == "lm4lv-test/tiny-mae"
    assert (run / "final" / "lm4lv.yaml").is_file() and (run / "train.log").is_file()


def _cli(args, hf_home, tmp_path):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([str(LM4LV), *args], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


def test_console_script_loads_ids_from_hf_home_offline(hf_home, pairs_file, tmp_path):
    proc = _cli(["train", "--data", str(pairs_file), "--out", str(tmp_path / "run"), "--llm", "lm4lv-test/tiny-llm",
                 "--mae", "lm4lv-test/tiny-mae", "--dry-run"], hf_home, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "4 samples" in proc.stdout
    proc = _cli(["train", "--data", str(pairs_file), "--out", str(tmp_path / "run"), "--llm", "lm4lv-test/nope",
                 "--mae", "lm4lv-test/tiny-mae", "--dry-run"], hf_home, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --llm lm4lv-test/nope")
    assert "HF_HUB_OFFLINE" in lines[0] and "hf download lm4lv-test/nope" in lines[0]


def test_ft_mae_records_the_snapshot_of_an_id(offline_cache, pairs_file, tmp_path):
    from lm4lv_core.engine.config import TrainConfig
    from lm4lv_core.jobs.ft_mae import finetune
    from lm4lv_core.tasks.mae_decoder import MAEFinetuneConfig

    run = tmp_path / "mae"
    train = TrainConfig(data=str(pairs_file.parent / "hq"), out=str(run))
    train.max_steps = 0  # writes the starting model as final/ (as --max-steps 0 does)
    finetune(train, MAEFinetuneConfig(mae="lm4lv-test/tiny-mae@main", lpips_weight=0))
    saved = yaml.safe_load((run / "config.yaml").read_text())["mae"]
    assert saved["mae"].endswith(f"snapshots/{COMMIT}")
    assert saved["hub"]["mae"] == {"id": "lm4lv-test/tiny-mae", "revision": "main", "commit": COMMIT,
                                   "path": saved["mae"]}
    assert (run / "final" / "config.json").is_file()
