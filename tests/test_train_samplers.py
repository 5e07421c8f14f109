"""Sampling strategies (Algorithm 1 and the ablation's alternatives) and the step batch sampler."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from mcp_medsam_torch.train.data import CaseRecord, DataIndex
from mcp_medsam_torch.train.samplers import CaseChoice, PromptSampler, StepBatchSampler


def _index() -> DataIndex:
    """Unbalanced on purpose: CT has 5 cases with many slices, XRay 1 case, MR 2 cases."""
    def rec(name: str, cat: int, token: str, n_slices: int, n_labels: int) -> CaseRecord:
        return CaseRecord(name=name, image_path=f"/x/{name}", gt_path=f"/x/{name}", token=token, category=cat,
                          ndim=3 if n_slices > 1 else 2, shape=(n_slices, 8, 8),
                          slices=tuple(range(n_slices)), labels=tuple(tuple(range(1, n_labels + 1))
                                                                      for _ in range(n_slices)))
    cases = [rec(f"3DBox_CT_a_{i}.npz", 0, "CT", 10 + 5 * i, 3) for i in range(5)]
    cases += [rec("2DBox_XRay_b_0.npz", 3, "XRay", 1, 1)]
    cases += [rec(f"3DBox_MR_c_{i}.npz", 1, "MR", 4, 2) for i in range(2)]
    return DataIndex(cases=tuple(cases))


def _draws(kind: str, n: int = 12000):
    s = PromptSampler(index=_index(), kind=kind)
    rng = np.random.default_rng(0)
    return [s.draw(rng) for _ in range(n)]


def test_modality_sampler_is_uniform_over_modalities_then_cases() -> None:
    index = _index()
    draws = _draws("modality")
    mods = Counter(index.cases[d.case].category for d in draws)
    assert set(mods) == {0, 1, 3}
    assert chisquare(list(mods.values())).pvalue > 1e-3
    for cat in (0, 1):
        cases = Counter(d.case for d in draws if index.cases[d.case].category == cat)
        assert len(cases) == sum(c.category == cat for c in index.cases)
        assert chisquare(list(cases.values())).pvalue > 1e-3
    # slices uniform within a case, labels uniform within a slice
    big = [d for d in draws if d.case == 4]
    assert chisquare(list(Counter(d.slice for d in big).values())).pvalue > 1e-3
    assert chisquare(list(Counter(d.label for d in draws if index.cases[d.case].category == 0).values())).pvalue > 1e-3


def test_case_and_slice_samplers() -> None:
    index = _index()
    by_case = Counter(d.case for d in _draws("case"))
    assert len(by_case) == len(index.cases) and chisquare(list(by_case.values())).pvalue > 1e-3
    flat = Counter((d.case, d.slice) for d in _draws("slice", 40000))
    assert len(flat) == index.num_slices()
    per_case = Counter()
    for (c, _), n in flat.items():
        per_case[c] += n
    expected = np.array([len(c.slices) for c in index.cases], float)
    observed = np.array([per_case[i] for i in range(len(index.cases))], float)
    assert chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3


def test_unknown_sampler() -> None:
    with pytest.raises(ValueError, match="unknown sampler"):
        PromptSampler(index=_index(), kind="label")


def test_step_batch_sampler_splits_ranks_and_resumes() -> None:
    full = [StepBatchSampler(batch_size=3, start_step=0, stop_step=4, rank=r, world_size=2) for r in range(2)]
    ids = [i for s in full for batch in s for i in batch]
    assert sorted(ids) == list(range(4 * 3 * 2))  # every id once, no overlap between ranks
    resumed = StepBatchSampler(batch_size=3, start_step=2, stop_step=4, rank=1, world_size=2)
    assert list(resumed) == list(full[1])[2:] and len(resumed) == 2
    over = StepBatchSampler(batch_size=2, start_step=0, stop_step=3, overfit=2)
    assert list(over) == [[0, 1]] * 3


def test_case_choice_draws_only_the_given_cases_modalities_first() -> None:
    """The first draws shared by training and the distillation's prompt draws, on a subset of cases."""
    categories = [0, 0, 0, 0, 3, 1, 1]  # case i has category categories[i]
    ids = [10, 11, 12, 13, 14, 15, 16]
    rng = np.random.default_rng(0)
    by_modality = Counter(CaseChoice(categories, kind="modality", ids=ids).draw(rng) for _ in range(12000))
    assert set(by_modality) == set(ids)
    per_cat = Counter({0: 0, 1: 0, 3: 0})
    for i, n in by_modality.items():
        per_cat[categories[ids.index(i)]] += n
    assert chisquare(list(per_cat.values())).pvalue > 1e-3  # each modality a third, whatever its case count
    by_case = Counter(CaseChoice(categories, kind="case", ids=ids).draw(rng) for _ in range(14000))
    assert chisquare([by_case[i] for i in ids]).pvalue > 1e-3
    with pytest.raises(ValueError, match="no cases"):
        CaseChoice([], kind="case")
