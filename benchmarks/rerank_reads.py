"""How exact re-ranking should read candidates from the memory-mapped embeddings (issue 19).

Three ways to score the same candidates, on a seeded 1M x 256 float32 file memory-mapped from a
temporary folder (in the page cache after the first pass, as a served index's embeddings are):
- ``fused``: ``VectorLookup.scores`` (what ``VectorIndex._rerank`` does): faiss's threaded kernel
  reads each candidate where it is and scores it in the same pass;
- ``in place``: numpy gathers each query's candidates where they are (``VectorLookup.get``), then
  scores them (what re-ranking did before the fused kernel);
- ``sorted once``: the block's distinct candidate rows sorted and read once by numpy, then spread
  back to the queries.
Best of 3 per depth (candidates per query = k x re-rank factor, k = 10), 200 queries a block.

    python benchmarks/rerank_reads.py

Writes benchmarks/results/rerank_reads.json.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsearch.index import VectorLookup  # noqa: E402

N, D, QUERIES = 1_000_000, 256, 200
DEPTHS = (40, 80, 160, 320, 640, 1280)


def best_ms(fn, repeats: int = 3) -> float:
    out = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return round(1000 * out, 2)


def fused(lookup: VectorLookup, I: np.ndarray, q: np.ndarray) -> np.ndarray:
    return lookup.scores(q, I)


def in_place(lookup: VectorLookup, I: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.einsum("qcd,qd->qc", lookup.get(I), q)


def sorted_once(lookup: VectorLookup, I: np.ndarray, q: np.ndarray) -> np.ndarray:
    unique, where = np.unique(lookup.rows(I.ravel()), return_inverse=True)
    vecs = np.asarray(np.take(lookup.vectors, unique, axis=0), np.float32)
    return np.einsum("qcd,qd->qc", vecs[where.reshape(I.shape)], q)


def main() -> None:
    import faiss

    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "embeddings.npy"
        np.save(path, rng.standard_normal((N, D), dtype=np.float32))
        lookup = VectorLookup(np.load(path, mmap_mode="r"), np.arange(N, dtype=np.int64))
        q = rng.standard_normal((QUERIES, D), dtype=np.float32)
        for depth in DEPTHS:
            I = rng.integers(0, N, (QUERIES, depth))
            if not (np.allclose(in_place(lookup, I, q), sorted_once(lookup, I, q), atol=1e-4)
                    and np.allclose(in_place(lookup, I, q), fused(lookup, I, q), atol=1e-4)):
                raise SystemExit("the reads disagree")
            a, b = best_ms(lambda: in_place(lookup, I, q)), best_ms(lambda: sorted_once(lookup, I, q))
            c = best_ms(lambda: fused(lookup, I, q))
            rows.append({"candidates_per_query": depth, "in_place_ms": a, "sorted_once_ms": b, "fused_ms": c,
                         "sorted_vs_in_place": round(b / a, 2), "in_place_vs_fused": round(a / c, 2)})
            print(rows[-1], flush=True)
    record = {"what": f"re-rank reads of {QUERIES} queries' candidates from a memory-mapped {N:,} x {D} float32 "
                      "file in the page cache, best of 3", "command": "python benchmarks/rerank_reads.py",
              "rows": rows, "machine": f"{platform.machine()}, numpy {np.__version__}, faiss {faiss.__version__} "
                                    f"({faiss.omp_get_max_threads()} OpenMP threads)"}
    (ROOT / "benchmarks" / "results" / "rerank_reads.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
