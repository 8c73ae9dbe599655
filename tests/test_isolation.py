"""Tests do not depend on their order: what an in-process ZeRO-3 run leaves patched in torch is
put back after each test (the autouse fixture in ``conftest.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ORIGINAL_LINEAR = F.linear


def test_a_test_that_leaves_linear_patched():
    """What ``deepspeed.zero.Init`` does, and leaves behind: ``F.linear`` replaced for good."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    torch.nn.functional.linear = zero3_linear_wrap
    assert F.linear is zero3_linear_wrap


def test_the_next_test_finds_torch_as_it_was():
    assert F.linear is ORIGINAL_LINEAR is torch._C._nn.linear
