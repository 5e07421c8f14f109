"""The 3D walk's bounded slice-embedding cache: least-recently-used eviction, pinned slices, the
too-small error, and that a cache forced to evict gives the same labels as a roomy one."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SAMPLE, need
from mcp_medsam.engine import Engine
from mcp_medsam.io.npz import load_case
from mcp_medsam.manifest import load_manifest
from mcp_medsam.segmenter import EmbeddingCache, Segmenter


def _emb(key: int) -> np.ndarray:
    return np.full((2, 3, 3), float(key), np.float32)


def _cache_with(keys: list[int], capacity: int) -> EmbeddingCache:
    cache = EmbeddingCache(capacity, (2, 3, 3))
    cache.put(keys, np.stack([_emb(k) for k in keys]), pinned=set(keys))
    return cache


def test_each_key_reads_its_own_embedding_from_the_shared_array():
    cache = _cache_with([7, 3, 9], capacity=4)
    assert cache.missing([3, 5, 9, 5, 8]) == [5, 8]  # once each, in order
    for key in (7, 3, 9):
        np.testing.assert_array_equal(cache.array[cache.slot(key)], _emb(key))
    assert sorted(cache.slot(k) for k in (7, 3, 9)) == [0, 1, 2]


def test_the_least_recently_used_unpinned_slice_is_evicted():
    cache = _cache_with([0, 1, 2], capacity=3)
    cache.slot(0)  # 0 read again: 1 is now the oldest
    freed = cache.slot(1)
    cache.slot(2)
    cache.slot(0)  # order of use: 1, 2, 0
    cache.put([3], _emb(3)[None], pinned={3})
    assert cache.missing([0, 1, 2, 3]) == [1]
    assert cache.slot(3) == freed  # the evicted slice's slot is reused, the array never grows
    np.testing.assert_array_equal(cache.array[cache.slot(3)], _emb(3))
    np.testing.assert_array_equal(cache.array[cache.slot(0)], _emb(0))


def test_pinned_slices_survive_eviction():
    cache = _cache_with([0, 1], capacity=2)
    cache.put([2], _emb(2)[None], pinned={0, 2})  # 0 is the oldest but the current batch needs it
    assert cache.missing([0, 1, 2]) == [1]


def test_a_cache_too_small_for_one_batch_is_an_error():
    cache = _cache_with([0, 1], capacity=2)
    with pytest.raises(RuntimeError, match="embedding cache too small for one decoder batch"):
        cache.put([2], _emb(2)[None], pinned={0, 1, 2})


def test_eviction_does_not_change_the_labels(tiny_export):
    """A 3D case walked with the smallest cache (two slices: every step evicts) against a roomy one."""
    case = load_case(need(SAMPLE / "imgs" / "3DBox_MR_MSDHippocampus_001.npz"))
    roomy = Segmenter(Engine(load_manifest(tiny_export), threads=1), max_batch=1, cache_slices=64)
    tight = Segmenter(Engine(load_manifest(tiny_export), threads=1), max_batch=1, cache_slices=2)
    a = roomy.segment_volume(case.image, case.boxes, modality="MR")
    b = tight.segment_volume(case.image, case.boxes, modality="MR")
    np.testing.assert_array_equal(a, b)
    covered = len({z for bx in case.boxes for z in range(int(bx[2]), int(bx[5]) + 1)})
    assert roomy.engine.stats.items["image_encoder"] == covered  # each slice encoded once
    assert tight.engine.stats.items["image_encoder"] > covered  # evicted slices were encoded again
