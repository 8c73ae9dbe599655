"""What the training engine trains: the ``TrainTask`` interface.

The engine (``loop.Trainer`` + a backend from ``backends``) owns everything generic: workers,
data order, gradient accumulation, the learning-rate schedule, clipping, precision, ZeRO,
metrics, checkpoints and exact resume. A task owns everything specific to one model:

==========================  ==================================================================
``build_model()``           the ``nn.Module`` to train, trainable parameters marked with
                            ``requires_grad`` (everything else stays frozen and is not saved)
``dataset()``               an indexable dataset (``len`` + ``__getitem__``); the engine shards
                            and orders it
``collate(items)``          a batch object with a ``.to(device)`` method
``initialize(model)``      optional, once per worker on a run that starts at step 0 (not on a
                            resumed one), before the backend wraps the model (e.g. --init-from)
``prepare(model, ds, dev)`` optional, once per worker before training (e.g. cache features)
``loss(model, batch)``      ``{"loss": scalar to minimise, other named scalars ...}``; every
                            key in ``metric_names`` is averaged over ranks into metrics.csv
``preview_batch(ds, ids)``  optional: the batch previews show (default: collate of the items)
``preview(...)``            optional image of the model's current output (every few hundred
                            steps); called on every rank (ZeRO-3 forward is collective), only
                            rank 0 writes
``save_final(model, sd, d)`` write the final, loadable model folder from ``sd``: full-size
                            (ZeRO-3: gathered) copies of the parameters named by
                            ``saved_parameter_names`` (default: the trainable ones)
==========================  ==================================================================

Each training job (``lm4lv_core.jobs``) builds its task from its typed job in every worker.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Sequence

import torch
from torch import nn

Gather = Callable[[Iterable[nn.Parameter]], ContextManager]


def no_gather(params: Iterable[nn.Parameter]) -> ContextManager:
    return contextlib.nullcontext()


class TrainTask:
    """Base class with the optional parts filled in; subclasses override the rest."""

    name = "task"
    metric_names: tuple[str, ...] = ("loss",)

    # ---- required
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def dataset(self) -> Sequence[Any]:
        raise NotImplementedError

    def collate(self, items: list[Any]) -> Any:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def save_final(self, model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        raise NotImplementedError

    # ---- optional
    def initialize(self, model: nn.Module) -> None:
        """Called once per worker when the run starts at step 0 (never over a resumed checkpoint),
        before the backend wraps the model."""

    def prepare(self, model: nn.Module, dataset: Sequence[Any], device: torch.device) -> None:
        """Called once per worker before the first step."""

    def batch_ids(self, batch: Any) -> list[int]:
        """Sample indices of a batch (for ``data_order.csv``)."""
        return list(getattr(batch, "sample_index", []))

    def preview_items(self, dataset: Sequence[Any], n: int) -> list[int]:
        """Dataset indices shown in previews (default: the first ``n``)."""
        return list(range(min(n, len(dataset))))

    def preview_batch(self, dataset: Sequence[Any], ids: list[int]) -> Any:
        return self.collate([dataset[i] for i in ids])

    def preview(self, model: nn.Module, batch: Any, path: Path | None, gather: Gather = no_gather) -> None:
        """Write a preview image to ``path`` (``None`` on ranks other than 0)."""

    def saved_parameter_names(self, model: nn.Module) -> list[str]:
        """Parameters ``save_final`` writes; the engine gathers them before (ZeRO-3 partitions
        frozen parameters too, which would otherwise be written as empty tensors)."""
        return [n for n, p in model.named_parameters() if p.requires_grad]
