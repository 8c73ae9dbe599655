"""One-pass image generation with the learnable visual query (``<query>``).

A model trained on ``<query>`` answers holds N learnable query embeddings (N = visual tokens per
image). In training, ``<query>`` in an answer becomes ``<Img>`` + the N query slots + ``</Img>`` and
the hidden state *at* query slot i predicts visual token i of the answer's image. In generation an
image answer is read the same way: the prompt ends with ``<Img>`` and N query slots without a
target (``SequenceBuilder.encode(..., query=True)``), one forward pass of the batch gives the
hidden state at every slot, the deadapter turns slot i's state into a prediction of token i, and
the token space turns each prediction into the token (the feature itself, or a code chosen from
the logits per slot: argmax, or a draw from the sample's own generator).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..data.sequence import SLOT_QUERY
from ..errors import ConfigError


def check_query(model, samples) -> None:
    """One-line error for a prompt holding ``<query>`` when the model has no learnable query."""
    if model.query_tokens is not None:
        return
    bad = next((s for s in samples if s.has_query), None)
    if bad is not None:
        raise ConfigError(f"sample {bad.index}: its prompt holds <query>, but this model was trained without "
                          "<query> (it has no learnable query)")


def query_rows(batch) -> list[int]:
    """Rows of a left-padded generation batch whose prompt ends with the query slots of an image
    to generate (query slots without an image of the sample)."""
    to_generate = (batch.slot_type[:, -1] == SLOT_QUERY) & (batch.slot_image[:, -1] < 0)
    return [b for b in range(batch.size) if bool(to_generate[b])]


def read_query(model, hidden: torch.Tensor, rows: Sequence[int],
               pick_for: Callable[[list[int]], Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """The generated image tokens of ``rows`` from the backbone's hidden states ``[B, L, d]`` (their
    last N positions are the query slots): features ``[R, N, d_v]`` or codes ``[R, N]``.
    ``pick_for(rows_of_each_prediction)`` gives the code chooser for ``[R·N, K]`` logits."""
    n = model.num_visual_tokens
    idx = torch.tensor(list(rows), device=hidden.device)
    h = hidden[idx, -n:].flatten(0, 1)  # [R·N, d], row by row, slot by slot
    head = model.deadapter(h.to(model.adapter_dtype))
    tokens = model.space.next_token(head, pick_for([b for b in rows for _ in range(n)]))
    return tokens.view(len(rows), n, *tokens.shape[1:])
