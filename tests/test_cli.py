import subprocess
import sys

from typer.testing import CliRunner

from lm4lv_cli.app import app

runner = CliRunner()


def test_help_lists_every_command_and_version():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("train", "generate", "eval", "ft-mae", "recon-mae", "make-data", "quickstart"):
        assert cmd in res.output
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("lm4lv ")


def test_train_dry_run_shows_first_prompt(pairs_file, tmp_path):
    res = runner.invoke(app, ["train", "--data", str(pairs_file), "--preset", "tiny", "--out",
                              str(tmp_path / "run"), "--dry-run", "--gpt-prefix", "Here:"])
    assert res.exit_code == 0, res.output
    assert "4 samples" in res.output and "[image 1: 17 slots, target]" in res.output
    assert "Here:" in res.output and "target image slots: 17" in res.output
    assert not (tmp_path / "run").exists()


def test_train_dry_run_shows_the_reference_prompt_of_its_example_file(tmp_path):
    """The reference's example_denoising.json (its images made up under --image-root): the first
    prompt is shown exactly as the reference renders it, then token by token."""
    import json

    from PIL import Image

    from conftest import REFERENCE

    data = REFERENCE / "example_denoising.json"
    for s in json.loads(data.read_text()):
        for p in s["image"]:
            (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30)).save(tmp_path / p)
    res = runner.invoke(app, ["train", "--data", str(data), "--image-root", str(tmp_path), "--preset", "tiny",
                              "--out", str(tmp_path / "run"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "\n<s>### Human: <Img><image></Img> <task>\n### Assistant: <Img><image></Img>\n###\n" in res.output
    assert ("<s> ### ĠHuman : Ġ < Img > [image 0: 17 slots] < / Img > Ġ [task: 10 slots] Ċ ### ĠAssistant : Ġ "
            "«< Img > [image 1: 17 slots, target] < / Img > Ċ ###»") in res.output
    assert "text-loss tokens: 9" in res.output and not (tmp_path / "run").exists()


def test_bad_data_is_one_line_error_and_nonzero_exit(tmp_path, pairs_file):
    (pairs_file.parent / "lq" / "2.png").write_bytes(b"broken")
    proc = subprocess.run([sys.executable, "-m", "lm4lv_cli.app", "train", "--data", str(pairs_file),
                           "--preset", "tiny", "--out", str(tmp_path / "run"), "--dry-run"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "sample 2" in err[0] and "2.png" in err[0]
    assert not (tmp_path / "run").exists()


def _console_script(*args, tmp_path):
    import os
    from pathlib import Path

    script = Path(sys.executable).with_name("lm4lv")  # the installed entry point
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_usage_errors_are_reported_by_the_cli_framework(tmp_path):
    for args, message in ((["train", "--bogus"], "No such option: --bogus"),
                          (["eval", "psnr", "imgs"], "Missing argument"),
                          (["no-such-command"], "No such command")):
        proc = _console_script(*args, tmp_path=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr + proc.stdout
        assert proc.stderr.startswith("Usage: lm4lv"), proc.stderr
        assert message in proc.stderr
    # lm4lv's own errors stay one line
    proc = _console_script("eval", "psnr", "nope-gt", "nope-pred", tmp_path=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: nope-gt: no such file or folder"


def test_train_and_ft_mae_declare_only_options_their_resolver_takes():
    """The command-line options of both training commands map onto the one option resolver: a
    declared option the resolver does not know (or a shared option one command lacks) fails here."""
    import typer.main

    from lm4lv_cli.options import RUN_OPTIONS
    from lm4lv_core.jobs import ft_mae, train

    commands = {c.name: c for c in typer.main.get_command(app).commands.values()}
    cli_only = {"config", "dry_run", "gpu_memory", "images"}  # handled by the command itself
    for name, valid in (("train", train.option_names()), ("ft-mae", ft_mae.option_names())):
        declared = {p.name for p in commands[name].params}
        assert set(RUN_OPTIONS) <= declared, name
        assert declared - cli_only <= valid, (name, sorted(declared - cli_only - valid))
