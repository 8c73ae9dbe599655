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


def test_streamed_json_is_the_json_of_the_whole_object(tmp_path):
    """A list given as a JsonStream (make-data's samples, eval's rows) is written item by item,
    and the file is exactly what json.dumps of the whole object writes."""
    import json

    from lm4lv_core.util.fsutil import JsonStream, write_json_atomic

    rows = [{"name": "a/ü", "psnr": 21.5, "tags": [1, 2]}, {"name": "b", "psnr": float("inf")}]
    whole = {"count": 2, "predictions": [{"label": "x", "images": rows}, {"label": "y", "images": []}]}
    for indent in (2, None):
        streamed = {"count": 2, "predictions": [{"label": "x", "images": JsonStream(iter(rows))},
                                                {"label": "y", "images": JsonStream(iter([]))}]}
        write_json_atomic(tmp_path / "a.json", streamed, indent=indent)
        assert (tmp_path / "a.json").read_text(encoding="utf-8") == \
            json.dumps(whole, indent=indent, ensure_ascii=False) + "\n"
    write_json_atomic(tmp_path / "top.json", JsonStream(r for r in rows))
    assert json.loads((tmp_path / "top.json").read_text(encoding="utf-8")) == json.loads(json.dumps(rows))
    assert [p.name for p in tmp_path.iterdir()] and not [p for p in tmp_path.iterdir() if p.name.startswith(".lm4lv-tmp")]
