"""What to train on next: (case, slice, label) draws, and the step-indexed batch sampler.

Three strategies (the paper's ablation):

- ``modality`` (Algorithm 1, the default): a modality uniformly, then a case of that modality
  uniformly, then one of its labelled slices uniformly, then one of that slice's labels uniformly.
  Rare modalities are seen as often as CT and MR.
- ``case``: a case uniformly, then slice, then label.
- ``slice``: a labelled slice uniformly over all slices of all cases, then a label.

Randomness is explicit: every training sample has a global integer id and its draws (and its
augmentation) come from ``numpy.random.default_rng([seed, id])``. The sample stream is then a
pure function of (seed, step), so resuming, changing the number of data-loader workers or of
ranks does not change what a given step sees on a given rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from .data import DataIndex

SAMPLERS = ("modality", "case", "slice")


@dataclass(frozen=True)
class Draw:
    case: int  # position in DataIndex.cases
    slice: int  # slice index z in the case (0 for 2D)
    label: int  # label value in that slice


class CaseChoice:
    """The first draws of the ``modality`` and ``case`` strategies: a modality uniformly, then one of
    its cases uniformly (``modality``), or a case uniformly (``case``). Training's sampler and the
    distillation's prompt draws both start here.

    categories[i]: the category of case ``ids[i]`` (default ids: 0..n-1).
    """

    def __init__(self, categories: Sequence[int], *, kind: str, ids: Sequence[int] | None = None) -> None:
        ids = list(range(len(categories))) if ids is None else list(ids)
        if not ids:
            raise ValueError("no cases to draw from")
        if kind == "modality":
            by_cat: dict[int, list[int]] = {}
            for i, cat in zip(ids, categories):
                by_cat.setdefault(int(cat), []).append(i)
            self.groups = [np.asarray(by_cat[k]) for k in sorted(by_cat)]
        else:
            self.groups = [np.asarray(ids)]

    def draw(self, rng: np.random.Generator) -> int:
        # With one group, rng.integers(1) is 0 and consumes nothing: a plain uniform case draw.
        group = self.groups[rng.integers(len(self.groups))]
        return int(group[rng.integers(len(group))])


class PromptSampler:
    """Draws (case, slice, label) from an index with one of :data:`SAMPLERS`."""

    def __init__(self, *, index: DataIndex, kind: str = "modality") -> None:
        if kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {kind!r}; choose one of {', '.join(SAMPLERS)}")
        if not index.cases:
            raise ValueError("cannot sample from an empty index")
        self.index = index
        self.kind = kind
        self.cases = CaseChoice([c.category for c in index.cases], kind=kind)
        counts = np.asarray([len(c.slices) for c in index.cases])
        self.slice_offsets = np.concatenate([[0], np.cumsum(counts)])

    def draw(self, rng: np.random.Generator) -> Draw:
        if self.kind in ("modality", "case"):
            case = self.cases.draw(rng)
            pos = int(rng.integers(len(self.index.cases[case].slices)))
        else:
            flat = int(rng.integers(self.slice_offsets[-1]))
            case = int(np.searchsorted(self.slice_offsets, flat, side="right") - 1)
            pos = flat - int(self.slice_offsets[case])
        rec = self.index.cases[case]
        labels = rec.labels[pos]
        return Draw(case=case, slice=rec.slices[pos], label=int(labels[rng.integers(len(labels))]))


def sample_rng(seed: int, sample_id: int) -> np.random.Generator:
    """The generator of one training sample (its draw and its augmentation)."""
    return np.random.default_rng([seed, sample_id])


class StepBatchSampler(Sampler[list[int]]):
    """Yields, for each step in [start_step, stop_step), this rank's list of global sample ids.

    Step s on rank r of W with per-rank batch B gets ids ``s*B*W + r*B + j`` for j < B: every
    rank sees different samples (a distributed sampler) and a resumed run continues exactly where
    the interrupted one stopped. ``overfit > 0`` maps ids modulo ``overfit`` (a debugging mode that
    repeats the same few samples).
    """

    def __init__(self, *, batch_size: int, start_step: int, stop_step: int, rank: int = 0, world_size: int = 1,
                 overfit: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.batch_size = batch_size
        self.start_step = start_step
        self.stop_step = stop_step
        self.rank = rank
        self.world_size = world_size
        self.overfit = overfit

    def ids(self, step: int) -> list[int]:
        base = step * self.batch_size * self.world_size + self.rank * self.batch_size
        ids = [base + j for j in range(self.batch_size)]
        return [i % self.overfit for i in ids] if self.overfit > 0 else ids

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.stop_step):
            yield self.ids(step)

    def __len__(self) -> int:
        return max(0, self.stop_step - self.start_step)
