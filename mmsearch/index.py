"""The vector index: faiss over L2-normalised float32 vectors, inner-product metric, stable int64 item ids.

Kinds (chosen by :func:`plan_index` from N, d and a memory budget, or forced):

``flat``     exact search (``IndexFlatIP`` in an ``IndexIDMap2``).
``hnsw``     graph search (``IndexHNSWFlat``); exact distances, tuned ``efSearch``; no removal in place.
``ivfflat``  inverted file over full vectors (``IndexIVFFlat``); exact distances, tuned ``nprobe``.
``ivfpq``    inverted file over product-quantised codes (``IndexIVFPQ``); its candidates are re-ranked
             exactly with the stored embeddings (``rerank_factor`` x k of them), tuned ``nprobe``.
``factory``  any faiss ``index_factory`` string the user forces; re-ranked unless its codes are exact.

IVF indexes hold the item ids themselves; the others sit in an ``IndexIDMap2``. ``nprobe`` / ``efSearch``
are tuned at build time to reach ``IndexSpec.target_recall`` recall@10 against exact search and kept in
``params``. ``faiss`` is imported inside functions, so importing this module stays cheap.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmsearch.config import DEFAULT_INDEX_MEMORY, IndexSpec
from mmsearch.errors import BadArgumentError, EmptyIndexError, IndexFormatError, IndexNotFoundError

KINDS = ("flat", "hnsw", "ivfflat", "ivfpq", "factory")
INDEX_TYPES = ("auto",) + KINDS[:-1]
#: PQ sub-quantizer counts tried, largest first (all of them valid for GpuIndexIVFPQ; 64 needs fp16 tables)
_PQ_M_CHOICES = (64, 48, 32, 24, 16, 8, 4, 2, 1)
#: faiss k-means wants at least this many training points per centroid
_MIN_POINTS_PER_CENTROID = 39
#: kinds whose search returns exact inner products (no re-ranking needed)
_EXACT_KINDS = ("flat", "hnsw", "ivfflat")
#: faiss GPU indexes search with k and nprobe up to this; beyond it the CPU index answers
_GPU_MAX_K = 2048
#: at most this many candidates beyond k are re-ranked exactly per query
RERANK_MAX = 4096
#: RAM faiss needs per vector besides the codes: the 8-byte id (plus list/graph bookkeeping)
_ID_BYTES = 8


def _faiss():
    """The faiss module, or one clear error saying how to install it (and that cpu and gpu builds clash)."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(f"faiss is not importable ({e}): pip install 'mmsearch[cpu]' (or 'mmsearch[gpu]' on a "
                          "CUDA machine); if both faiss-cpu and faiss-gpu are installed, uninstall both and "
                          "install one") from None
    return faiss


def parse_size(text: str | int | None) -> int | None:
    """``"4G"``, ``"512M"``, ``"1.5GiB"``, ``"2000000000"`` -> bytes (None stays None)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise BadArgumentError(f"memory budget {text!r} is not a size: use e.g. 512M, 4G or 1.5G")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _nlist_for(n: int, spec: IndexSpec) -> int:
    cap = max(1, n // _MIN_POINTS_PER_CENTROID)  # every list trains on >= 39 points
    nlist = spec.nlist or 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return max(1, min(int(nlist), cap))


def ram_per_vector(kind: str, d: int, m: int = 0, hnsw_m: int = 32) -> int:
    """Bytes of RAM one vector costs in an index of ``kind`` (codes + id + structure), for budgeting."""
    if kind in ("flat", "ivfflat"):
        return 4 * d + _ID_BYTES
    if kind == "hnsw":
        return 4 * d + _ID_BYTES + 2 * hnsw_m * 4 + 8  # vectors, id map, links on level 0 (2M ints) and levels
    if kind == "ivfpq":
        return m + _ID_BYTES
    raise ValueError(f"no memory model for index kind {kind!r}")


def plan_index(n: int, d: int, spec: IndexSpec = IndexSpec()) -> dict[str, Any]:
    """What to build for ``n`` vectors of dimension ``d``: kind, parameters and why.

    ``auto`` (rules distilled from autofaiss): exact ``flat`` up to ``spec.flat_max`` vectors, then
    ``ivfflat`` below ``spec.ivfflat_max`` vectors while full vectors fit the memory budget, then
    ``ivfpq`` with the largest PQ m (of 64/48/32/24/16/8 dividing d) that fits the budget. ``nlist`` is
    2**round(log2(4*sqrt(N))); k-means trains on at most ``spec.train_per_list`` points per list.
    A forced ``spec.factory`` string or ``spec.index_type`` wins over the rules.
    """
    if n < 1 or d < 1:
        raise ValueError(f"cannot plan an index for {n} vectors of dimension {d}")
    budget = parse_size(spec.memory) or DEFAULT_INDEX_MEMORY
    if spec.index_type not in INDEX_TYPES:
        raise BadArgumentError(f"unknown index type {spec.index_type!r}: use {', '.join(INDEX_TYPES)}")
    for name in ("rerank_factor", "hnsw_m", "train_per_list"):
        if getattr(spec, name) < 1:
            raise BadArgumentError(f"{name}={getattr(spec, name)} must be at least 1")
    if not 0 < spec.target_recall <= 1:
        raise BadArgumentError(f"target_recall={spec.target_recall} must be in (0, 1]")
    plan: dict[str, Any] = {"memory_budget": budget, "n_trained": n}
    if spec.factory:
        plan.update(kind="factory", factory=spec.factory.strip(), reason="forced factory string")
    elif spec.index_type != "auto":
        plan.update(kind=spec.index_type, reason=f"forced index type {spec.index_type}")
    else:
        flat_bytes = n * ram_per_vector("flat", d)
        if n <= spec.flat_max and flat_bytes <= budget:
            plan.update(kind="flat", reason=f"{n} <= flat_max {spec.flat_max} vectors: exact search")
        elif n < spec.ivfflat_max and n * ram_per_vector("ivfflat", d) <= budget:
            plan.update(kind="ivfflat", reason=f"{n} vectors < {spec.ivfflat_max} and full vectors "
                                                f"({_fmt_bytes(n * ram_per_vector('ivfflat', d))}) fit the budget {_fmt_bytes(budget)}")
        else:
            plan.update(kind="ivfpq", reason=f"{n} vectors: compressed codes to fit the budget {_fmt_bytes(budget)}")
    kind = plan["kind"]
    if kind in ("ivfflat", "ivfpq"):
        nlist = _nlist_for(n, spec)
        plan["nlist"] = nlist
        plan["n_train"] = min(n, max(_MIN_POINTS_PER_CENTROID * nlist, spec.train_per_list * nlist))
    if kind == "ivfpq":
        if spec.pq_m is not None:
            if spec.pq_m < 1 or d % spec.pq_m:
                raise BadArgumentError(f"pq_m={spec.pq_m} does not divide the vector dimension {d}: pick a divisor of {d}")
            m = spec.pq_m
        else:
            fits = [c for c in _PQ_M_CHOICES if d % c == 0 and n * ram_per_vector("ivfpq", d, c) <= budget]
            if not fits:
                need = n * ram_per_vector("ivfpq", d, min(c for c in _PQ_M_CHOICES if d % c == 0))
                raise BadArgumentError(f"memory budget {_fmt_bytes(budget)} is too small for {n} vectors "
                                       f"(the smallest IVF-PQ needs about {_fmt_bytes(need)}): raise --memory")
            m = fits[0]
        plan["m"] = m
        plan["nbits"] = 8 if n >= 256 else max(1, int(n).bit_length() - 1)  # PQ k-means needs >= 2**nbits points
        plan["n_train"] = max(plan["n_train"], min(n, 2 ** plan["nbits"] * _MIN_POINTS_PER_CENTROID))
        plan["rerank_factor"] = int(spec.rerank_factor)
    if kind == "hnsw":
        plan["hnsw_m"] = int(spec.hnsw_m)
    if kind == "factory":
        plan["rerank_factor"] = int(spec.rerank_factor)
    if kind != "factory" and kind != "flat":
        plan["ram_bytes_estimate"] = n * ram_per_vector(kind, d, plan.get("m", 0), spec.hnsw_m)
    return plan


def check_spec(spec: IndexSpec, d: int, n: int = 1) -> None:
    """Raise ValueError now if ``spec`` cannot give an index for ``n`` vectors of dimension ``d``."""
    plan_index(max(1, n), d, spec)
    if spec.factory:
        VectorIndex._from_factory(d, spec.factory)


def _as_matrix(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 2-D array with finite values, else ValueError."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (n, d), got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or inf values: re-embed the affected items")
    return x


def _check_ids(ids: np.ndarray, n: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) != n:
        raise ValueError(f"ids must have shape ({n},) to match the vectors, got {ids.shape}")
    if n and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(np.unique(ids)) != n:
        raise ValueError(f"ids contain {n - len(np.unique(ids))} duplicate(s): every item needs a unique id")
    if (ids < 0).any():
        raise ValueError("ids must be non-negative (faiss uses -1 for 'no result')")
    return ids


def _faiss_message(e: BaseException) -> str:
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", lines[-1])  # drop faiss's C++ location


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

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` (all must be stored), same shape."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self._keys, ids)
        pos = np.minimum(pos, len(self._keys) - 1)
        if not (self._keys[pos] == ids).all():
            raise KeyError(f"item ids not stored: {ids[self._keys[pos] != ids][:5].tolist()}")
        return pos if self._perm is None else self._perm[pos]

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


def gpu_count() -> int:
    """CUDA devices faiss can use (0 with faiss-cpu)."""
    faiss = _faiss()

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def _use_gpu(spec: IndexSpec) -> bool:
    return spec.gpu != "never" and gpu_count() > 0


def _gpu_resources():
    faiss = _faiss()

    global _GPU_RES
    if _GPU_RES is None:
        _GPU_RES = faiss.StandardGpuResources()
    return _GPU_RES


_GPU_RES = None


def _gpu_cloner_options(m: int | None):
    faiss = _faiss()

    co = faiss.GpuClonerOptions()
    co.useFloat16 = bool(m and m > 48)  # GpuIndexIVFPQ needs float16 lookup tables beyond m=48
    return co


class VectorIndex:
    """faiss index over L2-normalised float32 vectors, inner product, with stable int64 item ids."""

    def __init__(self, index: Any, kind: str, params: dict[str, Any], vectors: VectorLookup | None = None) -> None:
        """Wrap an already built faiss index; use :meth:`build` or :meth:`load` instead."""
        self._index = index
        self.kind = kind
        self.params = dict(params)
        self.d = int(index.d)
        self._lookup = vectors
        self._ids: np.ndarray | None = None
        self._gpu_index = None
        self.read_only = False  # memory-mapped: faiss would abort the process on a write

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
        faiss = _faiss()

        x = _as_matrix(vectors, "vectors")
        n, d = x.shape
        if n == 0 or d == 0:
            raise ValueError(f"cannot build an index from empty vectors of shape {x.shape}: add items first")
        ids = _check_ids(ids, n)
        plan = plan_index(n, d, spec)
        kind = plan["kind"]
        params = dict(plan)
        gpu = _use_gpu(spec)
        if kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        elif kind == "hnsw":
            index = faiss.IndexIDMap2(faiss.IndexHNSWFlat(d, plan["hnsw_m"], faiss.METRIC_INNER_PRODUCT))
        elif kind in ("ivfflat", "ivfpq"):
            quantizer = faiss.IndexFlatIP(d)
            if kind == "ivfflat":
                index = faiss.IndexIVFFlat(quantizer, d, plan["nlist"], faiss.METRIC_INNER_PRODUCT)
            else:
                index = faiss.IndexIVFPQ(quantizer, d, plan["nlist"], plan["m"], plan["nbits"],
                                         faiss.METRIC_INNER_PRODUCT)
            index.own_fields = True
            quantizer.this.disown()
        else:
            index = cls._from_factory(d, plan["factory"])
        cls._seed(index, spec.seed)
        t0 = time.perf_counter()
        if not index.is_trained:
            if "n_train" not in params:  # a factory string: size the sample from its lists
                lists = int(faiss.extract_index_ivf(index).nlist) if _is_ivf(index) else 1
                params["n_train"] = min(n, max(256 * _MIN_POINTS_PER_CENTROID,
                                               max(_MIN_POINTS_PER_CENTROID, spec.train_per_list) * lists))
            n_train = params["n_train"]
            rng = np.random.default_rng(spec.seed)
            train = x[np.sort(rng.choice(n, size=n_train, replace=False))] if n_train < n else x
            if kind == "ivfpq" and len(train) < 2 ** plan["nbits"]:  # only tiny n: PQ needs >= 2**nbits points
                train = np.resize(train, (2 ** plan["nbits"], d))
            cls._train(index, train, gpu, plan.get("m"))
        params["gpu_build"] = gpu
        self = cls(index, kind, params, VectorLookup(x, ids))
        t1 = time.perf_counter()
        self._add(x, ids, gpu)
        self._ids = ids.copy()
        t2 = time.perf_counter()
        if kind != "flat":
            self.tune(spec, tune_queries)
        self.params["build_seconds"] = {"train": round(t1 - t0, 3), "add": round(t2 - t1, 3),
                                        "tune": round(time.perf_counter() - t2, 3)}
        return self

    @staticmethod
    def _from_factory(d: int, factory: str):
        faiss = _faiss()

        hint = "use e.g. 'IVF1024,PQ32', 'IVF256,Flat', 'HNSW32' or 'Flat'"
        try:
            index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        except (RuntimeError, ValueError) as e:
            raise BadArgumentError(f"bad index factory string {factory!r} for dimension {d} "
                                   f"({_faiss_message(e)}): {hint}") from None
        if not _is_ivf(index) and not isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            index = faiss.IndexIDMap2(index)
        return index

    @staticmethod
    def _seed(index, seed: int) -> None:
        """Seeded k-means everywhere; min_points_per_centroid=1 keeps faiss quiet on small sets."""
        faiss = _faiss()

        if _is_ivf(index):
            ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
            cps = [ivf.cp] + ([ivf.pq.cp] if hasattr(ivf, "pq") else [])
            for cp in cps:
                cp.seed = seed
                cp.min_points_per_centroid = 1
            if hasattr(ivf, "do_polysemous_training"):  # minutes of annealing for codes we never use
                ivf.do_polysemous_training = False

    @staticmethod
    def _train(index, train: np.ndarray, gpu: bool, m: int | None) -> None:
        faiss = _faiss()

        if gpu and _is_ivf(index):  # k-means assignment on the GPU; the trained index stays on the CPU
            ivf = faiss.extract_index_ivf(index)
            ivf.clustering_index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, faiss.IndexFlatIP(ivf.d))
        try:
            index.train(train)
        except RuntimeError as e:
            raise BadArgumentError(f"cannot train the index on {len(train)} vectors ({_faiss_message(e)}): "
                                   "use fewer lists (--index-factory) or add more items") from None
        if gpu and _is_ivf(index):
            faiss.extract_index_ivf(index).clustering_index = None

    # ---- ids, adding and removing -----------------------------------------------------------------
    def ids(self) -> np.ndarray:
        """The item ids stored (int64, sorted)."""
        if self._ids is None:
            faiss = _faiss()

            if _is_ivf(self._index):
                ivf = faiss.extract_index_ivf(self._index)
                inv = ivf.invlists
                parts = [faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).copy()
                         for i in range(ivf.nlist) if inv.list_size(i)]
                self._ids = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
            else:
                self._ids = np.sort(faiss.vector_to_array(self._index.id_map).astype(np.int64))
        return self._ids

    def attach(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Use ``vectors[row]`` (of item ``ids[row]``, e.g. a memory-mapped embeddings file) for re-ranking."""
        self._lookup = VectorLookup(vectors, ids)

    def _add(self, x: np.ndarray, ids: np.ndarray, gpu: bool = False) -> None:
        faiss = _faiss()

        if not len(x):
            return
        if gpu and self.kind in ("ivfflat", "ivfpq"):
            try:
                g = faiss.index_cpu_to_gpu(_gpu_resources(), 0, self._index, _gpu_cloner_options(self.params.get("m")))
                g.add_with_ids(x, ids)
                self._index = faiss.index_gpu_to_cpu(g)
                return
            except RuntimeError:  # a layout the GPU does not take: add on the CPU, same result
                self.params["gpu_build"] = False
        self._index.add_with_ids(x, ids)

    def add(self, vectors: np.ndarray, ids: np.ndarray, keep_vectors: bool = True) -> None:
        """Add ``vectors`` (n, d), L2-normalised, under new item ``ids`` (n,), without rebuilding.

        IVF indexes encode them with their trained quantizer; :meth:`needs_rebuild` says when the
        collection has outgrown it. The vectors are also appended to the re-ranking store; a caller
        that keeps its own store passes ``keep_vectors=False`` and calls :meth:`attach` instead.
        """
        self._writable()
        x = _as_matrix(vectors, "vectors")
        if x.shape[1] != self.d:
            raise ValueError(f"vectors have dimension {x.shape[1]} but the index has dimension {self.d}")
        ids = np.asarray(ids)
        if ids.ndim != 1 or len(ids) != len(x) or (len(ids) and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"ids must be {len(x)} integers to match the vectors, got shape {ids.shape}")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        clash = np.intersect1d(ids, self.ids())
        if len(np.unique(ids)) != len(ids) or len(clash):
            raise ValueError(f"ids must be new and unique: {clash[:5].tolist() or 'duplicates in the batch'}")
        if (ids < 0).any():
            raise ValueError("ids must be non-negative (faiss uses -1 for 'no result')")
        stored = self.ids()
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
        return _hnsw(self._index) is None

    def remove(self, ids: np.ndarray) -> int:
        """Remove the items ``ids`` in place; returns how many were stored. Unknown ids are ignored."""
        faiss = _faiss()

        self._writable()
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        if not len(ids):
            return 0
        if not self.can_remove:
            raise NotImplementedError(f"a {self.kind} index cannot remove items in place: rebuild it")
        try:
            removed = int(self._index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))))
        except RuntimeError as e:
            raise NotImplementedError(f"this index cannot remove items in place ({_faiss_message(e)}): rebuild it") from None
        self._ids = np.setdiff1d(self.ids(), ids)
        self._gpu_index = None
        return removed

    def needs_rebuild(self, n: int, spec: IndexSpec) -> str | None:
        """Why an index holding ``n`` vectors should be rebuilt rather than updated (None: it is fine)."""
        plan = plan_index(n, self.d, spec)
        if plan["kind"] != self.kind or plan.get("factory") != self.params.get("factory"):
            return f"{n} vectors call for a {plan['kind']} index, this one is {self.kind}"
        trained = int(self.params.get("n_trained", n))
        if _is_ivf(self._index) and n > spec.growth_rebuild * trained:
            return (f"the collection grew from {trained} to {n} vectors since its quantizer was trained "
                    f"(more than {spec.growth_rebuild:g}x): retraining")
        if self.kind in ("ivfflat", "ivfpq") and plan.get("m") != self.params.get("m"):
            return f"the memory budget now calls for PQ m={plan.get('m')}, this index has m={self.params.get('m')}"
        return None

    # ---- searching -------------------------------------------------------------------------------
    def _search_params(self, nprobe: int | None, ef: int | None):
        """Per-call search parameters (no shared state, so concurrent searches are safe)."""
        faiss = _faiss()

        if _hnsw(self._index) is not None:
            return faiss.SearchParametersHNSW(efSearch=int(ef)) if ef else None
        if not (_is_ivf(self._index) and nprobe):
            return None
        if self.params.get("legacy_refine"):  # format 1 layout: IdMap2(IndexRefineFlat(IVFPQ))
            faiss.extract_index_ivf(self._index).nprobe = int(nprobe)
            return None
        p = faiss.SearchParametersIVF(nprobe=int(nprobe))
        wrappers, inner = [], self._index
        while isinstance(inner, (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexIDMap2)):
            wrappers.append(inner)
            inner = faiss.downcast_index(inner.index)
        for w in reversed(wrappers):
            if isinstance(w, faiss.IndexPreTransform):
                p = faiss.SearchParametersPreTransform(index_params=p)
        return p

    @property
    def reranks(self) -> bool:
        """Whether candidates are re-scored exactly from stored vectors (lossy codes, vectors attached)."""
        exact = self.kind in _EXACT_KINDS or (self.kind == "factory" and _exact_scores(self._index))
        return not exact and self._lookup is not None and self.params.get("rerank_factor", 1) > 1

    def _raw_search(self, q: np.ndarray, k: int, nprobe: int | None, ef: int | None):
        index = self._index
        if self._gpu_index is not None and k <= _GPU_MAX_K and (nprobe or 0) <= _GPU_MAX_K:
            index = self._gpu_index  # faiss GPU indexes take k and nprobe up to 2048
        params = self._search_params(nprobe, ef)
        return index.search(q, k, params=params) if params is not None else index.search(q, k)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None,
               rerank_factor: int | None = None, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """The ``min(k, ntotal)`` best items per query, best first: scores D float32 and ids I int64.

        ``queries`` is (q, d) or a single (d,) vector. ``nprobe`` (IVF lists visited), ``ef_search``
        (HNSW) and ``rerank_factor`` (candidates re-ranked exactly, as a multiple of k) default to the
        tuned values in ``params``. Rows that come back short are searched again over every list, so
        no result is ever padded with -1.
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
        for name, v in (("nprobe", nprobe), ("ef_search", ef_search), ("rerank_factor", rerank_factor)):
            if v is not None and (isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be at least 1, got {v}")
        k = min(int(k), self.ntotal)
        if len(q) == 0:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        nlist = self._nlist()
        probe = nprobe if nprobe is not None else self.params.get("nprobe")
        if probe and nlist:
            probe = min(int(probe), nlist)
        ef = ef_search if ef_search is not None else self.params.get("ef_search")
        factor = rerank_factor if rerank_factor is not None else self.params.get("rerank_factor", 1)
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
            if self.reranks:
                D, I = self._rerank(qb, I, k)
            else:
                D, I = D[:, :k], I[:, :k]
            Ds.append(D)
            Is.append(I)
        D, I = np.concatenate(Ds), np.concatenate(Is)
        if (I < 0).any():
            raise RuntimeError(f"faiss returned fewer than {k} results from {self.ntotal} items: "
                               "rebuild the index with `mmsearch index`")
        return np.asarray(D, np.float32), np.asarray(I, np.int64)

    def _rerank(self, q: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the candidates ``I`` (-1 = none) from the stored vectors; the best k."""
        valid = I >= 0
        safe = np.where(valid, I, I[valid][0] if valid.any() else 0)
        out_D = np.empty((len(q), k), np.float32)
        out_I = np.empty((len(q), k), np.int64)
        step = max(1, (64 << 20) // max(1, I.shape[1] * self.d * 4))  # ~64 MB of gathered vectors at a time
        for s in range(0, len(q), step):
            vecs = self._lookup.get(safe[s:s + step])
            scores = np.matmul(vecs, q[s:s + step, :, None])[..., 0]
            scores[~valid[s:s + step]] = -np.inf
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            out_D[s:s + step] = np.take_along_axis(scores, order, 1)
            out_I[s:s + step] = np.take_along_axis(I[s:s + step], order, 1)
        out_I[~np.isfinite(out_D)] = -1
        return out_D, out_I

    def _nlist(self) -> int:
        faiss = _faiss()

        return int(faiss.extract_index_ivf(self._index).nlist) if _is_ivf(self._index) else 0

    # ---- tuning ------------------------------------------------------------------------------------
    def tune(self, spec: IndexSpec = IndexSpec(), queries: np.ndarray | None = None, k: int = 10) -> dict:
        """Set the smallest nprobe (IVF) or efSearch (HNSW) reaching ``spec.target_recall`` recall@k
        against exact search; records the sweep in ``params["tuning"]``. A value given in ``spec``
        (nprobe / ef_search) is kept as it is, and only measured.
        """
        lookup = self._lookup
        if lookup is None:
            raise ValueError("tuning needs the stored vectors: attach() them first")
        n = self.ntotal
        rng = np.random.default_rng(spec.seed + 1)
        exclude_self = queries is None
        if queries is None:
            pick = np.sort(rng.choice(n, size=min(n, spec.tune_queries), replace=False))
            qids = self.ids()[pick]
            q = lookup.get(qids)
        else:
            q = _as_matrix(queries, "tuning queries")
            qids = None
        kk = min(k, n - 1 if exclude_self else n)
        if kk < 1:
            return {}
        # exact ground truth over the stored vectors, in blocks
        truth = exact_topk(q, lookup, kk + exclude_self)
        if exclude_self:
            truth = _drop_self(truth, qids, kk)

        def recall(**kw) -> float:
            _, I = self.search(q, kk + exclude_self, **kw)
            if exclude_self:
                I = _drop_self(I, qids, kk)
            return float(np.mean([len(np.intersect1d(a, b)) / kk for a, b in zip(I, truth)]))

        sweep = []
        if _is_ivf(self._index):
            nlist = self._nlist()
            candidates = [spec.nprobe] if spec.nprobe else sorted({min(nlist, 2 ** i) for i in range(0, 20)})
            # lossy codes: when even every list falls short, re-rank deeper (k x 2, 4, ... up to 64)
            factors = [int(self.params.get("rerank_factor", 1))]
            while self.reranks and factors[-1] < 64:
                factors.append(factors[-1] * 2)
            for f in factors:
                for p in candidates:
                    r = recall(nprobe=p, rerank_factor=f)
                    sweep.append({"nprobe": p, "recall": round(r, 4), **({"rerank_factor": f} if self.reranks else {})})
                    if r >= spec.target_recall:
                        break
                if sweep[-1]["recall"] >= spec.target_recall:
                    break
            self.params["nprobe"] = sweep[-1]["nprobe"]
            if self.reranks:
                self.params["rerank_factor"] = sweep[-1]["rerank_factor"]
        elif self.kind == "hnsw" or _hnsw(self._index) is not None:
            candidates = [spec.ef_search] if spec.ef_search else [16, 32, 64, 128, 256, 512, 1024, 2048]
            for ef in candidates:
                r = recall(ef_search=ef)
                sweep.append({"ef_search": ef, "recall": round(r, 4)})
                if r >= spec.target_recall:
                    break
            self.params["ef_search"] = sweep[-1]["ef_search"]
        else:
            sweep.append({"recall": round(recall(), 4)})
        self.params["tuning"] = {"target_recall": spec.target_recall, "k": kk, "queries": len(q),
                                 "queries_from": "stored vectors, own entry left out" if exclude_self else "given",
                                 "sweep": sweep, "recall": sweep[-1]["recall"],
                                 "reached": sweep[-1]["recall"] >= spec.target_recall}
        return self.params["tuning"]

    # ---- GPU ---------------------------------------------------------------------------------------
    def to_gpu(self) -> bool:
        """Search on the GPU from now on (when faiss-gpu sees a CUDA device); False if it stays on the CPU."""
        faiss = _faiss()

        if gpu_count() == 0 or self.kind == "hnsw":
            return False
        try:
            self._gpu_index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, self._index,
                                                     _gpu_cloner_options(self.params.get("m")))
        except RuntimeError:
            self._gpu_index = None
        return self._gpu_index is not None

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``)."""
        faiss = _faiss()

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
    def load(cls, path: str | os.PathLike[str], kind: str, params: dict[str, Any], mmap: bool = False,
             vectors: VectorLookup | None = None) -> "VectorIndex":
        """Read an index written by :meth:`save`; ``kind`` and ``params`` come from the manifest.

        ``mmap=True`` maps the file instead of reading it (the OS pages in what searches touch);
        such an index is read-only.
        """
        faiss = _faiss()

        path = Path(path)
        hint = "re-run `mmsearch index` to rebuild it"
        if not path.exists():
            raise IndexNotFoundError(f"index file {path} does not exist: {hint}")
        if not path.is_file():
            raise IndexFormatError(f"index file {path} is not a regular file: {hint}")
        if kind not in KINDS:
            raise IndexFormatError(f"index file {path} has unknown kind {kind!r}: {hint}")
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
        except (RuntimeError, OSError, MemoryError) as e:
            raise IndexFormatError(f"index file {path} is unreadable ({_faiss_message(e)}): {hint}") from None
        expected: dict[str, Callable[[Any], bool]] = {
            "flat": lambda ix: isinstance(ix, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(ix.index), faiss.IndexFlat),
            "hnsw": lambda ix: isinstance(ix, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(ix.index), faiss.IndexHNSW),
            "ivfflat": lambda ix: isinstance(ix, faiss.IndexIVFFlat),
            # format 1 wrote IVF-PQ as IdMap2(IndexRefineFlat(IVFPQ)); it still searches (faiss re-ranks)
            "ivfpq": lambda ix: isinstance(ix, faiss.IndexIVFPQ) or (
                isinstance(ix, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(ix.index), faiss.IndexRefine)),
            "factory": lambda ix: True,
        }
        if not expected[kind](index):
            raise IndexFormatError(f"index file {path} holds {type(index).__name__}, expected {kind}: {hint}")
        self = cls(index, kind, params, vectors)
        self.read_only = mmap
        if isinstance(index, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(index.index), faiss.IndexRefine):
            # the format-1 layout: searched through faiss's own refine step, rebuilt on the next update
            self.kind = "factory"
            faiss.downcast_index(index.index).k_factor = float(params.get("rerank_factor", 10))
            self.params.update(rerank_factor=1, legacy_refine=True)
        return self


def _is_ivf(index) -> bool:
    faiss = _faiss()

    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def _exact_scores(index) -> bool:
    """Whether ``index`` returns exact inner products (full float vectors, no transform)."""
    faiss = _faiss()

    inner = index
    while isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    return isinstance(inner, (faiss.IndexFlat, faiss.IndexIVFFlat))


def _hnsw(index):
    faiss = _faiss()

    inner = index
    while isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        inner = faiss.downcast_index(inner.index)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def _drop_self(I: np.ndarray, qids: np.ndarray, k: int) -> np.ndarray:
    """Each row of ``I`` without its query's own id, cut to ``k`` columns."""
    keep = I != qids[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(I, order, 1)


def exact_topk(q: np.ndarray, lookup: VectorLookup, k: int, block: int = 65536) -> np.ndarray:
    """Ids of the exact top-k stored vectors per query, best first (blocks of rows, so memory stays bounded)."""
    vectors, row_ids = lookup.vectors, lookup.row_ids()
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for s in range(0, len(vectors), block):
        scores = q @ np.asarray(vectors[s:s + block], np.float32).T
        ids = np.broadcast_to(row_ids[s:s + block], scores.shape)
        best_s = np.concatenate([best_s, scores], 1)
        best_i = np.concatenate([best_i, ids], 1)
        if best_s.shape[1] > k:
            top = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(best_s, top, 1), np.take_along_axis(best_i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)
