"""``<query>``: the learnable visual query. Its sequence layout, training (the query model's
vision loss falls), one-pass generation (equal to a hand-written forward, the same in mixed
batches as alone, for features and for codes), saving and reloading, and the commands."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import write_pairs, run_cli, overfit
from lm4lv_core.config import ModelConfig, ModuleSpec
from lm4lv_core.data.dataset import LM4LVDataset, collate
from lm4lv_core.data.format import as_generation_prompt, load_checked, parse_sample
from lm4lv_core.data.sequence import SLOT_IMAGE, SLOT_QUERY, SequenceBuilder
from lm4lv_core.errors import ConfigError
from lm4lv_core.model.generate import GenerationConfig, build_items, generate_samples, restore
from lm4lv_core.model.lm4lv import LM4LV
from lm4lv_core.registry import DECODERS, ENCODERS
from lm4lv_core.sources.presets import preset_config
from lm4lv_core.vision.base import VisionDecoder, VisionEncoder

N, K = 5, 3


def _sample(answer: str, human: str = "Fix <image> <task>", none: str | None = None):
    turns = [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    if none is not None:
        turns.append({"from": "none", "value": none})
    n = sum(t["value"].count("<image>") + t["value"].count("<query>") for t in turns)
    return parse_sample({"conversations": turns, "image": [f"/{i}.png" for i in range(n)]}, 0)


@pytest.fixture(scope="module")
def tok(tiny_config):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_config.llm)


# ------------------------------------------------------------------ data and sequence layout
@pytest.mark.parametrize("template", ["default", "vicuna_v1.1", "chat_template"])
def test_query_takes_the_place_of_an_image_target(tok, template):
    """A ``<query>`` answer renders like the ``<image>`` answer (same ids, labels, image indices and
    positions), but its slots are query slots whose target is read at the slot itself."""
    b = SequenceBuilder(tok, template=template, num_task_tokens=K, num_visual_tokens=N)
    img, qry = b.encode(_sample("Here <image> done")), b.encode(_sample("Here <query> done"))
    for f in ("input_ids", "labels", "slot_image", "slot_pos"):
        assert torch.equal(getattr(img, f), getattr(qry, f)), f
    swapped = img.slot_type.clone()
    swapped[img.slot_type == SLOT_IMAGE] = SLOT_QUERY
    swapped[img.slot_image == 0] = SLOT_IMAGE  # the human turn's input image stays an image
    assert torch.equal(qry.slot_type, swapped)
    assert int(img.target_mask.sum()) == N and not qry.target_mask.any()
    assert torch.equal(qry.query_mask, img.target_mask) and qry.text.count("<query>") == 1
    assert qry.image_is_target.tolist() == [False, True]


def test_query_in_a_none_turn_and_in_generation_prompts(tok):
    b = SequenceBuilder(tok, num_task_tokens=K, num_visual_tokens=N)
    s = _sample("ok", none="<query>")  # the default template trains none turns (text and images)
    enc = b.encode(s)
    assert int(enc.query_mask.sum()) == N and s.image_turns() == ["human", "none"] and s.has_query
    vicuna = SequenceBuilder(tok, template="vicuna_v1.1", num_task_tokens=K, num_visual_tokens=N).encode(s)
    assert int((vicuna.slot_type == SLOT_QUERY).sum()) == N and not vicuna.query_mask.any()  # not trained there
    # a training sample as a generation prompt loses its <query> answer and that image
    prompt = as_generation_prompt(_sample("<query>"))
    assert prompt.images == ("/0.png",) and not prompt.has_query
    # the generation prompt of a query model ends with <Img> and N query slots without an image
    gen = b.encode(prompt, generation=True, image_only=True, query=True)
    assert gen.slot_type[-N:].tolist() == [SLOT_QUERY] * N and gen.slot_image[-N:].tolist() == [-1] * N
    assert gen.slot_pos[-N:].tolist() == list(range(N)) and not gen.query_mask.any()
    plain = b.encode(prompt, generation=True, image_only=True)
    assert torch.equal(gen.input_ids[:-N], plain.input_ids) and len(gen) == len(plain) + N


# ------------------------------------------------------------------ model: training, generation, saving
@pytest.fixture(scope="module")
def query_data(tmp_path_factory):
    """Four noisy/clean pairs whose answers are ``<query>``."""
    root = tmp_path_factory.mktemp("query")
    data = json.loads(write_pairs(root, n=4).read_text())
    for d in data:
        d["conversations"][1]["value"] = "<query>"
    (root / "query.json").write_text(json.dumps(data))
    return root / "query.json"


def _train_batch(model, data_file):
    ds = LM4LVDataset(load_checked(data_file), model.builder, model.encoder.image_size)
    return collate([ds[i] for i in range(len(ds))], pad_id=model.builder.pad_id)


def test_query_model_learns_its_images(query_data):
    torch.manual_seed(0)
    model = LM4LV.from_config(preset_config("tiny", query=True))
    start = model.query_tokens.detach().clone()
    batch = _train_batch(model, query_data)
    assert int(batch.query_mask.sum()) == 4 * model.num_visual_tokens and not batch.target_mask.any()
    first, last = overfit(model, batch, 100, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    assert last <= 0.5 * first, (first, last)
    assert not torch.equal(model.query_tokens, start)
    # --freeze-query: the queries stay as built
    frozen = LM4LV.from_config(preset_config("tiny", query=True, train_query=False))
    assert not frozen.query_tokens.requires_grad and "query_tokens" in frozen.saved_parameter_names()


@pytest.fixture(scope="module")
def query_model():
    torch.manual_seed(0)
    model = LM4LV.from_config(preset_config("tiny", query=True)).eval()
    with torch.no_grad():  # non-trivial trainables
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _prompts(data_file, prompts):
    images = [s.images[0] for s in load_checked(data_file)]
    return [parse_sample({"image": [images[i % len(images)]],
                          "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": ""}]}, i)
            for i, p in enumerate(prompts)]


def _by_hand(model, sample):
    """The query image by hand: the prompt's embeddings, then the N query embeddings, one forward
    of the backbone, the deadapter on the last N hidden states."""
    items, _ = build_items(model, [sample], "image", query=False)  # the prompt, ending with <Img>
    b = collate(items, pad_id=model.builder.pad_id, padding_side="left")
    with torch.no_grad():
        emb = model.embed(b.input_ids, b.slot_type, b.slot_image, b.slot_pos, model.encode_images(b.pixels))
        emb = torch.cat([emb, model.query_tokens[None]], dim=1)
        L = emb.shape[1]
        h = model.backbone()(inputs_embeds=emb, attention_mask=torch.ones(1, L, dtype=torch.long),
                             position_ids=torch.arange(L)[None]).last_hidden_state
        return model.deadapter(h[0, -model.num_visual_tokens:])


def test_query_generation_is_one_forward_and_batch_independent(query_model, query_data, monkeypatch):
    prompts = _prompts(query_data, ["<image> <task>", "Restore the image <image> <task> please: remove the noise",
                                    "Describe <image>", "<task> <image>"])
    cfg = GenerationConfig(max_new_tokens=6)  # auto: restoration prompts image-only, the third text
    steps = []
    backbone = query_model.backbone()
    real = type(backbone).forward
    monkeypatch.setattr(type(backbone), "forward", lambda self, *a, **k: steps.append(1) or real(self, *a, **k))
    restoration = [prompts[i] for i in (0, 1, 3)]
    outs = generate_samples(query_model, restoration, cfg, batch_size=3)
    assert len(steps) == 1  # every image of the batch from one forward pass
    monkeypatch.undo()
    for s, o in zip(restoration, outs):
        assert o.text == "<image>" and len(o.features) == 1 and len(o.images) == 1
        assert (o.features[0] - _by_hand(query_model, s)).abs().max().item() <= 1e-5, s.index
    # a mixed batch (query images and a text answer) gives what batch size 1 gives
    mixed = generate_samples(query_model, prompts, cfg, batch_size=4)
    assert not mixed[2].features and mixed[2].token_ids
    for s, o in zip(prompts, mixed):
        single = generate_samples(query_model, [s], cfg, batch_size=1)[0]
        assert o.token_ids == single.token_ids and o.text == single.text, s.index
        for a, b in zip(o.features + o.images, single.features + single.images):
            assert (a - b).abs().max().item() <= 1e-4, s.index
    # --no-query: the same model one visual token per step (another algorithm, other tokens)
    step_by_step = generate_samples(query_model, restoration[:1], GenerationConfig(query=False))[0]
    assert (step_by_step.features[0] - outs[0].features[0]).abs().max().item() > 1e-3


def test_query_model_saves_and_reloads(query_model, query_data, tmp_path):
    from safetensors.torch import load_file

    query_model.save_pretrained(tmp_path / "m")
    assert "query_tokens" in load_file(str(tmp_path / "m" / "trainable.safetensors"))
    loaded = LM4LV.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.query and torch.equal(loaded.query_tokens, query_model.query_tokens)
    prompts = _prompts(query_data, ["<image> <task>"])
    a = generate_samples(query_model, prompts, GenerationConfig())[0]
    b = generate_samples(loaded, prompts, GenerationConfig())[0]
    assert torch.equal(a.features[0], b.features[0])
    from PIL import Image

    (img,) = restore(loaded, [Image.open(prompts[0].images[0])], prompt="<image> <task>")
    assert img.size == (32, 32)


def test_a_model_without_query_refuses_query_prompts(tiny_config, query_data):
    model = LM4LV.from_config(tiny_config)
    s = parse_sample({"image": [load_checked(query_data)[0].images[i] for i in (0, 1, 0)], "conversations": [
        {"from": "human", "value": "<image> <task>"}, {"from": "gpt", "value": "<query>"},
        {"from": "human", "value": "again <image> <task>"}, {"from": "gpt", "value": ""}]}, 7)
    with pytest.raises(ConfigError, match="sample 7: its prompt holds <query>, but this model was trained without"):
        generate_samples(model, [s], GenerationConfig())
    with pytest.raises(ConfigError, match="the data holds <query> but this model has no learnable query"):
        model(_train_batch(model, query_data))


# ------------------------------------------------------------------ codes: a query reads logits per slot
class _Codes(nn.Module):
    """A tiny discrete family for tests: 8×8 patches of a 32 px image → the nearest of 12 fixed
    colours (codes ``[B, 16]``); the decoder paints each patch in its code's colour."""

    dim, num_tokens, image_size, codebook_size = 3, 16, 32, 12

    def __init__(self):
        super().__init__()
        self.register_buffer("palette", torch.rand(self.codebook_size, 3, generator=torch.Generator().manual_seed(0)))


@ENCODERS.register("test-query-codes")
class CodesEncoder(_Codes, VisionEncoder):
    def forward(self, pixels):
        patches = nn.functional.avg_pool2d(pixels.float(), 8).flatten(2).transpose(1, 2)  # [B, 16, 3]
        return torch.cdist(patches, self.palette[None].expand(len(pixels), -1, -1)).argmin(-1)


@DECODERS.register("test-query-codes")
class CodesDecoder(_Codes, VisionDecoder):
    def forward(self, codes, clamp: bool = True):
        colours = self.palette[codes].transpose(1, 2).reshape(len(codes), 3, 4, 4)
        return nn.functional.interpolate(colours, scale_factor=8, mode="nearest")


def test_query_with_codes_picks_a_code_per_slot(tiny_config, query_data):
    torch.manual_seed(0)
    spec = ModuleSpec("test-query-codes")
    model = LM4LV.from_config(ModelConfig(llm=tiny_config.llm, encoder=spec, decoder=spec, query=True))
    assert model.config.vision_loss == "code_ce" and model.space.out_dim == 12
    batch = _train_batch(model, query_data)
    first, last = overfit(model, batch, 30, lr=1e-2)
    assert last < 0.5 * first
    model.eval()
    prompts = _prompts(query_data, ["<image> <task>", "Restore the image <image> <task> please: remove the noise"])
    greedy = generate_samples(model, prompts, GenerationConfig(), batch_size=2)
    for s, o in zip(prompts, greedy):
        codes = o.features[0]
        assert codes.dtype == torch.long and codes.shape == (16,) and o.images[0].shape == (3, 32, 32)
        assert torch.equal(codes, _by_hand(model, s).argmax(-1))
    sampled = GenerationConfig(temperature=1.0, seed=5)
    batched = generate_samples(model, prompts, sampled, batch_size=2)
    for s, o in zip(prompts, batched):  # each sample draws from its own generator: batch-independent
        assert torch.equal(o.features[0], generate_samples(model, [s], sampled, batch_size=1)[0].features[0])


# ------------------------------------------------------------------ the commands
_lm4lv = run_cli  # lm4lv ARGS in this process


def test_train_and_generate_with_query(query_data, tmp_path, monkeypatch, capsys):
    import yaml

    run, out = tmp_path / "run", tmp_path / "out"
    code, log = _lm4lv(monkeypatch, capsys, "train", "--data", query_data, "--preset", "tiny", "--out", run,
                       "--dry-run")
    assert code == 0, log
    log = " ".join(log.split())  # the console wraps long lines
    assert "[query for image 1: 17 slots, target read here]" in log and "query slots: 17" in log
    assert "learnable query for <query> (trained)" in log and not run.exists()
    code, log = _lm4lv(monkeypatch, capsys, "train", "--data", query_data, "--preset", "tiny", "--out", run,
                       "--max-steps", "2", "--micro-batch", "2", "--lr-schedule", "constant", "--warmup-ratio", "0")
    assert code == 0, log
    recorded = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert recorded["query"] is True and recorded["train_query"] is True
    code, log = _lm4lv(monkeypatch, capsys, "generate", "--run", run, "--data", query_data, "--out", out)
    assert code == 0, log
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == 4 and all(r["text"] == "<image>" and len(r["outputs"]) == 1 for r in results)
    # a model trained without <query> refuses a prompt that holds one, before writing anything
    plain = tmp_path / "plain"
    LM4LV.from_config(preset_config("tiny")).save_pretrained(plain)
    prompt = tmp_path / "prompt.json"
    data = json.loads(query_data.read_text())[:1]
    data[0]["conversations"] += [{"from": "human", "value": "again"}, {"from": "gpt", "value": ""}]
    prompt.write_text(json.dumps(data))
    code, log = _lm4lv(monkeypatch, capsys, "generate", "--run", plain, "--data", prompt, "--out", tmp_path / "o2",
                       "--image-root", query_data.parent)
    assert code == 2 and "sample 0: its prompt holds <query>, but the model in" in log
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("setup", [
    dict(zero_stage=3, gradient_checkpointing=True, lora=True),
    dict(zero_stage=2, cache_features=True),
    dict(engine="accelerate", gradient_checkpointing=True, cache_features=True),
    dict(zero_stage=3, train_query=False),
], ids=["zero3-checkpointing-lora", "zero2-cached-features", "accelerate", "zero3-frozen-query"])
def test_query_trains_under_every_engine(query_data, tmp_path, setup):
    """One step on ``<query>`` data: the query embeddings train (or stay, ``--freeze-query``) and
    are saved whole (ZeRO-3 partitions them: the saved tensor is gathered), the run records the
    query, and the saved model generates."""
    from safetensors.torch import load_file

    from lm4lv_core.config import LoraConfig
    from lm4lv_core.engine.config import TrainConfig
    from lm4lv_core.jobs.train import train

    setup = dict(setup)
    lora = LoraConfig(enabled=True) if setup.pop("lora", False) else LoraConfig()
    train_query = setup.pop("train_query", True)
    extra = {}
    if setup.get("zero_stage") == 3:
        ds = tmp_path / "ds.json"  # without it ZeRO-3 leaves the tiny tensors whole
        ds.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
        extra["deepspeed_config"] = str(ds)
    torch.manual_seed(0)  # the run's seed (0) builds the same model: its query embeddings before training
    start = LM4LV.from_config(preset_config("tiny", query=True)).query_tokens.detach()
    cfg = preset_config("tiny", lora=lora, train_query=train_query)
    out = tmp_path / "run"
    train(TrainConfig(data=str(query_data), out=str(out), micro_batch=2, max_steps=1, lr_schedule="constant",
                      warmup_ratio=0.0, **setup, **extra), cfg)
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["query"]  # from the data, recorded in the run
    saved = load_file(str(out / "final" / "trainable.safetensors"))["query_tokens"]
    assert saved.shape == start.shape and torch.equal(saved, start) == (not train_query)
    model = LM4LV.from_pretrained(out / "final").eval()
    o = generate_samples(model, _prompts(query_data, ["<image> <task>"]), GenerationConfig())[0]
    assert len(o.features) == 1 and torch.isfinite(o.features[0]).all()
