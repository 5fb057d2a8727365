"""``VectorIndex``: a faiss index over L2-normalised float32 vectors, inner product, stable int64 item
ids; built from a plan, changed in place, searched (lossy codes re-ranked exactly), saved and loaded.
What is not in the faiss file is its :class:`IndexParams`."""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from typing import Any

import numpy as np

from mmsearch.config import IndexSpec
from mmsearch.errors import BadArgumentError, EmptyIndexError, IndexFormatError

from . import _faiss, gpu, legacy
from ._checks import as_matrix, check_ids, check_new_ids
from .exact import VectorLookup, keep_best
from .files import read_index, write_index
from .params import BuildSeconds, IndexParams
from .plan import MIN_POINTS_PER_CENTROID, IndexPlan, plan_index
from .choice import choose_codes
from .tuning import Tuning, tune

#: kinds whose search returns exact inner products (no re-ranking needed)
EXACT_KINDS = ("flat", "hnsw", "ivfflat")
#: at most this many candidates beyond k are re-ranked exactly per query
RERANK_MAX = 4096


def check_spec(spec: IndexSpec, d: int, n: int = 1) -> None:
    """Raise ValueError now if ``spec`` cannot give an index for ``n`` vectors of dimension ``d``."""
    plan_index(max(1, n), d, spec)
    if spec.factory:
        _faiss.from_factory(d, spec.factory)


def _training_sample(index, x: np.ndarray, plan: IndexPlan, spec: IndexSpec) -> tuple[np.ndarray, IndexPlan]:
    """The vectors to train ``index`` on (a seeded sample of ``x``), and the plan with its ``n_train``
    (a factory string's is only known now: sized from its lists)."""
    n, d = x.shape
    if plan.n_train is None:
        lists = _faiss.nlist(index) or 1
        plan = replace(plan, n_train=min(n, max(256 * MIN_POINTS_PER_CENTROID,
                                                max(MIN_POINTS_PER_CENTROID, spec.train_per_list) * lists)))
    rng = np.random.default_rng(spec.seed)
    train = x[np.sort(rng.choice(n, size=plan.n_train, replace=False))] if plan.n_train < n else x
    if plan.kind == "ivfpq" and len(train) < 2 ** plan.nbits:  # only tiny n: PQ needs >= 2**nbits points
        train = np.resize(train, (2 ** plan.nbits, d))
    return train, plan


class VectorIndex:
    """faiss index over L2-normalised float32 vectors, inner product, with stable int64 item ids."""

    def __init__(self, index: Any, kind: str, params: IndexParams | dict[str, Any],
                 vectors: VectorLookup | None = None) -> None:
        """Wrap an already built faiss index; use :meth:`build` or :meth:`load` instead."""
        self._index = index
        self.kind = kind
        self.config = params if isinstance(params, IndexParams) else IndexParams.from_json(params)
        self.d = int(index.d)
        self._lookup = vectors
        self._ids: np.ndarray | None = None
        self._gpu_index = None
        self.read_only = False  # memory-mapped: faiss would abort the process on a write

    @property
    def params(self) -> dict[str, Any]:
        """The parameters as the manifest stores them (``index.params``); a new dict on each call."""
        return self.config.to_json()

    @property
    def lookup(self) -> VectorLookup | None:
        """The stored vectors used for exact re-ranking (None until attached)."""
        return self._lookup

    def _writable(self) -> None:
        if self.read_only:
            raise ValueError("this index is memory-mapped (read-only): load it with mmap=False to change it")

    @property
    def ntotal(self) -> int:
        """Number of stored vectors."""
        return int(self._index.ntotal)

    def __repr__(self) -> str:
        return f"VectorIndex(kind={self.kind!r}, d={self.d}, ntotal={self.ntotal}, params={self.params})"

    # ---- building --------------------------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, spec: IndexSpec = IndexSpec(),
              tune_queries: np.ndarray | None = None) -> "VectorIndex":
        """Index ``vectors`` (n, d), L2-normalised, under the item ``ids`` (n,).

        The kind and parameters come from :func:`plan_index`; IVF and HNSW search settings are
        then tuned to ``spec.target_recall`` (see :meth:`tune`), on ``tune_queries`` when given, else
        on a sample of the stored vectors (each query's own entry left out of both result lists).
        ``vectors`` are kept (not copied) for exact re-ranking: pass arrays that stay valid.
        """
        x = as_matrix(vectors, "vectors")
        n, d = x.shape
        if n == 0 or d == 0:
            raise ValueError(f"cannot build an index from empty vectors of shape {x.shape}: add items first")
        ids = check_ids(ids, n)
        plan, choice = plan_index(n, d, spec), None
        if plan.kind == "ivfpq" and spec.index_type == "auto" and spec.choose_sample > 0:
            plan, choice = choose_codes(cls, x, plan, spec)
        self = cls._from_plan(x, ids, plan, spec, tune_queries)
        self.config = replace(self.config, choice=choice)
        return self

    @classmethod
    def _from_plan(cls, x: np.ndarray, ids: np.ndarray, plan: IndexPlan, spec: IndexSpec,
                   tune_queries: np.ndarray | None = None) -> "VectorIndex":
        """Build ``plan`` over ``x`` (checked) under ``ids``: train, add, tune."""
        d = x.shape[1]
        on_gpu = gpu.use_gpu(spec)
        index = _faiss.new_index(plan, d)
        _faiss.seed(index, spec.seed)
        t0 = time.perf_counter()
        if not index.is_trained:
            train, plan = _training_sample(index, x, plan, spec)
            gpu.train(index, train, on_gpu)
        self = cls(index, plan.kind, replace(IndexParams.of_plan(plan), gpu_build=on_gpu), VectorLookup(x, ids))
        t1 = time.perf_counter()
        self._add(x, ids, on_gpu)
        self._ids = ids.copy()
        t2 = time.perf_counter()
        if plan.kind != "flat":
            self.tune(spec, tune_queries)
        seconds = BuildSeconds(round(t1 - t0, 3), round(t2 - t1, 3), round(time.perf_counter() - t2, 3))
        self.config = replace(self.config, build_seconds=seconds)
        return self

    # ---- ids, adding and removing -----------------------------------------------------------------
    def ids(self) -> np.ndarray:
        """The item ids stored (int64, sorted)."""
        if self._ids is None:
            self._ids = _faiss.stored_ids(self._index)
        return self._ids

    def attach(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Use ``vectors[row]`` (of item ``ids[row]``, e.g. a memory-mapped embeddings file) for re-ranking."""
        self._lookup = VectorLookup(vectors, ids)

    def _add(self, x: np.ndarray, ids: np.ndarray, on_gpu: bool = False) -> None:
        if not len(x):
            return
        if on_gpu and self.kind in ("ivfflat", "ivfpq"):
            added = gpu.add_on_gpu(self._index, x, ids, self.config.plan.m)
            if added is not None:
                self._index = added
                return
            self.config = replace(self.config, gpu_build=False)  # a layout the GPU does not take: the CPU adds
        self._index.add_with_ids(x, ids)

    def add(self, vectors: np.ndarray, ids: np.ndarray, keep_vectors: bool = True) -> None:
        """Add ``vectors`` (n, d), L2-normalised, under new item ``ids`` (n,), without rebuilding.

        IVF indexes encode them with their trained quantizer; :meth:`needs_rebuild` says when the
        collection has outgrown it. The vectors are also appended to the re-ranking store; a caller
        that keeps its own store passes ``keep_vectors=False`` and calls :meth:`attach` instead.
        """
        self._writable()
        x = as_matrix(vectors, "vectors")
        if x.shape[1] != self.d:
            raise ValueError(f"vectors have dimension {x.shape[1]} but the index has dimension {self.d}")
        stored = self.ids()
        ids = check_new_ids(ids, len(x), stored)
        self._add(x, ids)
        self._ids = np.union1d(stored, ids)
        self._gpu_index = None
        if keep_vectors and self._lookup is not None and len(x):
            old_ids = self._lookup.row_ids()
            live = np.isin(old_ids, stored)  # rows of removed items go, so a re-used id finds its new vector
            self._lookup = VectorLookup(np.concatenate([np.asarray(self._lookup.vectors[live], np.float32), x]),
                                        np.concatenate([old_ids[live], ids]))

    @property
    def can_remove(self) -> bool:
        """Whether :meth:`remove` works in place (HNSW graphs cannot drop nodes: rebuild instead)."""
        return _faiss.hnsw(self._index) is None

    def remove(self, ids: np.ndarray) -> int:
        """Remove the items ``ids`` in place; returns how many were stored. Unknown ids are ignored."""
        faiss = _faiss.faiss_module()

        self._writable()
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        if not len(ids):
            return 0
        if not self.can_remove:
            raise NotImplementedError(f"a {self.kind} index cannot remove items in place: rebuild it")
        try:
            removed = int(self._index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))))
        except RuntimeError as e:
            raise NotImplementedError(f"this index cannot remove items in place ({_faiss.faiss_message(e)}): "
                                      "rebuild it") from None
        self._ids = np.setdiff1d(self.ids(), ids)
        self._gpu_index = None
        return removed

    def needs_rebuild(self, n: int, spec: IndexSpec) -> str | None:
        """Why an index holding ``n`` vectors should be rebuilt rather than updated (None: it is fine)."""
        plan, mine = plan_index(n, self.d, spec), self.config.plan
        if plan.kind != self.kind or plan.factory != mine.factory:
            return f"{n} vectors call for a {plan.kind} index, this one is {self.kind}"
        trained = int(mine.n_trained or n)
        if self.nlist and n > spec.growth_rebuild * trained:
            return (f"the collection grew from {trained} to {n} vectors since its quantizer was trained "
                    f"(more than {spec.growth_rebuild:g}x): retraining")
        if self.kind == "ivfpq":
            planned, held = plan.m * plan.nbits, (mine.m or 0) * (mine.nbits or 8)
            # codes chosen by measurement may be smaller than the budget allows: only too large ones go
            if held > planned or (held != planned and self.config.choice is None):
                return f"the memory budget now calls for PQ m={plan.m}, this index has m={mine.m}"
        return None

    # ---- searching -------------------------------------------------------------------------------
    @property
    def nlist(self) -> int:
        """IVF lists (0: not an IVF index)."""
        return _faiss.nlist(self._index)

    @property
    def is_hnsw(self) -> bool:
        return self.kind == "hnsw" or _faiss.hnsw(self._index) is not None

    @property
    def reranks(self) -> bool:
        """Whether candidates are re-scored exactly from stored vectors (lossy codes, vectors attached)."""
        exact = self.kind in EXACT_KINDS or (self.kind == "factory" and _faiss.exact_scores(self._index))
        return not exact and self._lookup is not None and (self.config.rerank_factor or 1) > 1

    def _raw_search(self, q: np.ndarray, k: int, nprobe: int | None, ef: int | None):
        index = self._index
        if self._gpu_index is not None and k <= gpu.GPU_MAX_K and (nprobe or 0) <= gpu.GPU_MAX_K:
            index = self._gpu_index  # faiss GPU indexes take k and nprobe up to 2048
        if self.config.legacy_refine and nprobe and _faiss.is_ivf(self._index):
            legacy.set_nprobe(self._index, nprobe)
            params = None
        else:
            params = _faiss.search_params(self._index, nprobe, ef)
        return index.search(q, k, params=params) if params is not None else index.search(q, k)

    def _queries(self, queries: np.ndarray, k: int, settings: dict[str, int | None]) -> np.ndarray:
        """``queries`` as a (q, d) float32 matrix, after checking them, ``k`` and the search ``settings``."""
        if self.ntotal == 0:
            raise EmptyIndexError("the index holds no items: add images and re-run `mmsearch index`")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        q = as_matrix(q, "queries")
        if q.shape[1] != self.d:
            raise ValueError(f"queries have dimension {q.shape[1]} but the index has dimension {self.d}: "
                             "embed them with the model that built the index")
        for name, v in settings.items():
            if v is not None and (isinstance(v, bool) or v < 1):
                raise BadArgumentError(f"{name} must be at least 1, got {v}")
        return q

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None,
               rerank_factor: int | None = None, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """The ``min(k, ntotal)`` best items per query, best first: scores D float32 and ids I int64.

        ``queries`` is (q, d) or a single (d,) vector. ``nprobe`` (IVF lists visited), ``ef_search``
        (HNSW) and ``rerank_factor`` (candidates re-ranked exactly, as a multiple of k) default to the
        tuned values in ``config``. Rows that come back short are searched again over every list, so
        no result is ever padded with -1.
        """
        q = self._queries(queries, k, {"nprobe": nprobe, "ef_search": ef_search, "rerank_factor": rerank_factor})
        k = min(int(k), self.ntotal)
        if len(q) == 0:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        nlist = self.nlist
        probe = nprobe if nprobe is not None else self.config.nprobe
        if probe and nlist:
            probe = min(int(probe), nlist)
        ef = ef_search if ef_search is not None else self.config.ef_search
        factor = rerank_factor if rerank_factor is not None else (self.config.rerank_factor or 1)
        # re-rank k * factor candidates, but no more than RERANK_MAX beyond k: large k stays linear in k
        depth = min(self.ntotal, max(k, min(k * int(factor), k + RERANK_MAX))) if self.reranks else k
        if ef:
            ef = max(int(ef), depth)  # HNSW returns at most efSearch results
        if probe and nlist and nprobe is None:
            # visit enough lists to hold ~2x the candidates asked for, so large k does not fall back
            # to a scan of every list
            probe = min(nlist, max(int(probe), math.ceil(2 * depth * nlist / max(1, self.ntotal))))
        Ds, Is = [], []
        for start in range(0, len(q), batch_size):
            qb = q[start:start + batch_size]
            D, I = self._raw_search(qb, depth, probe, ef)
            short = np.flatnonzero((I < 0).sum(axis=1) > depth - k)  # fewer than k real results
            if len(short):
                D[short], I[short] = self._raw_search(qb[short], depth, nlist or None, max(ef or 0, 4 * depth) or None)
            D, I = self._rerank(qb, I, k) if self.reranks else (D[:, :k], I[:, :k])
            Ds.append(D)
            Is.append(I)
        D, I = np.concatenate(Ds), np.concatenate(Is)
        if (I < 0).any():
            raise RuntimeError(f"faiss returned fewer than {k} results from {self.ntotal} items: "
                               "rebuild the index with `mmsearch index`")
        return np.asarray(D, np.float32), np.asarray(I, np.int64)

    def _rerank(self, q: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the candidates ``I`` (-1 = none) from the stored vectors; the best k
        (ties in the candidates' order)."""
        D, I = keep_best(self._lookup.scores(q, I), I, k)
        I[~np.isfinite(D)] = -1
        return D, I

    # ---- tuning ------------------------------------------------------------------------------------
    def tune(self, spec: IndexSpec = IndexSpec(), queries: np.ndarray | None = None, k: int = 10) -> Tuning | None:
        """Tune the search setting (see :func:`mmsearch.index.tuning.tune`) and keep it, with the
        record, in ``config``. Returns the record (None: nothing to measure)."""
        t = tune(self, spec, queries, k)
        if t is None:
            return None
        chosen = {key: getattr(t.chosen, key) for key in ("nprobe", "ef_search", "rerank_factor")}
        self.config = replace(self.config, tuning=t, **{key: v for key, v in chosen.items() if v is not None})
        return t

    # ---- GPU ---------------------------------------------------------------------------------------
    def to_gpu(self) -> bool:
        """Search on the GPU from now on (when faiss-gpu sees a CUDA device); False if it stays on the CPU."""
        if self.kind == "hnsw":
            return False
        self._gpu_index = gpu.gpu_copy(self._index, self.config.plan.m)
        return self._gpu_index is not None

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` atomically (see :func:`mmsearch._util.atomic_file`)."""
        write_index(self._index, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], kind: str, params: IndexParams | dict[str, Any], mmap: bool = False,
             vectors: VectorLookup | None = None) -> "VectorIndex":
        """Read an index written by :meth:`save`; ``kind`` and ``params`` come from the manifest
        (``params`` as it stores them, or as :class:`IndexParams`).

        ``mmap=True`` maps the file instead of reading it (the OS pages in what searches touch);
        such an index is read-only. Format-1 files are adapted by :mod:`mmsearch.index.legacy`.
        """
        index = read_index(path, kind, mmap)
        if not isinstance(params, IndexParams):
            try:
                params = IndexParams.from_json(params)
            except (KeyError, TypeError, AttributeError) as e:
                raise IndexFormatError(f"index parameters of {path} are malformed ({e!r}): "
                                       "re-run `mmsearch index` to rebuild it") from None
        self = cls(index, kind, params, vectors)
        self.read_only = mmap
        if legacy.is_format1(index):
            self.kind, self.config = legacy.adopt(index, self.config)
        return self
