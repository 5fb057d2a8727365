"""Re-ranking's building blocks against naive references: ids to rows (a run, a dense table, a
binary search), the fused gather-and-score (faiss's kernel and numpy's), the best k with ties."""

from __future__ import annotations

import numpy as np
import pytest

from mmsearch.index.exact import VectorLookup, keep_best


def naive_rows(ids_stored: np.ndarray, ids: np.ndarray) -> np.ndarray:
    where = {int(v): r for r, v in enumerate(ids_stored)}
    return np.array([[where.get(int(v), -1) for v in row] for row in ids], np.int64)


ID_SETS = {
    "one run": np.arange(500, 1100, dtype=np.int64),
    "dense with gaps": np.sort(np.random.default_rng(1).choice(1500, 600, replace=False)).astype(np.int64),
    "sparse": np.sort(np.random.default_rng(2).choice(10**12, 600, replace=False)).astype(np.int64),
    "unsorted": np.random.default_rng(3).permutation(np.arange(0, 1800, 3, dtype=np.int64)),
}


@pytest.mark.parametrize("name", list(ID_SETS))
def test_rows_and_scores_match_naive_lookups(name):
    stored = ID_SETS[name]
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((len(stored), 16)).astype(np.float32)
    lookup = VectorLookup(vectors, stored)
    cand = stored[rng.integers(0, len(stored), (7, 30))]
    cand[:, -3:] = -1  # faiss's "no candidate"
    rows = naive_rows(stored, cand)
    assert (lookup.rows(cand[:, :-3]) == rows[:, :-3]).all()
    q = rng.standard_normal((7, 16)).astype(np.float32)
    want = np.where(rows >= 0, np.einsum("qd,qnd->qn", q, vectors[np.maximum(rows, 0)]), -np.inf)
    got = lookup.scores(q, cand)
    assert np.isneginf(got[:, -3:]).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["float64", "strided"])
def test_numpy_scores_match_faiss_scores(layout):
    """Vectors that faiss's kernel cannot read in place (another dtype, a strided view) are scored
    by numpy, with the same answer."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((400, 24)).astype(np.float32)
    ids = np.arange(400, dtype=np.int64) * 2
    other = base.astype(np.float64) if layout == "float64" else np.repeat(base, 2, axis=1)[:, ::2]
    assert not (other.dtype == np.float32 and other.flags.c_contiguous)
    cand = ids[rng.integers(0, 400, (9, 50))]
    cand[0, :5] = -1
    q = rng.standard_normal((9, 24)).astype(np.float32)
    np.testing.assert_allclose(VectorLookup(other, ids).scores(q, cand), VectorLookup(base, ids).scores(q, cand),
                               rtol=1e-5, atol=1e-5)


def test_ids_not_stored_are_a_key_error():
    lookup = VectorLookup(np.zeros((3, 4), np.float32), np.array([10, 11, 12]))
    with pytest.raises(KeyError, match="13"):
        lookup.rows(np.array([10, 13]))
    with pytest.raises(KeyError, match="9"):
        lookup.scores(np.zeros((1, 4), np.float32), np.array([[9, -1]]))


def test_keep_best_is_a_stable_sort():
    """The best k, best first, ties in column order: what a stable argsort of every score gives."""
    rng = np.random.default_rng(6)
    scores = rng.integers(0, 5, (50, 40)).astype(np.float32)  # many ties
    scores[3, :] = -np.inf
    cols = np.tile(np.arange(40), (50, 1))
    D, I = keep_best(scores, cols, 10)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    assert (I == order).all()
    assert (D == np.take_along_axis(scores, order, 1)).all()
