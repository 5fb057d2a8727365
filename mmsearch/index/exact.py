"""Stored vectors by item id (:class:`VectorLookup`) and the one brute-force k-NN (:func:`exact_knn`).

``exact_knn`` is what every exact answer comes from: the filtered search of one modality, the
ground truth that tuning and ``mmsearch eval --via-index`` measure an index against. numpy,
except the re-rank's gather-and-score (:meth:`VectorLookup.scores`), which uses faiss's threaded
kernel when faiss is there.
"""

from __future__ import annotations

import numpy as np

#: stored vectors scored per step (memory: QUERY_BLOCK x BLOCK float32 scores at a time)
BLOCK = 65536
#: queries scored per step
QUERY_BLOCK = 2048
#: ids looked up through a table (8 bytes per id in the span) while they span at most this many
#: times the stored items; sparser ids use a binary search
DENSE_SPAN = 4


class VectorLookup:
    """Stored vectors by item id, for exact re-ranking: ``vectors[row]`` belongs to ``ids[row]``.

    ``vectors`` may be a memory-mapped array: only the rows of the candidates are read.
    """

    def __init__(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(vectors) != len(ids):
            raise AssertionError("vectors and ids disagree")
        self.vectors = vectors
        ids = np.asarray(ids, dtype=np.int64)
        self._sorted = bool(len(ids) < 2 or (np.diff(ids) > 0).all())
        if self._sorted:
            self._keys, self._perm = ids, None
        else:
            self._perm = np.argsort(ids, kind="stable")
            self._keys = ids[self._perm]
        self._table: np.ndarray | None = None  # row by (id - first id), built on first use when ids are dense

    def _dense_table(self) -> np.ndarray | None:
        """Row of each id from the first to the last (-1: not stored), when that span is at most
        DENSE_SPAN x the items: a lookup instead of a binary search per candidate."""
        keys = self._keys
        if self._table is None and len(keys) and keys[-1] - keys[0] < DENSE_SPAN * len(keys) + 1024:
            table = np.full(int(keys[-1] - keys[0]) + 1, -1, np.int64)
            table[keys - keys[0]] = np.arange(len(keys)) if self._perm is None else self._perm
            self._table = table
        return self._table

    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row of each id, whether it is stored); rows of ids not stored are -1."""
        keys = self._keys
        if self._perm is None and len(keys) and keys[-1] - keys[0] == len(keys) - 1:  # one run: row = id - first
            rows = ids - keys[0]
            found = (rows >= 0) & (rows < len(keys))
            return np.where(found, rows, -1), found
        table = self._dense_table()
        if table is not None:
            off = ids - self._keys[0]
            inside = (off >= 0) & (off < len(table))
            rows = np.where(inside, table[np.where(inside, off, 0)], -1)
            return rows, rows >= 0
        pos = np.minimum(np.searchsorted(self._keys, ids), max(0, len(self._keys) - 1))
        found = self._keys[pos] == ids if len(self._keys) else np.zeros(ids.shape, bool)
        rows = pos if self._perm is None else self._perm[pos]
        return np.where(found, rows, -1), found

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` (all must be stored), same shape."""
        ids = np.asarray(ids, dtype=np.int64)
        rows, found = self._find(ids)
        if not found.all():
            raise KeyError(f"item ids not stored: {ids[~found][:5].tolist()}")
        return rows

    def scores(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Inner products (nq, m) of each query with the stored vectors of its row of ``ids``
        (nq, m); -1 (no candidate) scores -inf. Every other id must be stored.

        The gather and the dot products happen in one pass, on faiss's threads when the vectors
        are contiguous float32 (a memory-mapped file included); numpy otherwise.
        """
        ids = np.asarray(ids, dtype=np.int64)
        rows, found = self._find(ids)
        if not (found | (ids < 0)).all():
            raise KeyError(f"item ids not stored: {ids[~found & (ids >= 0)][:5].tolist()}")
        q = np.ascontiguousarray(queries, np.float32)
        v = self.vectors
        faiss = _faiss_or_none()
        if faiss and isinstance(v, np.ndarray) and v.dtype == np.float32 and v.ndim == 2 and v.flags.c_contiguous:
            out = np.empty(rows.shape, np.float32)
            rows = np.ascontiguousarray(rows)
            faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(v),
                                             faiss.swig_ptr(rows), v.shape[1], rows.shape[0], rows.shape[1])
            return out
        return self._scores_numpy(q, rows)

    def _scores_numpy(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = np.full(rows.shape, -np.inf, np.float32)
        step = max(1, (64 << 20) // max(1, rows.shape[1] * self.vectors.shape[1] * 4))  # ~64 MB gathered at a time
        for s in range(0, len(rows), step):
            r = rows[s:s + step]
            vecs = np.asarray(np.take(self.vectors, np.maximum(r, 0), axis=0), np.float32)
            block = np.matmul(vecs, q[s:s + step, :, None])[..., 0]
            out[s:s + step] = np.where(r >= 0, block, -np.inf)
        return out

    def row_ids(self) -> np.ndarray:
        """The id of each row."""
        if self._perm is None:
            return self._keys
        out = np.empty(len(self._keys), np.int64)
        out[self._perm] = self._keys
        return out

    def get(self, ids: np.ndarray) -> np.ndarray:
        rows = self.rows(np.ravel(ids))
        out = np.take(self.vectors, rows, axis=0)  # (sorting the rows first is slower once pages are cached)
        return np.asarray(out, np.float32).reshape(*np.shape(ids), -1)


def _faiss_or_none():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def keep_best(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best columns of each row, best first, ties to the lower row number.

    Within a row, candidates with equal scores must come in ascending row order (true for the best
    of earlier blocks followed by a new block); then this is exactly a stable sort of every score.
    """
    if scores.shape[1] > k:
        kth = np.partition(scores, scores.shape[1] - k, axis=1)[:, scores.shape[1] - k, None]
        above = scores > kth
        tied = scores == kth
        # of the ties with the k-th score, the first (lowest rows) that complete k
        take = above | (tied & (np.cumsum(tied, axis=1) <= k - above.sum(1, keepdims=True)))
        scores, rows = scores[take].reshape(len(scores), k), rows[take].reshape(len(rows), k)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def exact_knn(queries: np.ndarray, vectors: np.ndarray, k: int, ids: np.ndarray | None = None,
              bias: np.ndarray | None = None, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """The exact top ``min(k, n)`` of the ``n`` rows of ``vectors`` for each query, by inner product
    (plus ``bias[row]`` when given): scores ``D`` (float32) and ids ``I`` (int64; ``ids[row]``, or
    the row number without ``ids``), best first.

    Ties go to the lower row: the result is that of a stable argsort of all scores, computed in
    blocks of ``block`` rows and 2,048 queries so memory stays bounded however large ``n`` is.
    ``vectors`` may be memory-mapped.
    """
    q = np.asarray(queries, np.float32)
    k = min(int(k), len(vectors))
    out_D = np.empty((len(q), k), np.float32)
    out_R = np.empty((len(q), k), np.int64)
    if k < 1:
        return out_D, out_R
    for s in range(0, len(q), QUERY_BLOCK):
        qb = q[s:s + QUERY_BLOCK]
        best_s = np.empty((len(qb), 0), np.float32)
        best_r = np.empty((len(qb), 0), np.int64)
        for start in range(0, len(vectors), block):
            scores = qb @ np.asarray(vectors[start:start + block], np.float32).T
            if bias is not None:
                scores = scores + bias[None, start:start + block]
            rows = np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)
            best_s, best_r = keep_best(np.concatenate([best_s, scores], 1), np.concatenate([best_r, rows], 1), k)
        out_D[s:s + QUERY_BLOCK], out_R[s:s + QUERY_BLOCK] = best_s, best_r
    return out_D, (out_R if ids is None else np.asarray(ids, np.int64)[out_R])


def exact_topk(q: np.ndarray, lookup: VectorLookup, k: int, block: int = BLOCK) -> np.ndarray:
    """Ids of the exact top-k stored vectors per query, best first (:func:`exact_knn` over ``lookup``)."""
    return exact_knn(q, lookup.vectors, k, lookup.row_ids(), block=block)[1]
