import pytest
import torch
from transformers import AutoTokenizer

from lm4lv_core.data.format import parse_sample
from lm4lv_core.data.sequence import IGNORE_INDEX, SLOT_IMAGE, SLOT_TASK, SLOT_TEXT, SequenceBuilder

N, K = 5, 3


@pytest.fixture(scope="module")
def tok(tiny_config):
    return AutoTokenizer.from_pretrained(tiny_config.llm)


def two_turn():
    return parse_sample({"conversations": [{"from": "human", "value": "Fix <image> <task>"},
                                           {"from": "gpt", "value": "<image> done"}],
                         "image": ["/lq.png", "/hq.png"]}, 0)


def test_two_turn_sample_with_gpt_prefix_hand_checked(tok):
    b = SequenceBuilder(tok, template="default", num_task_tokens=K, num_visual_tokens=N,
                        gpt_prefix="Sure:", system_prompt="")
    enc = b.encode(two_turn())
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    P = tok.pad_token_id
    # (kind, ids, trainable) in order
    parts = [("t", [tok.bos_token_id], False), ("t", ids("### Human: "), False), ("t", ids("Fix "), False),
             ("t", ids("<Img>"), False), ("i0", [P] * N, False), ("t", ids("</Img>"), False),
             ("t", ids(" "), False), ("k", [P] * K, False), ("t", ids("\n"), False),
             ("t", ids("### Assistant: "), False), ("t", ids("Sure:"), False),
             ("t", ids("<Img>"), True), ("i1", [P] * N, True), ("t", ids("</Img>"), True),
             ("t", ids(" done"), True), ("t", [tok.eos_token_id], True), ("t", ids("\n"), False)]
    exp_ids, exp_labels, exp_type, exp_img, exp_pos, exp_target = [], [], [], [], [], []
    for kind, toks, trainable in parts:
        exp_ids += toks
        text = kind == "t"
        exp_labels += toks if (text and trainable) else [IGNORE_INDEX] * len(toks)
        exp_type += [SLOT_TEXT if text else SLOT_TASK if kind == "k" else SLOT_IMAGE] * len(toks)
        exp_img += [int(kind[1])] * len(toks) if kind.startswith("i") else [-1] * len(toks)
        exp_pos += list(range(len(toks))) if kind != "t" else [0] * len(toks)
        exp_target += [kind == "i1"] * len(toks)
    assert enc.input_ids.tolist() == exp_ids
    assert enc.labels.tolist() == exp_labels
    assert enc.slot_type.tolist() == exp_type
    assert enc.slot_image.tolist() == exp_img
    assert enc.slot_pos.tolist() == exp_pos
    assert enc.target_mask.tolist() == exp_target
    assert enc.image_is_target.tolist() == [False, True]
    # the prefix is in the sequence but never in the loss
    prefix = ids("Sure:")
    start = next(i for i in range(len(exp_ids)) if exp_ids[i:i + len(prefix)] == prefix)
    assert all(enc.labels[start + j] == IGNORE_INDEX for j in range(len(prefix)))


def test_generation_prompt_stays_open_and_image_only_opens_img(tok):
    b = SequenceBuilder(tok, template="default", num_task_tokens=K, num_visual_tokens=N, system_prompt="")
    s = parse_sample({"conversations": [{"from": "human", "value": "<image> <task>"},
                                        {"from": "gpt", "value": ""}], "image": ["/lq.png"]}, 0)
    enc = b.encode(s, generation=True)
    assert enc.text.endswith("### Assistant: ")
    assert (enc.labels == IGNORE_INDEX).all()
    enc2 = b.encode(s, generation=True, image_only=True)
    img = tok("<Img>", add_special_tokens=False)["input_ids"]
    assert enc2.input_ids[-len(img):].tolist() == img


@pytest.mark.parametrize("template,needle", [
    ("vicuna_v1.1", " USER: "), ("llama2", "[INST]"), ("chat_template", "<|assistant|>")])
def test_templates_render_roles(tok, template, needle):
    b = SequenceBuilder(tok, template=template, num_task_tokens=K, num_visual_tokens=N)
    enc = b.encode(two_turn())
    assert needle in enc.text
    assert int((enc.slot_type == SLOT_IMAGE).sum()) == 2 * N
    assert int(enc.target_mask.sum()) == N
    # only the gpt answer carries text loss
    trained = tok.decode(enc.labels[enc.labels != IGNORE_INDEX])
    assert "done" in trained and "Fix" not in trained


def test_simple_task_type_is_plain_concatenation(tok):
    b = SequenceBuilder(tok, template="default", num_task_tokens=K, num_visual_tokens=N)
    s = parse_sample({"task_type": "simple", "conversations": [{"from": "none", "value": "a photo: "},
                                                               {"from": "gpt", "value": "a cat"}]}, 0)
    enc = b.encode(s)
    assert enc.text == tok.bos_token + "a photo: a cat"
    assert tok.decode(enc.labels[enc.labels != IGNORE_INDEX]) == "a cat"


def test_collate_pads_and_renumbers_images(tok):
    from lm4lv_core.data.dataset import Item, collate

    b = SequenceBuilder(tok, num_task_tokens=K, num_visual_tokens=N)
    s1 = two_turn()
    s2 = parse_sample({"conversations": [{"from": "human", "value": "<image> hi"},
                                         {"from": "gpt", "value": "<image>"}], "image": ["/a", "/b"]}, 1)
    items = [Item(s, b.encode(s), torch.rand(2, 3, 8, 8)) for s in (s1, s2)]
    for side in ("right", "left"):
        batch = collate(items, pad_id=tok.pad_token_id, padding_side=side)
        assert batch.pixels.shape[0] == 4
        assert set(batch.slot_image[1][batch.slot_type[1] == SLOT_IMAGE].tolist()) == {2, 3}
        assert batch.attention_mask.sum(1).tolist() == [len(it.encoded) for it in items]
        short = int(batch.attention_mask[1].sum())
        # positions count only real tokens
        assert batch.position_ids[1][batch.attention_mask[1].bool()].tolist() == list(range(short))
        assert int(batch.target_mask.sum()) == 2 * N


def test_chat_template_gets_the_system_prompt(tok):
    b = SequenceBuilder(tok, template="chat_template", num_task_tokens=K, num_visual_tokens=N,
                        system_prompt="Be brief.")
    enc = b.encode(two_turn())
    assert enc.text.startswith("<|system|>Be brief.\n<|user|>Fix")
