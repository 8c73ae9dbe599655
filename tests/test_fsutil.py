"""Folder helpers: removing lm4lv's own entries of an earlier run and nothing else."""

from __future__ import annotations

import os

from lm4lv_core.util.fsutil import remove_entries


def test_remove_entries_removes_only_the_named_entries(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "checkpoints" / "step-2" / "w.safetensors").write_bytes(b"w")
    (out / "metrics.csv").write_text("step\n")
    (out / "notes.txt").write_text("mine")
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"png")
    os.symlink(elsewhere, out / "previews")  # a link is removed, not the folder it points to
    removed = remove_entries(out, ["checkpoints", "final", "metrics.csv", "previews"])
    assert sorted(p.name for p in removed) == ["checkpoints", "metrics.csv", "previews"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (elsewhere / "keep.png").read_bytes() == b"png"
    assert remove_entries(out, ["checkpoints"]) == []  # nothing left to remove
    assert remove_entries(tmp_path / "missing", ["x"]) == []
