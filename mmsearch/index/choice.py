"""Which IVF-PQ codes an automatic index uses, chosen by measurement: :func:`choose_codes`.

The candidates hold the same or fewer bytes per vector: faiss's 8-bit ``PQ{m}``, 4-bit fast-scan
codes with twice the sub-quantizers (``PQ{2m}x4fsr``, scanned with SIMD from registers) and with
as many (``PQ{m}x4fsr``, half the memory). Each is built on a seeded sample of the collection
(lists scaled to keep the points per list), tuned to the target recall like the real index, and
timed on a batch of held-out stored vectors; the cheapest one that reaches the target within the
memory budget wins (none reaching it: the most accurate). The trials are kept in the manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsearch.config import IndexSpec

from .plan import ID_BYTES, IndexPlan, plan_index, ram_per_vector

if TYPE_CHECKING:
    from .vector_index import VectorIndex

#: held-out stored vectors each candidate is timed on (batched)
TIMING_QUERIES = 500
#: stored vectors each candidate is tuned on (the full index is tuned on ``IndexSpec.tune_queries``)
TUNING_QUERIES = 200


@dataclass(frozen=True)
class Trial:
    """One candidate measured on the sample."""

    codes: str  # the faiss PQ layout ("PQ64", "PQ128x4fsr")
    bytes_per_vector: int  # codes + id, in RAM
    recall: float  # recall@k of its tuned setting on the sample
    reached: bool
    nprobe: int | None
    rerank_factor: int | None
    ms_per_query: float  # batched search time per query at that setting
    build_seconds: float  # train + add + tune on the sample

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Trial":
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Choice:
    """How the codes of an automatic IVF-PQ index were chosen."""

    sample: int  # stored vectors the candidates were built on
    trials: tuple[Trial, ...]
    chosen: str
    seconds: float  # the whole choice

    def to_json(self) -> dict[str, Any]:
        return {"sample": self.sample, "trials": [t.to_json() for t in self.trials], "chosen": self.chosen,
                "seconds": self.seconds}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Choice":
        return cls(d["sample"], tuple(Trial.from_json(t) for t in d["trials"]), d["chosen"], d["seconds"])

    def summary(self) -> str:
        """One line for `mmsearch info`."""
        tried = ", ".join(f"{t.codes} recall {t.recall:.3f} {t.ms_per_query:.3f} ms/query" for t in self.trials)
        return f"{self.chosen}, by measurement on {self.sample} vectors ({tried}; {self.seconds:.1f} s)"


def candidates(d: int, m: int) -> list[tuple[str, int, int]]:
    """(codes, sub-quantizers, bits) of the layouts tried for an index planned with PQ ``m`` x 8 bits."""
    out = [(f"PQ{m}", m, 8)]
    if d % (2 * m) == 0:
        out.append((f"PQ{2 * m}x4fsr", 2 * m, 4))
    if m % 2 == 0:
        out.append((f"PQ{m}x4fsr", m, 4))
    return out


def _sample_plan(plan: IndexPlan, n_sample: int, d: int, spec: IndexSpec, m: int, nbits: int) -> IndexPlan:
    """The plan for the sample: as many points per list as the full index, the candidate's codes."""
    nlist = max(1, round(plan.nlist * n_sample / plan.n_trained))
    p = plan_index(n_sample, d, replace(spec, index_type="ivfpq", nlist=nlist, pq_m=m, memory=None, choose_sample=0))
    return replace(p, nbits=nbits if n_sample >= 2 ** nbits else p.nbits,
                   codes=f"PQ{m}x4fsr" if nbits == 4 else None)


def _time_queries(index: "VectorIndex", q: np.ndarray, k: int) -> float:
    """Best of two batched searches at the tuned setting, in ms per query."""
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        index.search(q, k)
        best = min(best, time.perf_counter() - t)
    return 1000 * best / len(q)


def choose_codes(cls: type["VectorIndex"], x: np.ndarray, plan: IndexPlan, spec: IndexSpec) -> tuple[IndexPlan, Choice]:
    """The plan with the codes that measured cheapest on a sample of ``x`` (see the module)."""
    t0 = time.perf_counter()
    n, d = x.shape
    rng = np.random.default_rng(spec.seed + 2)
    rows = np.sort(rng.choice(n, size=min(n, spec.choose_sample), replace=False))
    sample, ids = np.ascontiguousarray(x[rows]), np.arange(len(rows), dtype=np.int64)
    q = sample[rng.choice(len(sample), size=min(len(sample), TIMING_QUERIES), replace=False)]
    trials, sample_spec = [], replace(spec, tune_queries=min(spec.tune_queries, TUNING_QUERIES))
    for codes, m, nbits in candidates(d, plan.m):
        t = time.perf_counter()
        index = cls._from_plan(sample, ids, _sample_plan(plan, len(sample), d, spec, m, nbits), sample_spec)
        tuning, built = index.config.tuning, time.perf_counter() - t
        trials.append(Trial(codes, m * nbits // 8 + ID_BYTES, tuning.recall if tuning else 0.0,
                            bool(tuning and tuning.reached), index.config.nprobe, index.config.rerank_factor,
                            round(_time_queries(index, q, tuning.k if tuning else 10), 4), round(built, 2)))
    fits = [t for t in trials if n * t.bytes_per_vector <= plan.memory_budget] or trials
    reached = [t for t in fits if t.reached]
    best = min(reached, key=lambda t: t.ms_per_query) if reached else max(fits, key=lambda t: t.recall)
    m, nbits = next((m, b) for c, m, b in candidates(d, plan.m) if c == best.codes)
    chosen = replace(plan, m=m, nbits=nbits, codes=best.codes if nbits == 4 else None,
                     reason=f"{plan.reason}; codes {best.codes} measured cheapest on a sample",
                     ram_bytes_estimate=n * ram_per_vector("ivfpq", d, m, nbits=nbits))
    return chosen, Choice(len(sample), tuple(trials), best.codes, round(time.perf_counter() - t0, 2))
