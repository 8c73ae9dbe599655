import copy
import json

import pytest

from lm4lv_core.data.format import find_image_problems, load_checked, load_samples, parse_sample
from lm4lv_core.errors import DataError
from conftest import REFERENCE

GOOD = {"task_type": "conversation",
        "conversations": [{"role": "human", "value": "<image> <task>"}, {"role": "gpt", "value": "<image>"}],
        "image": ["lq.png", "hq.png"]}


@pytest.mark.parametrize("name", ["example_denoising.json", "example_captioning.json"])
def test_reference_examples_parse_unchanged(name):
    samples = load_samples(REFERENCE / name)
    raw = json.loads((REFERENCE / name).read_text())
    assert len(samples) == len(raw) > 0
    for s, r in zip(samples, raw):
        assert [t.value for t in s.turns] == [c["value"] for c in r["conversations"]]
        assert [t.role for t in s.turns] == [c["from"] for c in r["conversations"]]
        assert len(s.images) == len(r["image"])


def test_role_and_from_keys_and_single_path():
    s = parse_sample({"conversations": [{"from": "human", "value": "<image>"}, {"role": "gpt", "value": "x"}],
                      "image": "/abs/a.png"}, 0)
    assert s.images == ("/abs/a.png",) and [t.role for t in s.turns] == ["human", "gpt"]
    assert s.task_type == "conversation"


def test_relative_paths_resolve_against_root(tmp_path):
    s = parse_sample(GOOD, 0, image_root=tmp_path)
    assert s.images == (str(tmp_path / "lq.png"), str(tmp_path / "hq.png"))


def _bad(mutate):
    obj = copy.deepcopy(GOOD)
    mutate(obj)
    return obj


@pytest.mark.parametrize("mutate,needle", [
    (lambda o: o["image"].pop(), "2 <image> placeholder(s) but 1 image"),
    (lambda o: o["conversations"][0].update(role="robot"), "unknown role 'robot'"),
    (lambda o: o["conversations"].reverse(), "first turn must be 'human' or 'none'"),
    (lambda o: o.update(task_type="chat"), "task_type must be one of"),
    (lambda o: o["conversations"][1].pop("role"), "no 'role' or 'from'"),
    (lambda o: o["conversations"][1].update(value=3), "'value' must be a string"),
    (lambda o: o.update(conversations=[]), "non-empty list"),
    (lambda o: o["conversations"][0].update(value="<query> <task>"), "turn 0: <query> stands for an image the model "
     "generates, so it belongs in a gpt or none turn, not a human turn"),
    (lambda o: o["conversations"][1].update(value="<query> <query>"), "3 <image>/<query> placeholder(s) but 2 image"),
])
def test_bad_samples_name_the_index(tmp_path, mutate, needle):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([GOOD, GOOD, _bad(mutate)]))
    with pytest.raises(DataError) as e:
        load_samples(f)
    assert f"sample 2" in str(e.value) and needle in str(e.value) and str(f) in str(e.value)


def test_file_level_errors(tmp_path):
    f = tmp_path / "d.json"
    f.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_samples(f)
    f.write_text("[]")
    with pytest.raises(DataError, match="no samples"):
        load_samples(f)
    with pytest.raises(DataError, match="not found"):
        load_samples(tmp_path / "missing.json")


def test_image_checks_report_missing_and_unreadable(tmp_path):
    (tmp_path / "lq.png").write_bytes(b"not a png")
    f = tmp_path / "d.json"
    f.write_text(json.dumps([GOOD]))
    problems = find_image_problems(load_samples(f))
    assert any("lq.png: unreadable image" in p and p.startswith("sample 0") for p in problems)
    assert any("hq.png: file not found" in p for p in problems)
    with pytest.raises(DataError, match="2 image problem"):
        load_checked(f)


def test_training_needs_an_answer_and_generation_an_open_turn(tmp_path):
    f = tmp_path / "d.json"
    gen = _bad(lambda o: (o["conversations"][1].update(value=""), o["image"].pop()))
    f.write_text(json.dumps([gen]))
    with pytest.raises(DataError, match="sample 0: no non-empty 'gpt' \\(or 'none'\\) turn"):
        load_checked(f, mode="train", check_files=False)
    s = load_checked(f, mode="generate", check_files=False)[0]
    assert s.is_generation_prompt and not s.answer_dropped


def test_generation_on_a_training_file_drops_the_last_answer_and_its_images(tmp_path):
    """A training file serves as generation prompts: the last gpt answer (and the target image it
    holds) is dropped, so the sample equals the explicit generation prompt; the dropped target
    image need not exist."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "lq.png")
    f = tmp_path / "train.json"
    two_answers = {"conversations": [{"from": "human", "value": "<image> <task>"},
                                     {"from": "gpt", "value": "<image>"},
                                     {"from": "human", "value": "Again, <task>"},
                                     {"from": "gpt", "value": "Done: <image> <image>"}],
                   "image": ["lq.png", "hq.png", "hq2.png", "hq3.png"]}
    f.write_text(json.dumps([GOOD, two_answers]))
    got = load_checked(f, mode="generate", check_files=False)
    prompt = copy.deepcopy(GOOD)
    prompt["conversations"][1]["value"] = ""
    prompt["image"] = ["lq.png"]
    assert got[0].to_json() == parse_sample(prompt, 0, image_root=tmp_path).to_json()
    assert got[0].answer_dropped and got[0].is_generation_prompt
    assert [t.value for t in got[1].turns] == ["<image> <task>", "<image>", "Again, <task>", ""]
    assert got[1].images == (str(tmp_path / "lq.png"), str(tmp_path / "hq.png"))
    f.write_text(json.dumps([GOOD]))
    assert load_checked(f, mode="generate")[0].images == (str(tmp_path / "lq.png"),)  # hq.png is absent
    with pytest.raises(DataError, match="hq.png: file not found"):
        load_checked(f, mode="train")
