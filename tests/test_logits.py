"""LLMs that post-process their logits (soft-capping, logit scaling): LM4LV's text loss and
sampling use the same logits as the LLM's own forward, and other post-processing is refused."""

import dataclasses

import pytest
import torch

from lm4lv_core.errors import ConfigError
from lm4lv_core.model.logits import check_output_logits, output_logits

V, D = 96, 32


def _tiny(kind: str):
    import transformers as tf

    common = dict(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    if kind == "gemma2":
        cfg = tf.Gemma2Config(**common, head_dim=16, final_logit_softcapping=0.5)
        return tf.Gemma2ForCausalLM(cfg)
    if kind == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, head_dim=16, final_logit_softcapping=0.5)
        return tf.Gemma3ForCausalLM(cfg)
    if kind == "cohere":
        return tf.CohereForCausalLM(tf.CohereConfig(**common, logit_scale=0.0625))
    if kind == "granite":
        return tf.GraniteForCausalLM(tf.GraniteConfig(**common, logits_scaling=4.0))
    return tf.LlamaForCausalLM(tf.LlamaConfig(**common))


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "cohere", "granite", "llama"])
def test_logits_from_hidden_states_equal_the_llms_own(kind):
    llm = _tiny(kind).eval()
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = llm(inputs_embeds=x).logits
        h = llm.get_decoder()(inputs_embeds=x).last_hidden_state
        ours = output_logits(llm, h)
        plain = llm.get_output_embeddings()(h)
    assert torch.allclose(ours, own, atol=1e-6, rtol=1e-5), (ours - own).abs().max()
    if kind != "llama":  # the post-processing matters for these models
        assert (plain - own).abs().max() > 1e-3
    check_output_logits(llm, kind)  # accepted at load


def test_unknown_logit_post_processing_is_refused():
    from transformers import LlamaForCausalLM

    class Doubled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    llm = Doubled(_tiny("llama").config)
    with pytest.raises(ConfigError, match="post-processes its logits in a way lm4lv does not reproduce"):
        check_output_logits(llm, "/models/doubled")
    assert "forward" not in vars(llm.get_decoder())  # the probe left the backbone as it was


def test_lm4lv_text_loss_and_sampling_use_cohere_logit_scale(tmp_path, tiny_config, monkeypatch):
    from transformers import AutoTokenizer, CohereConfig, CohereForCausalLM

    from lm4lv_core.model import generate as gen
    from lm4lv_core.data.dataset import LM4LVDataset, collate
    from lm4lv_core.data.format import parse_sample
    from lm4lv_core.model.lm4lv import LM4LV

    from PIL import Image

    tok = AutoTokenizer.from_pretrained(tiny_config.llm)
    tok.save_pretrained(tmp_path / "llm")
    torch.manual_seed(0)
    cfg = CohereConfig(vocab_size=len(tok), hidden_size=D, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, logit_scale=0.0625,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    CohereForCausalLM(cfg).save_pretrained(tmp_path / "llm")
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.png")
    model = LM4LV.from_config(dataclasses.replace(tiny_config, llm=str(tmp_path / "llm"))).eval()

    def batch_of(conv, generation):
        s = parse_sample({"image": [str(tmp_path / "a.png")], "conversations": conv}, 0, source="test")
        ds = LM4LVDataset([s], model.builder, model.encoder.image_size, generation=generation)
        return collate([ds[0]], pad_id=model.tokenizer.pad_token_id, padding_side="left" if generation else "right")

    def own_logits(batch):
        feats = model.encode_images(batch.pixels)
        emb = model.embed(batch.input_ids, batch.slot_type, batch.slot_image, batch.slot_pos, feats)
        return model.llm(inputs_embeds=emb, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids).logits

    # text loss: the cross-entropy of the LLM's own (scaled) logits on the answer's tokens
    batch = batch_of([{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "A red square"}], False)
    with torch.no_grad():
        out = model(batch)
        logits = own_logits(batch)[:, :-1]
    labels = batch.labels[:, 1:]
    keep = labels != -100
    want = torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep])
    assert torch.allclose(out.text_loss, want, atol=1e-5), (out.text_loss, want)
    unscaled = torch.nn.functional.cross_entropy(logits[keep].float() / 0.0625, labels[keep])
    assert abs(float(unscaled - want)) > 1e-2

    # sampling: the first sampled token's distribution comes from the LLM's own logits
    seen = []
    real = gen.next_tokens
    monkeypatch.setattr(gen, "next_tokens", lambda lg, c, g: seen.append(lg) or real(lg, c, g))
    conv = [{"from": "human", "value": "Describe <image>"}, {"from": "gpt", "value": ""}]
    sample = parse_sample({"image": [str(tmp_path / "a.png")], "conversations": conv}, 0, source="test")
    gen.generate_samples(model, [sample], gen.GenerationConfig(mode="text", max_new_tokens=1, temperature=0.7,
                                                                top_p=1.0, top_k=0))
    with torch.no_grad():
        want = own_logits(batch_of(conv, True))[:, -1]
    assert torch.allclose(seen[0].float(), want.float(), atol=1e-5)
