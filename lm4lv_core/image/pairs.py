"""The (ground truth, prediction) file pairs ``lm4lv eval`` scores and their rows, held compactly.

A folder of 100 000 images must not cost a ``Path`` object or a row dictionary per image:
:class:`PairPlan` keeps two roots and each pair's relative paths (strings, shared when the two
sides' names are equal), and :class:`ScoredRows` keeps one float per (pair, metric) in a table and
builds a row dictionary (``name``, ``gt``, ``pred`` and the metrics) only when it is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np


def _root(root: str | os.PathLike) -> str:
    """A root spelled as ``Path(root) / rel`` would spell it ("" for none or the current folder)."""
    r = str(Path(root)) if str(root) else ""
    return "" if r == "." else r


class PairPlan(Sequence[tuple[str, str]]):
    """``(gt file, pred file)`` pairs, indexable: ``plan[i]`` gives the two paths as strings.

    Folder pairs are ``gt_root/rel_gt[i]`` and ``pred_root/rel_pred[i]`` and are named by their
    pairing key (the ground truth's relative path without its extension); explicit pairs
    (:meth:`of_pairs`) are named by the prediction's file name."""

    def __init__(self, gt_root: str | os.PathLike, pred_root: str | os.PathLike, rel_gt: list[str],
                 rel_pred: list[str], names: list[str] | None = None) -> None:
        self.gt_root, self.pred_root = _root(gt_root), _root(pred_root)
        self.rel_gt, self.rel_pred, self.names = rel_gt, rel_pred, names

    @classmethod
    def of_pairs(cls, pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]]) -> "PairPlan":
        gts = [str(g) for g, _ in pairs]
        preds = [str(p) for _, p in pairs]
        return cls("", "", gts, preds, [Path(p).name for p in preds])

    @classmethod
    def of_files(cls, gt: Path, pred: Path) -> "PairPlan":
        return cls("", "", [str(gt)], [str(pred)], [pred.name])

    def __len__(self) -> int:
        return len(self.rel_gt)

    def __getitem__(self, i: int) -> tuple[str, str]:  # type: ignore[override]
        return (os.path.join(self.gt_root, self.rel_gt[i]) if self.gt_root else self.rel_gt[i],
                os.path.join(self.pred_root, self.rel_pred[i]) if self.pred_root else self.rel_pred[i])

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return (self[i] for i in range(len(self)))

    def name(self, i: int) -> str:
        return self.names[i] if self.names is not None else os.path.splitext(self.rel_gt[i])[0]


class ScoredRows(Sequence[dict]):
    """The rows of the scored pairs of a :class:`PairPlan`, in the plan's order (pairs that failed
    under ``--on-error skip`` left out): a sequence of dictionaries built on demand."""

    def __init__(self, plan: PairPlan, metrics: Sequence[str]) -> None:
        self.plan, self.metrics = plan, list(metrics)
        self.values = np.full((len(plan), len(self.metrics)), np.nan)
        self.scored = np.zeros(len(plan), dtype=bool)
        self._order: np.ndarray | None = None

    def add(self, i: int, row: dict[str, Any]) -> None:
        """Record the row of pair ``i``."""
        self.values[i] = [row[m] for m in self.metrics]
        self.scored[i] = True
        self._order = None

    def order(self) -> np.ndarray:
        """Plan indices of the scored pairs, in order."""
        if self._order is None:
            self._order = np.flatnonzero(self.scored)
        return self._order

    def row(self, i: int) -> dict[str, Any]:
        """The row of plan index ``i``."""
        g, p = self.plan[i]
        out: dict[str, Any] = {"name": self.plan.name(i), "gt": g, "pred": p}
        out.update(zip(self.metrics, map(float, self.values[i])))
        return out

    def column(self, metric: str) -> np.ndarray:
        """One metric's values over the scored pairs, in order."""
        return self.values[self.order(), self.metrics.index(metric)]

    def names(self) -> Iterator[str]:
        return (self.plan.name(int(i)) for i in self.order())

    def __len__(self) -> int:
        return len(self.order())

    def __getitem__(self, j):  # type: ignore[override]
        if isinstance(j, slice):
            return [self.row(int(i)) for i in self.order()[j]]
        return self.row(int(self.order()[j]))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self.row(int(i)) for i in self.order())
