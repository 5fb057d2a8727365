"""The vector index: faiss over L2-normalised float32 vectors, inner-product metric, int64 item ids.

Two kinds exist. ``"flat"`` is exact search (``IndexFlatIP``). ``"ivfpq"`` is an inverted file with
product-quantised codes (``IndexIVFPQ``) whose candidates are re-ranked exactly with the stored float
vectors (``IndexRefineFlat``). Both are wrapped in ``IndexIDMap2`` so searches return the caller's
stable item ids. ``faiss`` is imported inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mmsearch.config import IndexSpec
from mmsearch.errors import EmptyIndexError, IndexFormatError, IndexNotFoundError

KINDS = ("flat", "ivfpq")
#: PQ sub-quantizer counts tried, largest first, when IndexSpec.pq_m is None
_PQ_M_CHOICES = (64, 48, 32, 24, 16, 8, 4, 2, 1)
#: faiss k-means wants at least this many training points per centroid
_MIN_POINTS_PER_CENTROID = 39


def choose_kind(n: int, spec: IndexSpec) -> str:
    """The index kind for ``n`` vectors: ``spec.index_type``, or for ``"auto"`` flat up to ``spec.flat_max``."""
    if spec.index_type == "auto":
        return "flat" if n <= spec.flat_max else "ivfpq"
    if spec.index_type not in KINDS:
        raise ValueError(f"unknown index type {spec.index_type!r}: use 'auto', 'flat' or 'ivfpq'")
    return spec.index_type


def ivfpq_params(n: int, d: int, spec: IndexSpec) -> dict[str, int]:
    """IVF-PQ build parameters for ``n`` vectors of dimension ``d`` (rules adapted from autofaiss)."""
    cap = max(1, n // _MIN_POINTS_PER_CENTROID)  # every list trains on >= 39 points
    nlist = spec.nlist or 2 ** round(math.log2(4 * math.sqrt(n)))
    nlist = max(1, min(int(nlist), cap))
    if spec.pq_m is not None:
        if spec.pq_m < 1 or d % spec.pq_m:
            raise ValueError(f"pq_m={spec.pq_m} does not divide the vector dimension {d}: pick a divisor of {d}")
        m = spec.pq_m
    else:
        m = next(c for c in _PQ_M_CHOICES if d % c == 0)
    nbits = 8 if n >= 256 else max(1, int(n).bit_length() - 1)  # PQ k-means needs >= 2**nbits points
    nprobe = spec.nprobe or max(1, nlist // 8)
    if nprobe < 1:
        raise ValueError(f"nprobe={nprobe} must be at least 1")
    if spec.rerank_factor < 1:
        raise ValueError(f"rerank_factor={spec.rerank_factor} must be at least 1")
    n_train = min(n, max(100 * nlist, 2**nbits * _MIN_POINTS_PER_CENTROID))
    return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(nprobe, nlist),
            "rerank_factor": int(spec.rerank_factor), "n_train": n_train}


def _as_matrix(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 2-D array with finite values, else ValueError."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (n, d), got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or inf values: re-embed the affected items")
    return x


class VectorIndex:
    """faiss index over L2-normalised float32 vectors, inner product, with int64 item ids."""

    def __init__(self, index: Any, kind: str, params: dict[str, Any]) -> None:
        """Wrap an already built ``faiss.IndexIDMap2``; use :meth:`build` or :meth:`load` instead."""
        self._index = index
        self.kind = kind
        self.params = dict(params)
        self.d = int(index.d)

    @property
    def ntotal(self) -> int:
        """Number of stored vectors."""
        return int(self._index.ntotal)

    def __repr__(self) -> str:
        return f"VectorIndex(kind={self.kind!r}, d={self.d}, ntotal={self.ntotal}, params={self.params})"

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, spec: IndexSpec = IndexSpec()) -> "VectorIndex":
        """Index ``vectors`` (n, d), which should be L2-normalised, under the item ``ids`` (n,)."""
        import faiss

        x = _as_matrix(vectors, "vectors")
        n, d = x.shape
        if n == 0 or d == 0:
            raise ValueError(f"cannot build an index from empty vectors of shape {x.shape}: add items first")
        ids = np.asarray(ids)
        if ids.ndim != 1 or len(ids) != n:
            raise ValueError(f"ids must have shape ({n},) to match the vectors, got {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(np.unique(ids)) != n:
            raise ValueError(f"ids contain {n - len(np.unique(ids))} duplicate(s): every item needs a unique id")

        kind = choose_kind(n, spec)
        if kind == "flat":
            inner, params = faiss.IndexFlatIP(d), {}
        else:
            params = ivfpq_params(n, d, spec)
            quantizer = faiss.IndexFlatIP(d)
            ivf = faiss.IndexIVFPQ(quantizer, d, params["nlist"], params["m"], params["nbits"],
                                   faiss.METRIC_INNER_PRODUCT)
            # seeded k-means; min_points_per_centroid=1 silences faiss's stderr warning on small sets
            for cp in (ivf.cp, ivf.pq.cp):
                cp.seed = spec.seed
                cp.min_points_per_centroid = 1
            ivf.nprobe = params["nprobe"]  # saved with the file, so plain faiss readers get it too
            inner = faiss.IndexRefineFlat(ivf)
            inner.k_factor = float(params["rerank_factor"])
            rng = np.random.default_rng(spec.seed)
            train = x[np.sort(rng.choice(n, size=params["n_train"], replace=False))]
            if len(train) < 2 ** params["nbits"]:  # only n == 1: PQ k-means needs >= 2**nbits points
                train = np.resize(train, (2 ** params["nbits"], d))
            inner.train(train)
        index = faiss.IndexIDMap2(inner)
        index.add_with_ids(x, ids)
        return cls(index, kind, params)

    def ids(self) -> np.ndarray:
        """The item ids stored, in insertion order (int64)."""
        import faiss

        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add ``vectors`` (n, d), L2-normalised, under new item ``ids`` (n,), without rebuilding.

        An IVF-PQ index encodes them with its trained quantizer; when a collection has grown far
        beyond what it was trained on, rebuilding (``VectorIndex.build``) gives better recall.
        """
        x = _as_matrix(vectors, "vectors")
        ids = np.asarray(ids)
        if x.shape[1] != self.d:
            raise ValueError(f"vectors have dimension {x.shape[1]} but the index has dimension {self.d}")
        if ids.ndim != 1 or len(ids) != len(x) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be {len(x)} integers to match the vectors, got shape {ids.shape}")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        clash = np.intersect1d(ids, self.ids())
        if len(np.unique(ids)) != len(ids) or len(clash):
            raise ValueError(f"ids must be new and unique: {clash[:5].tolist() or 'duplicates in the batch'}")
        if len(x):
            self._index.add_with_ids(x, ids)

    def _ivf(self) -> Any:
        import faiss

        return faiss.extract_index_ivf(self._index)

    def _ivf_search(self, q: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """Search visiting ``nprobe`` lists, passed per call (no shared state, so thread-safe)."""
        import faiss

        refine = faiss.downcast_index(self._index.index)
        ivf_params = faiss.SearchParametersIVF(nprobe=nprobe)
        params = faiss.IndexRefineSearchParameters(k_factor=float(refine.k_factor), base_index_params=ivf_params)
        return self._index.search(q, k, params=params)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``min(k, ntotal)`` best items per query, best first: scores D float32 and ids I int64.

        ``queries`` is (q, d) or a single (d,) vector. ``nprobe`` (IVF lists visited) defaults to
        ``params["nprobe"]``; rows that come back short are searched again over every list, so no
        result is ever padded with -1.
        """
        if self.ntotal == 0:
            raise EmptyIndexError("the index holds no items: add images and re-run `mmsearch index`")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        q = _as_matrix(q, "queries")
        if q.shape[1] != self.d:
            raise ValueError(f"queries have dimension {q.shape[1]} but the index has dimension {self.d}: "
                             "embed them with the model that built the index")
        k = min(int(k), self.ntotal)
        if len(q) == 0:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        if self.kind == "flat":
            D, I = self._index.search(q, k)
        else:
            nlist = int(self.params.get("nlist", self._ivf().nlist))
            probe = int(nprobe if nprobe is not None else self.params.get("nprobe", 1))
            if probe < 1:
                raise ValueError(f"nprobe must be at least 1, got {probe}")
            D, I = self._ivf_search(q, k, min(probe, nlist))
            short = np.flatnonzero((I < 0).any(axis=1))
            if len(short) and probe < nlist:
                D[short], I[short] = self._ivf_search(q[short], k, nlist)
        if (I < 0).any():
            raise RuntimeError(f"faiss returned fewer than {k} results from {self.ntotal} items: "
                               "rebuild the index with `mmsearch index`")
        return np.asarray(D, np.float32), np.asarray(I, np.int64)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``)."""
        import faiss

        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            faiss.write_index(self._index, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        try:  # make the rename durable; not every platform can fsync a folder
            dir_fd = os.open(path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: str | os.PathLike[str], kind: str, params: dict[str, Any]) -> "VectorIndex":
        """Read an index written by :meth:`save`; ``kind`` and ``params`` come from the manifest."""
        import faiss

        path = Path(path)
        hint = "re-run `mmsearch index` to rebuild it"
        if not path.exists():
            raise IndexNotFoundError(f"index file {path} does not exist: {hint}")
        if not path.is_file():
            raise IndexFormatError(f"index file {path} is not a regular file: {hint}")
        if kind not in KINDS:
            raise IndexFormatError(f"index file {path} has unknown kind {kind!r}: {hint}")
        try:
            index = faiss.read_index(str(path))  # already downcast, and owns its memory
        except (RuntimeError, OSError, MemoryError) as e:
            lines = str(e).strip().splitlines() or [type(e).__name__]
            msg = re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", lines[-1])  # drop faiss's C++ location
            raise IndexFormatError(f"index file {path} is unreadable ({msg}): {hint}") from None
        if not isinstance(index, faiss.IndexIDMap2):
            raise IndexFormatError(f"index file {path} holds a {type(index).__name__}, not an id map: {hint}")
        inner = faiss.downcast_index(index.index)
        if kind == "flat" and not isinstance(inner, faiss.IndexFlat):
            raise IndexFormatError(f"index file {path} holds {type(inner).__name__}, expected flat: {hint}")
        if kind == "ivfpq":
            if not isinstance(inner, faiss.IndexRefine):
                raise IndexFormatError(f"index file {path} holds {type(inner).__name__}, expected ivfpq: {hint}")
            try:
                faiss.extract_index_ivf(inner)
            except RuntimeError:
                raise IndexFormatError(f"index file {path} has no IVF inside its ivfpq index: {hint}") from None
            if "rerank_factor" in params:
                inner.k_factor = float(params["rerank_factor"])
        return cls(index, kind, params)
