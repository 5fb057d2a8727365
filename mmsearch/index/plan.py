"""What index to build for N vectors of dimension d, and why: :func:`plan_index` -> :class:`IndexPlan`.

Arithmetic on N, d and the :class:`IndexSpec` only (no faiss): a bad spec fails before any embedding.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from typing import Any

from mmsearch.config import DEFAULT_INDEX_MEMORY, IndexSpec
from mmsearch.errors import BadArgumentError

KINDS = ("flat", "hnsw", "ivfflat", "ivfpq", "factory")
INDEX_TYPES = ("auto",) + KINDS[:-1]
#: PQ sub-quantizer counts tried, largest first (all of them valid for GpuIndexIVFPQ; 64 needs fp16 tables)
PQ_M_CHOICES = (64, 48, 32, 24, 16, 8, 4, 2, 1)
#: faiss k-means wants at least this many training points per centroid
MIN_POINTS_PER_CENTROID = 39
#: RAM faiss needs per vector besides the codes: the 8-byte id (plus list/graph bookkeeping)
ID_BYTES = 8


def parse_size(text: str | int | None) -> int | None:
    """``"4G"``, ``"512M"``, ``"1.5GiB"``, ``"2000000000"`` -> bytes (None stays None)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise BadArgumentError(f"memory budget {text!r} is not a size: use e.g. 512M, 4G or 1.5G")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def ram_per_vector(kind: str, d: int, m: int = 0, hnsw_m: int = 32, nbits: int = 8) -> int:
    """Bytes of RAM one vector costs in an index of ``kind`` (codes + id + structure), for budgeting."""
    if kind in ("flat", "ivfflat"):
        return 4 * d + ID_BYTES
    if kind == "hnsw":
        return 4 * d + ID_BYTES + 2 * hnsw_m * 4 + 8  # vectors, id map, links on level 0 (2M ints) and levels
    if kind == "ivfpq":
        return m * nbits // 8 + ID_BYTES
    raise ValueError(f"no memory model for index kind {kind!r}")


@dataclass(frozen=True)
class IndexPlan:
    """What to build and why. A field left None does not apply to the kind (or, in a plan read from
    an older manifest, was not recorded); :meth:`to_json` leaves it out, as manifests always have."""

    kind: str | None = None  # one of KINDS (None only in a plan read from a format-1 manifest)
    reason: str | None = None  # why this kind, in words (``mmsearch info`` shows it)
    memory_budget: int | None = None  # bytes the index may take
    n_trained: int | None = None  # vectors the plan was made for (IVF: the quantizer trained on a sample of them)
    factory: str | None = None  # the faiss index_factory string of a "factory" plan
    nlist: int | None = None  # IVF lists
    n_train: int | None = None  # vectors k-means trains on
    m: int | None = None  # PQ sub-quantizers
    nbits: int | None = None  # bits per PQ code
    codes: str | None = None  # faiss layout of the codes when not plain PQ{m} (e.g. "PQ128x4fsr": 4-bit fast-scan)
    rerank_factor: int | None = None  # lossy codes: candidates re-ranked exactly, as a multiple of k
    hnsw_m: int | None = None  # HNSW graph degree
    ram_bytes_estimate: int | None = None  # what the index should take in RAM

    # The manifest's key order, as plans have always been written (a dict filled in this order). A
    # factory's n_train is only known once faiss has parsed the string, so it came last there.
    _ORDER = ("memory_budget", "n_trained", "kind", "factory", "reason", "nlist", "n_train", "m", "nbits",
              "codes", "rerank_factor", "hnsw_m", "ram_bytes_estimate")

    def to_json(self) -> dict[str, Any]:
        """The plan as the manifest stores it (``index.params``), byte for byte as it always was."""
        order = list(self._ORDER)
        if self.kind == "factory":
            order.remove("n_train")
            order.append("n_train")
        return {k: getattr(self, k) for k in order if getattr(self, k) is not None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "IndexPlan":
        """The plan part of a manifest's ``index.params`` (other keys are ignored)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def _nlist_for(n: int, spec: IndexSpec) -> int:
    cap = max(1, n // MIN_POINTS_PER_CENTROID)  # every list trains on >= 39 points
    nlist = spec.nlist or 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return max(1, min(int(nlist), cap))


def _check_spec(n: int, d: int, spec: IndexSpec) -> int:
    """The memory budget in bytes, or ValueError for settings no index can have."""
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
    return budget


def _choose_kind(n: int, d: int, spec: IndexSpec, budget: int) -> tuple[str, str]:
    """(kind, reason): a forced factory string or index type, else the size and budget rules."""
    if spec.factory:
        return "factory", "forced factory string"
    if spec.index_type != "auto":
        return spec.index_type, f"forced index type {spec.index_type}"
    if n <= spec.flat_max and n * ram_per_vector("flat", d) <= budget:
        return "flat", f"{n} <= flat_max {spec.flat_max} vectors: exact search"
    full = n * ram_per_vector("ivfflat", d)
    if n < spec.ivfflat_max and full <= budget:
        return "ivfflat", (f"{n} vectors < {spec.ivfflat_max} and full vectors ({fmt_bytes(full)}) "
                           f"fit the budget {fmt_bytes(budget)}")
    return "ivfpq", f"{n} vectors: compressed codes to fit the budget {fmt_bytes(budget)}"


def _pq_m(n: int, d: int, spec: IndexSpec, budget: int) -> int:
    """PQ sub-quantizers: the forced ``spec.pq_m``, else the largest choice dividing d that fits the budget."""
    if spec.pq_m is not None:
        if spec.pq_m < 1 or d % spec.pq_m:
            raise BadArgumentError(f"pq_m={spec.pq_m} does not divide the vector dimension {d}: pick a divisor of {d}")
        return spec.pq_m
    fits = [c for c in PQ_M_CHOICES if d % c == 0 and n * ram_per_vector("ivfpq", d, c) <= budget]
    if not fits:
        need = n * ram_per_vector("ivfpq", d, min(c for c in PQ_M_CHOICES if d % c == 0))
        raise BadArgumentError(f"memory budget {fmt_bytes(budget)} is too small for {n} vectors "
                               f"(the smallest IVF-PQ needs about {fmt_bytes(need)}): raise --memory")
    return fits[0]


def plan_index(n: int, d: int, spec: IndexSpec = IndexSpec()) -> IndexPlan:
    """What to build for ``n`` vectors of dimension ``d``: kind, parameters and why.

    ``auto`` (rules distilled from autofaiss): exact ``flat`` up to ``spec.flat_max`` vectors, then
    ``ivfflat`` below ``spec.ivfflat_max`` vectors while full vectors fit the memory budget, then
    ``ivfpq`` with the largest PQ m (of 64/48/32/24/16/8 dividing d) that fits the budget. ``nlist`` is
    2**round(log2(4*sqrt(N))); k-means trains on at most ``spec.train_per_list`` points per list.
    A forced ``spec.factory`` string or ``spec.index_type`` wins over the rules.
    """
    budget = _check_spec(n, d, spec)
    kind, reason = _choose_kind(n, d, spec, budget)
    plan = IndexPlan(kind=kind, reason=reason, memory_budget=budget, n_trained=n,
                     factory=spec.factory.strip() if kind == "factory" else None)
    if kind in ("ivfflat", "ivfpq"):
        nlist = _nlist_for(n, spec)
        plan = replace(plan, nlist=nlist,
                       n_train=min(n, max(MIN_POINTS_PER_CENTROID * nlist, spec.train_per_list * nlist)))
    if kind == "ivfpq":
        nbits = 8 if n >= 256 else max(1, int(n).bit_length() - 1)  # PQ k-means needs >= 2**nbits points
        plan = replace(plan, m=_pq_m(n, d, spec, budget), nbits=nbits,
                       n_train=max(plan.n_train, min(n, 2 ** nbits * MIN_POINTS_PER_CENTROID)))
    if kind in ("ivfpq", "factory"):
        plan = replace(plan, rerank_factor=int(spec.rerank_factor))
    if kind == "hnsw":
        plan = replace(plan, hnsw_m=int(spec.hnsw_m))
    if kind not in ("factory", "flat"):
        plan = replace(plan, ram_bytes_estimate=n * ram_per_vector(kind, d, plan.m or 0, spec.hnsw_m))
    return plan
