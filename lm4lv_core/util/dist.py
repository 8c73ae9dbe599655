"""Process-group helpers shared by every job (training, generation, MAE).

Workers learn their place from the environment that launchers set (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). A single in-process worker gets the same
variables from ``lm4lv_core.engine.launch`` (world size 1), so code never branches on "launched or not".
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as tdist


def has_cuda() -> bool:
    """A CUDA GPU is there and DeepSpeed is not told to use the CPU."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def rank() -> int:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This worker's device: ``cuda:LOCAL_RANK`` when CUDA is usable, else the CPU."""
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def backend_name() -> str:
    return "nccl" if device().type == "cuda" else "gloo"


def init_distributed() -> None:
    """Join the process group when ``WORLD_SIZE > 1`` (no-op when already joined or alone)."""
    if world_size() <= 1 or not tdist.is_available() or tdist.is_initialized():
        return
    dev = device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    tdist.init_process_group(backend=backend_name())


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """One ``obj`` per rank, in rank order."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (a detached copy)."""
    x = x.detach().clone()
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
        x /= tdist.get_world_size()
    return x


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (a collective: every rank calls it)."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def destroy() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
