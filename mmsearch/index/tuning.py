"""Search settings tuned to a target recall: :func:`tune` measures an index against exact search and
returns a :class:`Tuning` record (the setting chosen, the recall it reached, the curve on the way)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsearch.config import IndexSpec

from ._checks import as_matrix
from .exact import exact_knn

if TYPE_CHECKING:
    from .vector_index import VectorIndex

#: efSearch values tried for HNSW, smallest first
EF_SEARCH_CHOICES = (16, 32, 64, 128, 256, 512, 1024, 2048)
#: lossy codes: when visiting more IVF lists stops paying, re-rank deeper, doubling up to this factor
MAX_RERANK_FACTOR = 64
#: doubling nprobe that raises recall@k by less than this has stopped paying
PLATEAU = 0.005


@dataclass(frozen=True)
class TuningPoint:
    """One setting measured: its recall@k, and the knob values (None: not a knob of this index)."""

    recall: float
    nprobe: int | None = None
    ef_search: int | None = None
    rerank_factor: int | None = None

    def to_json(self) -> dict[str, Any]:
        order = ("nprobe", "ef_search", "recall", "rerank_factor")  # as manifests have always listed them
        return {k: getattr(self, k) for k in order if getattr(self, k) is not None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TuningPoint":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class Tuning:
    """How the search setting of an index was chosen; the last point of ``sweep`` is the one kept."""

    target_recall: float  # recall@k wanted against exact search
    k: int
    queries: int  # how many queries were measured
    queries_from: str  # "given", or stored vectors with their own entry left out
    sweep: tuple[TuningPoint, ...]  # the settings tried, in order: the recall curve
    recall: float  # recall@k of the setting kept
    reached: bool  # whether it reached target_recall

    @property
    def chosen(self) -> TuningPoint:
        """The setting kept."""
        return self.sweep[-1]

    def to_json(self) -> dict[str, Any]:
        return {"target_recall": self.target_recall, "k": self.k, "queries": self.queries,
                "queries_from": self.queries_from, "sweep": [p.to_json() for p in self.sweep],
                "recall": self.recall, "reached": self.reached}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Tuning":
        return cls(d["target_recall"], d["k"], d["queries"], d["queries_from"],
                   tuple(TuningPoint.from_json(p) for p in d["sweep"]), d["recall"], d["reached"])


def drop_self(I: np.ndarray, qids: np.ndarray, k: int) -> np.ndarray:
    """Each row of ``I`` without its query's own id, cut to ``k`` columns."""
    keep = I != qids[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(I, order, 1)


class _Probe:
    """Recall@k of an index's search, at given settings, against the exact answer for fixed queries."""

    def __init__(self, index: "VectorIndex", q: np.ndarray, qids: np.ndarray | None, k: int) -> None:
        self.index, self.q, self.qids, self.k = index, q, qids, k
        self.truth = _truth(index.lookup, q, k + self.extra)
        if qids is not None:
            self.truth = drop_self(self.truth, qids, k)

    @property
    def extra(self) -> int:
        """Queries that are stored vectors find themselves first: one more result, dropped."""
        return int(self.qids is not None)

    def __call__(self, **settings) -> float:
        _, I = self.index.search(self.q, self.k + self.extra, **settings)
        if self.qids is not None:
            I = drop_self(I, self.qids, self.k)
        return float(np.mean([len(np.intersect1d(a, b)) / self.k for a, b in zip(I, self.truth)]))


def _truth(lookup, q: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top ``k`` stored vectors for each query: faiss's brute-force ``knn`` (BLAS and
    a heap, several times faster than :func:`exact_knn`'s blocks at a million vectors); numpy's for
    vectors faiss cannot read in place. Ties may fall either way, which recall does not notice."""
    from ._faiss import faiss_module

    vectors = lookup.vectors
    if not (isinstance(vectors, np.ndarray) and vectors.dtype == np.float32 and vectors.flags.c_contiguous):
        return exact_knn(q, vectors, k, lookup.row_ids())[1]
    _, rows = faiss_module().knn(np.ascontiguousarray(q, np.float32), vectors, min(k, len(vectors)),
                                 metric=faiss_module().METRIC_INNER_PRODUCT)
    return lookup.row_ids()[rows]


def _sweep_ivf(index: "VectorIndex", spec: IndexSpec, recall: _Probe) -> list[TuningPoint]:
    """A walk to the target: nprobe doubles while that still raises recall; once it stops paying
    (recall limited by the codes, not by the lists visited) re-ranking doubles instead, at that
    nprobe from then on. Stops at the first setting that reaches the target, or when neither can grow."""
    nlist = index.nlist
    probes = [spec.nprobe] if spec.nprobe else sorted({min(nlist, 2 ** i) for i in range(0, 20)})
    factor = int(index.config.rerank_factor or 1)
    sweep: list[TuningPoint] = []
    i, lists_paid = 0, True
    while True:
        r = recall(nprobe=probes[i], rerank_factor=factor)
        sweep.append(TuningPoint(round(r, 4), nprobe=probes[i], rerank_factor=factor if index.reranks else None))
        if r >= spec.target_recall:
            return sweep
        if lists_paid and len(sweep) > 1 and sweep[-2].rerank_factor == sweep[-1].rerank_factor:
            lists_paid = r - sweep[-2].recall >= PLATEAU
        deeper = index.reranks and factor < MAX_RERANK_FACTOR
        if i + 1 < len(probes) and (lists_paid or not deeper):
            i += 1
        elif deeper:
            factor *= 2
        else:
            return sweep


def _sweep_hnsw(spec: IndexSpec, recall: _Probe) -> list[TuningPoint]:
    sweep: list[TuningPoint] = []
    for ef in [spec.ef_search] if spec.ef_search else EF_SEARCH_CHOICES:
        r = recall(ef_search=ef)
        sweep.append(TuningPoint(round(r, 4), ef_search=ef))
        if r >= spec.target_recall:
            break
    return sweep


def tune(index: "VectorIndex", spec: IndexSpec = IndexSpec(), queries: np.ndarray | None = None,
         k: int = 10) -> Tuning | None:
    """The smallest nprobe (IVF) or efSearch (HNSW) reaching ``spec.target_recall`` recall@k against
    exact search over the index's stored vectors (a value given in ``spec`` is only measured); for
    other indexes, just their recall. Queries: ``queries``, else ``spec.tune_queries`` stored vectors
    drawn at random, each one's own entry left out of both result lists. None when there is nothing
    to measure (a single stored vector). The index is searched, not changed.
    """
    if index.lookup is None:
        raise ValueError("tuning needs the stored vectors: attach() them first")
    n = index.ntotal
    exclude_self = queries is None
    if exclude_self:
        rng = np.random.default_rng(spec.seed + 1)
        qids = index.ids()[np.sort(rng.choice(n, size=min(n, spec.tune_queries), replace=False))]
        q = index.lookup.get(qids)
    else:
        q, qids = as_matrix(queries, "tuning queries"), None
    kk = min(k, n - 1 if exclude_self else n)
    if kk < 1:
        return None
    recall = _Probe(index, q, qids, kk)
    if index.nlist:
        sweep = _sweep_ivf(index, spec, recall)
    elif index.is_hnsw:
        sweep = _sweep_hnsw(spec, recall)
    else:
        sweep = [TuningPoint(round(recall(), 4))]
    return Tuning(spec.target_recall, kk, len(q), "stored vectors, own entry left out" if exclude_self else "given",
                  tuple(sweep), sweep[-1].recall, sweep[-1].recall >= spec.target_recall)
