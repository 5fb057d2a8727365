"""Faiss at scale: exact Flat, HNSW, IVF-Flat and our automatic IVF-PQ (+ exact re-rank), side by side.

For each dataset and index kind, through mmsearch's own VectorIndex (so re-ranking and tuning are
what users get): build time (train + add; the recall tuning separately), bytes per vector on disk
and in RAM (resident-set growth when a fresh process loads the saved file; memory-mapped load too),
queries per second one query at a time and batched, and recall@1/10 against exact search on
held-out queries, over an nprobe / efSearch sweep (the recall-QPS curve). The setting the build
tuned itself (target recall@10 0.95 on stored vectors, own entry left out) is marked.

Datasets (d = 256, the dimension of the default model):
- ``real``: Flickr8k train+dev photos and captions embedded by the default model (42,000 vectors);
  queries: the test split's 5,000 captions (text->image queries, never indexed, never tuned on).
- ``synth-100k`` / ``synth-1m``: seeded synthetic vectors anchored on the real ones: a random real
  embedding plus Gaussian noise shaped like the real embeddings' covariance (x0.5), re-normalised;
  queries: fresh draws from the same generator.

    python benchmarks/index_scale.py [--sizes 100000 1000000] [--queries 1000] [--no-real]

Clustered sets (issue 19): ``--clustered 2000 20000`` adds 1M-vector sets of that many tight
Gaussian clusters with mixed spreads, measured with ``--clustered-methods`` (``opq`` and ``hnswq``:
the forced factory strings of the candidates the automatic choice leaves out; default: flat and
``auto``, the index `mmsearch index` builds, its codes chosen by measurement). The record of those:

    python benchmarks/index_scale.py --no-real --sizes --clustered 2000 20000 \
        --clustered-methods flat auto opq hnswq --out benchmarks/results/index_scale_clustered.json

Writes benchmarks/results/index_scale.json and benchmarks/results/index_scale.png (with matplotlib,
the `bench` extra). Real embeddings are cached in .cache/bench/, keyed by the model's weights fingerprint and precision
(computed once per weights; the slow part of a first run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsearch.config import DEFAULT_MODEL, IndexSpec  # noqa: E402
from mmsearch.index import VectorIndex, VectorLookup, exact_topk  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / ".cache" / "bench"

#: batched QPS is the best of this many passes over the queries
BATCH_PASSES = 3

METHODS = {
    # name: (IndexSpec, knob swept, values)
    "flat": (IndexSpec(index_type="flat"), None, [None]),
    "hnsw": (IndexSpec(index_type="hnsw"), "ef_search", [16, 32, 64, 128, 256, 512]),
    "ivfflat": (IndexSpec(index_type="ivfflat"), "nprobe", [1, 2, 4, 8, 16, 32, 64, 128, 256]),
    "ivfpq": (IndexSpec(index_type="ivfpq"), "nprobe", [1, 2, 4, 8, 16, 32, 64, 128, 256]),
    # what `mmsearch index` builds: at 1M, IVF-PQ with its codes chosen by measurement
    "auto": (IndexSpec(), "nprobe", [1, 2, 4, 8, 16, 32, 64, 128, 256]),
    # candidates the automatic choice leaves out, measured beside it (forced factory strings, tuned and
    # re-ranked the same way): an OPQ rotation, and an HNSW coarse quantizer
    "opq": (IndexSpec(factory="OPQ64,IVF4096,PQ64x4fsr"), "nprobe", [1, 2, 4, 8, 16, 32, 64, 128, 256]),
    "hnswq": (IndexSpec(factory="IVF4096_HNSW32,PQ64x4fsr"), "nprobe", [1, 2, 4, 8, 16, 32, 64, 128, 256]),
}


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def real_embeddings(data: Path, model: str) -> tuple[np.ndarray, np.ndarray]:
    """(base, queries): train+dev photos and captions; test captions as queries. Cached per model, weights
    fingerprint and precision, so a run after the weights (or the default precision) change embeds again."""
    from mmsearch.weights import default_precision, fingerprint

    weights = fingerprint(model)
    precision = default_precision(model, weights)
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"flickr8k_{model.replace('/', '_')}_{weights or 'unversioned'}_{precision}.npz"
    if path.is_file():
        z = np.load(path)
        return z["base"], z["queries"]
    from mmsearch._util import atomic_file
    from mmsearch.data import load_flickr8k
    from mmsearch.encoder import get_encoder

    enc = get_encoder(model, precision=precision)
    parts = []
    for split in ("train", "dev"):
        pairs = load_flickr8k(data, split)
        parts.append(enc.embed_images(list(pairs.images), batch_size=32))
        parts.append(enc.embed_texts(pairs.flat()[0]))
    test = load_flickr8k(data, "test")
    base, queries = np.concatenate(parts), enc.embed_texts(test.flat()[0])
    with atomic_file(path) as f:
        np.savez(f, base=base, queries=queries)
    return base, queries


def synthetic(real: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n vectors: a random real embedding + 0.5 x noise with the real covariance, normalised."""
    rng = np.random.default_rng(seed)
    centred = real - real.mean(0)
    cov = centred.T @ centred / len(real)
    w, v = np.linalg.eigh(cov)
    shape = (v * np.sqrt(np.clip(w, 0, None))).T.astype(np.float32)  # noise = g @ shape has covariance cov
    out = np.empty((n, real.shape[1]), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        anchors = real[rng.integers(0, len(real), m)]
        out[s:s + m] = normalise(anchors + 0.5 * rng.standard_normal((m, real.shape[1])).astype(np.float32) @ shape)
    return out


def clustered(n: int, clusters: int, d: int, seed: int) -> np.ndarray:
    """n unit vectors from ``clusters`` tight Gaussian clusters with mixed spreads: random centres,
    each cluster's spread log-uniform in 0.05-0.5 (so cosine to the centre ~0.999 down to ~0.9),
    like bursts of video frames and near-duplicate photos. Seeded; queries are further draws."""
    rng = np.random.default_rng(seed)
    centres = normalise(rng.standard_normal((clusters, d)).astype(np.float32))
    spread = np.exp(rng.uniform(np.log(0.05), np.log(0.5), clusters)).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        label = rng.integers(0, clusters, min(100_000, n - s))
        noise = rng.standard_normal((len(label), d)).astype(np.float32)
        out[s:s + len(label)] = normalise(centres[label] + spread[label, None] / np.sqrt(d) * noise)
    return out


def recall(I: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(np.intersect1d(a[:k], b[:k])) / k for a, b in zip(I, truth)]))


def ram_bytes(path: Path, kind: str, params: dict, mmap: bool) -> int:
    """Resident-set growth of a fresh process loading the saved index (imports warmed up first)."""
    code = ("import sys, json; from mmsearch.index import VectorIndex\n"
            "def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
            "import faiss, numpy\n"
            "r0 = rss(); ix = VectorIndex.load(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), mmap=sys.argv[4] == '1')\n"
            "print(rss() - r0)")
    out = subprocess.run([sys.executable, "-c", code, str(path), kind, json.dumps(params), "1" if mmap else "0"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])


def qps(index: VectorIndex, q: np.ndarray, k: int, single: int, **kw) -> tuple[float, float, np.ndarray]:
    """(single-query QPS, batched QPS: the best of BATCH_PASSES passes over ``q``, ids of the batched run)."""
    index.search(q[:8], k, **kw)  # warm up
    t = time.perf_counter()
    for row in q[:single]:
        index.search(row[None, :], k, **kw)
    single_qps = single / (time.perf_counter() - t)
    best = float("inf")
    for _ in range(BATCH_PASSES):  # a batch takes 0.1-2 s: one pass is at the mercy of a busy moment
        t = time.perf_counter()
        _, I = index.search(q, k, **kw)
        best = min(best, time.perf_counter() - t)
    return single_qps, len(q) / best, I


def run_dataset(name: str, base: np.ndarray, queries: np.ndarray, methods: list[str], args) -> dict:
    n, d = base.shape
    ids = np.arange(n, dtype=np.int64)
    lookup = VectorLookup(base, ids)
    t = time.perf_counter()
    truth = exact_topk(queries, lookup, 10)
    print(f"[{name}] {n} x {d}, {len(queries)} queries; exact ground truth in {time.perf_counter() - t:.1f}s", flush=True)
    out = {"n": n, "d": d, "n_queries": len(queries), "methods": {}}
    for method in methods:
        spec, knob, values = METHODS[method]
        if method == "hnsw" and n > args.hnsw_max:
            print(f"[{name}] hnsw skipped: n > --hnsw-max {args.hnsw_max}", flush=True)
            continue
        t = time.perf_counter()
        index = VectorIndex.build(base, ids, spec)
        build_total = time.perf_counter() - t
        secs = index.params["build_seconds"]
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            path = Path(tmp) / "index.faiss"
            index.save(path)
            disk = path.stat().st_size
            ram = ram_bytes(path, index.kind, index.params, mmap=False)
            ram_mmap = ram_bytes(path, index.kind, index.params, mmap=True)
        tuned = index.params.get(knob) if knob else None
        sweep_values = sorted(set(v for v in values if v is not None and (knob != "nprobe" or v <= index.nlist))
                              | ({tuned} if tuned else set())) or [None]
        curve = []
        for v in sweep_values:
            kw = {knob: v} if knob else {}
            s_qps, b_qps, I = qps(index, queries, 10, args.single, **kw)
            row = {knob or "setting": v, "recall@1": round(recall(I, truth, 1), 4), "recall@10": round(recall(I, truth, 10), 4),
                   "qps_single": round(s_qps, 1), "qps_batched": round(b_qps, 1), "tuned": knob is not None and v == tuned}
            if method == "ivfpq":
                _, b2, I2 = qps(index, queries, 10, 0, rerank_factor=1, **kw)
                row["no_rerank"] = {"recall@10": round(recall(I2, truth, 10), 4), "qps_batched": round(b2, 1)}
            curve.append(row)
            print(f"[{name}] {method} {knob}={v}: R@10 {row['recall@10']:.3f} R@1 {row['recall@1']:.3f} "
                  f"single {s_qps:.0f} q/s batched {b_qps:.0f} q/s", flush=True)
        choice = index.params.get("choice")
        secs = {**secs, "tune": round(secs["tune"] + (choice["seconds"] if choice else 0.0), 3)}  # choosing is tuning
        out["methods"][method] = {
            "params": {k: v for k, v in index.params.items() if k not in ("tuning",)},
            "choice": choice,
            "tuning": index.params.get("tuning"),
            "build_seconds": round(build_total - secs["tune"], 2), "tune_seconds": secs["tune"],
            "disk_bytes_per_vector": round(disk / n, 1),
            "ram_bytes_per_vector": round(ram / n, 1), "ram_bytes_per_vector_mmap": round(ram_mmap / n, 1),
            "rerank_store": ("float32 embeddings, memory-mapped from the index folder (4*d bytes/vector on disk, "
                             "only candidates' pages read)") if index.reranks else None,
            "curve": curve,
        }
        del index
    flat = out["methods"].get("flat")
    pq = out["methods"].get("auto") or out["methods"].get("ivfpq")
    if flat and pq:
        at = next(r for r in pq["curve"] if r["tuned"])
        fb = flat["curve"][0]["qps_batched"]
        out["targets"] = {
            "ivfpq_tuned": {"nprobe": at["nprobe"], "recall@10": at["recall@10"]},
            "recall@10 >= 0.95": at["recall@10"] >= 0.95,
            "batched qps vs flat": round(at["qps_batched"] / fb, 1),
            ">= 20x flat batched qps": at["qps_batched"] >= 20 * fb,
            "ram per vector vs flat": round(pq["ram_bytes_per_vector"] / flat["ram_bytes_per_vector"], 4),
            "<= 1/8 of flat ram": pq["ram_bytes_per_vector"] <= flat["ram_bytes_per_vector"] / 8,
            "tuning share of build": round(pq["tune_seconds"] / (pq["build_seconds"] + pq["tune_seconds"]), 3),
            "<= 25% tuning": pq["tune_seconds"] <= 0.25 * (pq["build_seconds"] + pq["tune_seconds"]),
        }
    return out


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        ds = results["datasets"][name]
        for method, m in ds["methods"].items():
            xs = [r["recall@10"] for r in m["curve"]]
            ys = [r["qps_batched"] for r in m["curve"]]
            ax.plot(xs, ys, "o-" if len(xs) > 1 else "s", label=method, markersize=4)
            for r in m["curve"]:
                if r["tuned"]:
                    ax.plot([r["recall@10"]], [r["qps_batched"]], "k*", markersize=11)
        ax.set_xscale("linear")
        ax.set_yscale("log")
        ax.set_xlabel("recall@10 vs exact")
        ax.set_ylabel("queries/s (batched)")
        ax.set_title(f"{name}: {ds['n']:,} x {ds['d']}")
        ax.axvline(0.95, color="grey", lw=0.8, ls="--")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"mmsearch index kinds, {results['machine']}; * = setting tuned at build", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])  # synthetic dataset sizes
    ap.add_argument("--queries", type=int, default=1000, help="held-out queries per synthetic dataset")
    ap.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--methods", nargs="*", default=["flat", "hnsw", "ivfflat", "ivfpq"])
    ap.add_argument("--hnsw-max", type=int, default=10**7, help="skip HNSW above this many vectors")
    ap.add_argument("--no-real", action="store_true", help="skip the real-embeddings dataset")
    ap.add_argument("--clustered", type=int, nargs="*", default=[], help="cluster counts of clustered sets to add")
    ap.add_argument("--clustered-n", type=int, default=1_000_000, help="vectors in each clustered set")
    ap.add_argument("--clustered-methods", nargs="*", default=["flat", "auto"])
    ap.add_argument("--out", default=str(RESULTS / "index_scale.json"))
    args = ap.parse_args()

    import faiss

    CACHE.mkdir(parents=True, exist_ok=True)
    real, real_q = real_embeddings(Path(args.data), args.model)
    results = {
        "what": "faiss index kinds through mmsearch.index.VectorIndex: build, memory, QPS, recall vs exact",
        "command": "python benchmarks/index_scale.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "machine": f"{platform.machine()} {os.cpu_count()} threads, faiss {faiss.__version__} "
                   f"({faiss.omp_get_max_threads()} OpenMP threads), no GPU" if not faiss.get_num_gpus()
                   else f"{faiss.get_num_gpus()} GPU(s)",
        "batched_passes": BATCH_PASSES,  # batched QPS: the best of this many passes
        "datasets": {},
    }
    if not args.no_real:
        results["datasets"]["real"] = run_dataset("real", real, real_q, args.methods, args)
        results["datasets"]["real"]["source"] = ("Flickr8k train+dev photos and captions embedded by the default "
                                                 "model; queries: test captions")
    for i, n in enumerate(args.sizes):
        name = f"synth-{n // 1000}k" if n < 10**6 else f"synth-{n // 10**6}m"
        base = synthetic(real, n, seed=100 + i)
        q = synthetic(real, args.queries, seed=200 + i)
        results["datasets"][name] = run_dataset(name, base, q, args.methods, args)
        results["datasets"][name]["source"] = "real embedding + 0.5 x real-covariance Gaussian noise, normalised (seeded)"
        del base
    for i, clusters in enumerate(args.clustered):
        n = args.clustered_n
        x = clustered(n + args.queries, clusters, real.shape[1], seed=300 + i)
        name = f"clustered-{clusters // 1000}k-{n // 10**6}m" if n >= 10**6 else f"clustered-{clusters}-{n // 1000}k"
        results["datasets"][name] = run_dataset(name, x[args.queries:], x[:args.queries], args.clustered_methods, args)
        results["datasets"][name]["source"] = (f"{clusters} tight Gaussian clusters, spreads log-uniform 0.05-0.5 "
                                               "(seeded); queries: further draws from the same clusters")
        del x
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    png = out.with_suffix(".png")
    print(f"wrote {out}" + (f" and {png}" if plot(results, png) else " (no plot: pip install matplotlib)"))


if __name__ == "__main__":
    main()
