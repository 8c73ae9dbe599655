"""Rendering and tokenisation of conversations.

The ``default`` template renders what the LM4LV reference renders, token for token.

``reference_encode`` below is the reference's algorithm written out step by step from its code
(``build_one_instance``, ``make_prompt_start`` and ``prompt_wrap`` in ``src/model/LM4LV.py``): every
turn's text in one tokenizer call with ``<image>`` / ``<query>`` / ``<task>`` added to the
tokenizer, added-token ids replaced by negative slot markers, targets, and the vision-target mask
shifted one position left and cleared where the next position is not trained. Its result is
compared with ``SequenceBuilder`` for a byte-level BPE tokenizer (the tiny preset's) and a
Llama-style SentencePiece tokenizer (``LlamaTokenizer``: byte-fallback BPE with a Metaspace
pre-tokenizer), both built offline.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import REFERENCE
from lm4lv_core.data.format import as_generation_prompt, parse_sample
from lm4lv_core.data.sequence import IGNORE_INDEX, SLOT_IMAGE, SLOT_TASK, SLOT_TEXT, SequenceBuilder

N, K = 5, 3
INVALID, CONTROL, VISION_START, TASK_START = -100, -1, -2, -4


@pytest.fixture(scope="module")
def tok(tiny_config):
    """The tiny preset's byte-level BPE tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_config.llm)


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory):
    """A Llama tokenizer (transformers' ``LlamaTokenizer``) with a vocabulary trained on the spot."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, LlamaTokenizer

    from lm4lv_core.sources.presets import _CORPUS

    raw = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    raw.train_from_iterator(_CORPUS * 4, trainer=trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                                                     show_progress=False))
    model = json.loads(raw.to_str())["model"]
    out = tmp_path_factory.mktemp("llama-tok")
    LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]]).save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(tok).__name__ == "LlamaTokenizer" and "Metaspace" in str(tok.backend_tokenizer.pre_tokenizer)
    return tok


@pytest.fixture(params=["tok", "metaspace"], ids=["bpe", "metaspace"])
def any_tok(request):
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------------ the reference, written out
def reference_encode(tok, sample: dict, *, gpt_prefix=None, system=None, generation=False, image_only=False):
    """(input ids with slot markers, targets, vision-target mask) as the reference builds them."""
    ref = copy.deepcopy(tok)
    ref.add_tokens(["<image>", "<query>", "<task>"])
    image_id, task_id = ref.convert_tokens_to_ids("<image>"), ref.convert_tokens_to_ids("<task>")
    conv = copy.deepcopy(sample["conversations"])
    if image_only:  # generate_image_only: the last turn becomes "<Img>"
        conv[-1]["value"] = "<Img>"
    input_ids, target_ids = [], []
    for i, turn in enumerate(conv):
        role = turn.get("from", turn.get("role"))
        value = turn["value"].replace("<image>", "<Img><image></Img>")
        last_open = generation and i == len(conv) - 1
        if role == "human":
            text = ("Human: " + value if i != 0 else value) + "\n### Assistant: "
            if gpt_prefix is not None:
                text += gpt_prefix
        elif role == "gpt":
            text = value if last_open else value + "\n###"
        else:
            text = value if last_open else value + "\n"
        ids = []
        for t in ref(text, add_special_tokens=False).input_ids:
            if t == image_id:
                ids += [VISION_START] + [CONTROL] * (N - 1)
            elif t == task_id:
                ids += [TASK_START] + [CONTROL] * (K - 1)
            else:
                ids.append(t)
        input_ids += ids
        target_ids += [INVALID] * len(ids) if role == "human" else [CONTROL if t < 0 else t for t in ids]
    start = []
    if sample.get("task_type", "normal") != "simple":
        start = ref((f"{system}\n\n" if system else "") + "### Human: ", add_special_tokens=False).input_ids
    ids = [tok.bos_token_id] + start + input_ids
    targets = [INVALID] * (1 + len(start)) + target_ids
    mask = [INVALID] * len(ids)
    k = -1
    for p, t in enumerate(ids):
        if t == VISION_START:
            k += 1
            mask[p - 1:p - 1 + N] = [k] * N
    mask = [INVALID if targets[(p + 1) % len(ids)] == INVALID else m for p, m in enumerate(mask)]
    targets = [INVALID if t == CONTROL else t for t in targets]
    return ids, targets, mask


def expected(tok, sample: dict, pad_id: int, **kw) -> dict[str, list]:
    """The reference's encoding in ``Encoded``'s terms (slot type / image / position per position)."""
    ids, targets, mask = reference_encode(tok, sample, **kw)
    out = {k: [] for k in ("input_ids", "labels", "slot_type", "slot_image", "slot_pos", "target_mask")}
    kind, image, pos = SLOT_TEXT, -1, 0
    for p, t in enumerate(ids):
        if t == VISION_START:
            kind, image, pos = SLOT_IMAGE, image + 1, 0
        elif t == TASK_START:
            kind, pos = SLOT_TASK, 0
        elif t == CONTROL:
            pos += 1
        else:
            kind = SLOT_TEXT
        slot = kind != SLOT_TEXT
        out["input_ids"].append(pad_id if slot else t)
        out["labels"].append(targets[p])
        out["slot_type"].append(kind)
        out["slot_image"].append(image if kind == SLOT_IMAGE else -1)
        out["slot_pos"].append(pos if slot else 0)
        out["target_mask"].append(kind == SLOT_IMAGE and mask[p - 1] != INVALID)
    return out


def assert_reference(tok, sample: dict, *, gpt_prefix=None, system=None, generation=False, image_only=False,
                     index=0):
    b = SequenceBuilder(tok, num_task_tokens=K, num_visual_tokens=N, gpt_prefix=gpt_prefix or "",
                        system_prompt=system)
    s = parse_sample(sample, index)
    if generation:
        s = as_generation_prompt(s)
    enc = b.encode(s, generation=generation, image_only=image_only)
    ref_sample = copy.deepcopy(sample)
    if generation and not image_only:  # a training sample's last answer is dropped (image-only replaces it)
        ref_sample["conversations"][-1]["value"] = ""
    want = expected(tok, ref_sample, b.pad_id, gpt_prefix=gpt_prefix, system=system, generation=generation,
                    image_only=image_only)
    if generation:  # labels of a generation prompt are never used
        del want["labels"]
    got = {k: getattr(enc, k).tolist() for k in want}
    for key in want:
        assert got[key] == want[key], (key, enc.text)
    images = [i for i, t in zip(want["slot_image"], want["target_mask"]) if t]
    assert enc.image_is_target.tolist() == [i in images for i in range(len(s.images))]
    return enc


def view(tok, enc) -> list[str]:
    """Tokens as strings, one item per image (``IMG0``, ``IMG1*`` for a target) / task block;
    trained text tokens end with ``*``."""
    out = []
    for i, t in enumerate(enc.slot_type.tolist()):
        if t == SLOT_TEXT:
            trained = enc.labels[i] != IGNORE_INDEX
            out.append(tok.convert_ids_to_tokens(int(enc.input_ids[i])) + ("*" if trained else ""))
        elif enc.slot_pos[i] == 0:
            k = int(enc.slot_image[i])
            out.append("TASK" if t == SLOT_TASK else f"IMG{k}" + ("*" if enc.image_is_target[k] else ""))
    return out


def _examples():
    return [(name, i, s) for name in ("example_denoising.json", "example_captioning.json")
            for i, s in enumerate(json.loads((REFERENCE / name).read_text()))]


# ------------------------------------------------------------------ the cases
TWO_TURNS = {"conversations": [{"from": "human", "value": "Fix <image> <task>"},
                               {"from": "gpt", "value": "<image> done"},
                               {"from": "human", "value": "Again: <image>\n<task>"},
                               {"from": "gpt", "value": "A picture <image>"}],
             "image": ["/lq.png", "/hq.png", "/lq2.png", "/hq2.png"]}
NONE_TURNS = {"conversations": [{"from": "none", "value": "A photo <image>"},
                                {"from": "human", "value": "<task> the rain"},
                                {"from": "none", "value": "<image> restored"},
                                {"from": "gpt", "value": "a cat"}],
              "image": ["/lq.png", "/hq.png"]}
SIMPLE = {"task_type": "simple",
          "conversations": [{"from": "none", "value": "<image>"}, {"from": "none", "value": "<task> <image>"}],
          "image": ["/lq.png", "/hq.png"]}
SIMPLE_CHAT = {"task_type": "simple",
               "conversations": [{"from": "human", "value": "<image> <task>"}, {"from": "gpt", "value": "<image>"}],
               "image": ["/lq.png", "/hq.png"]}
PROMPT = {"conversations": [{"from": "human", "value": "<image> <task>"}, {"from": "gpt", "value": ""}],
          "image": ["/lq.png"]}


@pytest.mark.parametrize("name,index,sample", _examples(), ids=lambda x: x if isinstance(x, str) else None)
def test_reference_example_files(any_tok, name, index, sample):
    assert_reference(any_tok, sample, index=index)


@pytest.mark.parametrize("sample", [TWO_TURNS, NONE_TURNS, SIMPLE, SIMPLE_CHAT], ids=["two-turn", "none", "simple",
                                                                                   "simple-chat"])
def test_conversations(any_tok, sample):
    enc = assert_reference(any_tok, sample)
    text = {id(TWO_TURNS): "<s>### Human: Fix <Img><image></Img> <task>\n### Assistant: <Img><image></Img> done\n###"
                           "Human: Again: <Img><image></Img>\n<task>\n### Assistant: A picture <Img><image></Img>\n###",
            id(NONE_TURNS): "<s>### Human: A photo <Img><image></Img>\nHuman: <task> the rain\n### Assistant: "
                            "<Img><image></Img> restored\na cat\n###",
            id(SIMPLE): "<s><Img><image></Img>\n<task> <Img><image></Img>\n",
            id(SIMPLE_CHAT): "<s><Img><image></Img> <task>\n### Assistant: <Img><image></Img>\n###"}[id(sample)]
    assert enc.text == text.replace("<s>", any_tok.bos_token)
    # none turns train like gpt answers (text and images); human turns never
    assert enc.image_is_target.tolist() == {id(TWO_TURNS): [False, True, False, True], id(NONE_TURNS): [True, True],
                                            id(SIMPLE): [True, True], id(SIMPLE_CHAT): [False, True]}[id(sample)]


@pytest.mark.parametrize("prefix,system", [("A picture", None), (" Sure:", "Be brief.")])
def test_gpt_prefix_and_system_prompt(any_tok, prefix, system):
    sample = json.loads((REFERENCE / "example_denoising.json").read_text())[0]
    enc = assert_reference(any_tok, sample, gpt_prefix=prefix, system=system)
    assert enc.text.startswith(f"<s>{system}\n\n### Human: " if system else "<s>### Human: ")
    assert f"### Assistant: {prefix}<Img><image></Img>\n###" in enc.text


@pytest.mark.parametrize("image_only", [False, True])
@pytest.mark.parametrize("sample", [PROMPT, TWO_TURNS], ids=["prompt", "training-file"])
def test_generation(any_tok, sample, image_only):
    enc = assert_reference(any_tok, sample, generation=True, image_only=image_only)
    assert enc.text.endswith("### Assistant: <Img>" if image_only else "### Assistant: ")


def test_denoising_tokens_pinned_byte_level_bpe(tok):
    """The reference's units: "### Assistant: " ends the human turn and the answer is tokenised
    alone, so byte-level BPE keeps the trailing space token; "\\n###" ends and trains the answer."""
    sample = json.loads((REFERENCE / "example_denoising.json").read_text())[0]
    b = SequenceBuilder(tok, num_task_tokens=K, num_visual_tokens=N)
    enc = b.encode(parse_sample(sample, 0))
    assert enc.text == "<s>### Human: <Img><image></Img> <task>\n### Assistant: <Img><image></Img>\n###"
    assert view(tok, enc) == [
        "<s>", "###", "ĠHuman", ":", "Ġ", "<", "Img", ">", "IMG0", "<", "/", "Img", ">", "Ġ", "TASK", "Ċ",
        "###", "ĠAssistant", ":", "Ġ", "<*", "Img*", ">*", "IMG1*", "<*", "/*", "Img*", ">*", "Ċ*", "###*"]
    assert enc.target_mask.sum() == N and enc.image_is_target.tolist() == [False, True]
    # a gpt prefix is tokenised with the human turn: ':', 'ĠA' (no lone space token), untrained
    enc = SequenceBuilder(tok, num_task_tokens=K, num_visual_tokens=N, gpt_prefix="A picture").encode(
        parse_sample(sample, 0))
    v = view(tok, enc)
    i = v.index("ĠAssistant")
    assert v[i:i + 6] == ["ĠAssistant", ":", "ĠA", "Ġpictu", "re", "<*"]


def test_denoising_tokens_pinned_llama_sentencepiece(metaspace):
    """Llama (Metaspace) tokenizers put a prefix space at the start of every tokenizer call, as in
    the reference: the answer starts with '▁<Img>' after the human turn's trailing '▁'; the text
    right after an added token gets none; "\\n###" is '<0x0A>', '##', '#'."""
    sample = json.loads((REFERENCE / "example_denoising.json").read_text())[0]
    enc = SequenceBuilder(metaspace, num_task_tokens=K, num_visual_tokens=N).encode(parse_sample(sample, 0))
    assert view(metaspace, enc) == [
        "<s>", "▁###", "▁Human:", "▁", "▁<Img>", "IMG0", "<", "/I", "mg>", "▁", "TASK", "<0x0A>", "##", "#",
        "▁Assistant:", "▁", "▁<Img>*", "IMG1*", "<*", "/I*", "mg>*", "<0x0A>*", "##*", "#*"]


def test_placeholders_inside_words_and_query_refused(any_tok):
    """Added tokens split text wherever they stand, as in the reference; <query> in a human turn is refused."""
    sample = {"conversations": [{"from": "human", "value": "x<image>y<task>z"}, {"from": "gpt", "value": "ok"}],
              "image": ["/a.png"]}
    assert_reference(any_tok, sample)
    with pytest.raises(Exception, match="<query>"):
        parse_sample({"conversations": [{"from": "human", "value": "<query>"}, {"from": "gpt", "value": "a"}]}, 0)


# ------------------------------------------------------------------ the other templates
def two_turn():
    return parse_sample({"conversations": [{"from": "human", "value": "Fix <image> <task>"},
                                           {"from": "gpt", "value": "<image> done"}],
                         "image": ["/lq.png", "/hq.png"]}, 0)


@pytest.mark.parametrize("template,needle", [
    ("vicuna_v1.1", " USER: "), ("llama2", "[INST]"), ("chat_template", "<|assistant|>")])
def test_templates_render_roles(tok, template, needle):
    b = SequenceBuilder(tok, template=template, num_task_tokens=K, num_visual_tokens=N)
    enc = b.encode(two_turn())
    assert needle in enc.text
    if template == "vicuna_v1.1":
        assert enc.text == ("<s>A chat between a curious user and an artificial intelligence assistant. The assistant "
                            "gives helpful, detailed, and polite answers to the user's questions. USER: Fix "
                            "<Img><image></Img> <task> ASSISTANT: <Img><image></Img> done</s>")
    assert int((enc.slot_type == SLOT_IMAGE).sum()) == 2 * N
    assert int(enc.target_mask.sum()) == N
    # only the gpt answer carries text loss
    trained = tok.decode(enc.labels[enc.labels != IGNORE_INDEX])
    assert "done" in trained and "Fix" not in trained


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


@pytest.mark.parametrize("n", [None, 5])
def test_model_preview_and_memory_plan_share_one_layout(tiny_config, n):
    """The model, the ``--dry-run`` preview and the memory plan build the token sequence of a config
    the same way (``SequenceBuilder.for_model``, with the truncated token count of ``visual_space``)."""
    import dataclasses

    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.model.prompt import config_sequence
    from lm4lv_core.vision import visual_space

    cfg = dataclasses.replace(tiny_config, num_visual_tokens=n, decoder=None if n else tiny_config.decoder)
    model = LM4LV.from_config(cfg)
    assert visual_space(model.config) == model.space and model.space.num_tokens == (n or model.encoder.num_tokens)
    sample = parse_sample({"image": ["a.png"], "conversations": [
        {"from": "human", "value": "Describe <image> <task>"}, {"from": "gpt", "value": "a cat"}]}, 0)
    a, b = model.builder.encode(sample), config_sequence(model.config).encode(sample)
    for field in ("input_ids", "labels", "slot_type", "slot_pos", "slot_image"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
