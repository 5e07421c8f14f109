"""The training dataset: a global sample id -> one augmented sample (map-style, deterministic)."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from .augment import AugmentConfig, make_sample
from .data import CaseReader, DataIndex
from .samplers import PromptSampler, sample_rng


class TrainSamples(Dataset):
    """``dataset[sample_id]`` draws (modality, case, slice, label) and augments, all from
    ``default_rng([seed, sample_id])`` (see :mod:`.samplers`). Used with :class:`StepBatchSampler`.

    Items (numpy, collated to tensors by the default collate): the arrays of
    :func:`~.augment.make_sample` plus ``category`` () int64, ``token`` () int64 (row of the
    text-feature table, ``tokens``), ``case`` () int64, ``slice`` () int64, ``label`` () int64 and
    ``clip_key`` str (case file, slice, label, crop box and flips: what the CLIP crop depends on).
    """

    def __init__(self, *, index: DataIndex, tokens: tuple[str, ...], sampler: str, augment: AugmentConfig,
                 seed: int, cache_cases: int = 4) -> None:
        self.index = index
        self.tokens = tokens
        self.sampler = PromptSampler(index=index, kind=sampler)
        self.augment = augment
        self.seed = seed
        self.reader = CaseReader(max_cases=cache_cases)

    def __len__(self) -> int:  # ids are unbounded; the batch sampler decides
        return 2**62

    def __getitem__(self, sample_id: int) -> dict:
        rng = sample_rng(self.seed, int(sample_id))
        draw = self.sampler.draw(rng)
        rec = self.index.cases[draw.case]
        img, gt = self.reader.slice(rec, draw.slice)
        out = make_sample(img, gt, draw.label, rng=rng, cfg=self.augment)
        out.update(
            category=np.int64(rec.category), token=np.int64(self.tokens.index(rec.token)),
            case=np.int64(draw.case), slice=np.int64(draw.slice), label=np.int64(draw.label),
            clip_key=f"{rec.image_path}|{draw.slice}|{draw.label}|{','.join(map(str, out['crop_box']))}|"
                     f"{int(out['flips'][0])}{int(out['flips'][1])}",
        )
        return out
