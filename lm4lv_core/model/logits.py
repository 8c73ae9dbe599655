"""Token logits from the backbone's hidden states, exactly as the LLM's own forward makes them.

LM4LV computes the text loss and samples text from hidden states, outside the LLM's forward.
Some causal LMs post-process the LM head's output there; the same steps are applied here, read
from the model's config, in the order and dtype the Hugging Face models use:

- ``final_logit_softcapping`` (Gemma 2 and 3, ...): ``cap · tanh(logits / cap)``;
- ``logit_scale`` (Cohere family): ``logits · scale``;
- ``logits_scaling`` (Granite family): ``logits / scaling``; HyperCLOVA X multiplies by it and
  MiniCPM3 divides the hidden states by it;
- ``lm_head_multiplier`` (Falcon-H1): ``logits · multiplier``.

``check_output_logits`` runs the LLM's own forward once on chosen hidden states (the backbone
itself is not run) and refuses, with a clear error, a model whose logits differ from these, e.g.
one post-processing its logits in another way.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def _text_config(llm: nn.Module):
    cfg = llm.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _number(config, name: str) -> float | None:
    v = getattr(config, name, None)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def output_logits(llm: nn.Module, hidden: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
    """``[..., d]`` final hidden states → ``[..., V]`` logits of ``llm`` (a causal LM, PEFT or not);
    ``head``: its LM head (default: ``get_output_embeddings()``)."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    head = head if head is not None else base.get_output_embeddings()
    cfg = _text_config(base)
    kind = str(getattr(cfg, "model_type", "") or "")
    scaling = _number(cfg, "logits_scaling")
    if kind == "minicpm3" and scaling is not None:
        hidden = hidden / scaling
    logits = head(hidden)
    cap = _number(cfg, "final_logit_softcapping")
    if cap:
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
    scale = _number(cfg, "logit_scale")
    if kind.startswith("cohere") and scale is not None:
        logits = logits * scale
    if scaling is not None and kind.startswith("granite"):
        logits = logits / scaling
    elif scaling is not None and kind.startswith("hyperclovax"):
        logits = logits * scaling
    multiplier = _number(cfg, "lm_head_multiplier")
    if kind == "falcon_h1" and multiplier is not None:
        logits = logits * multiplier
    return logits


@torch.no_grad()
def check_output_logits(llm: nn.Module, name: str) -> None:
    """Raise ``ConfigError`` when ``output_logits`` differs from ``llm``'s own logits.

    The backbone's forward is replaced, for one call, by one returning hidden states large enough
    that any capping or scaling shows; only the LM head and what follows it run. A model whose
    forward cannot be probed this way (it does not call its ``get_decoder()``) is left unchecked.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPast

    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    backbone = base.get_decoder()
    head = base.get_output_embeddings()
    weight = head.weight
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 4, weight.shape[1], generator=g).to(weight.device, weight.dtype)
    plain = head(h).float()
    h = h * (40.0 / plain.std().clamp_min(1e-6)).to(h.dtype)  # logits of a few tens, as in real LLMs
    calls = []

    def fake_forward(*args, **kwargs):
        calls.append(1)
        return BaseModelOutputWithPast(last_hidden_state=h)

    was_training = base.training
    base.eval()
    backbone.forward = fake_forward
    try:
        theirs = base(input_ids=torch.zeros(1, h.shape[1], dtype=torch.long, device=weight.device),
                      attention_mask=torch.ones(1, h.shape[1], dtype=torch.long, device=weight.device),
                      use_cache=False).logits
    except Exception:  # noqa: BLE001 - a forward that needs more than hidden states: not checkable
        return
    finally:
        del backbone.forward
        base.train(was_training)
    if not calls or theirs is None or theirs.shape[:-1] != h.shape[:-1]:
        return
    ours = output_logits(base, h).float()
    theirs = theirs.float()
    diff = float((ours - theirs).abs().max())
    if diff > 1e-3 * max(1.0, float(theirs.abs().max())):
        raise ConfigError(f"{name}: {type(base).__name__} post-processes its logits in a way lm4lv does not "
                          f"reproduce (max difference {diff:.3g} from its LM head's output); lm4lv computes the "
                          "text loss and samples from hidden states, so this LLM cannot be used")
