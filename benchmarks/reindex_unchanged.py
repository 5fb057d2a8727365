"""`mmsearch index` on a folder where nothing changed, over an index of 1M items: time and peak memory.

The index is synthetic but real in every other way: ``--videos`` video files on disk (never decoded,
since nothing changed), each indexed as ``--items / --videos`` sampled frames with random unit vectors,
written through ``mmsearch.store.commit`` in the current format with an exact faiss index, a
manifest naming the default model, its query bank and the default video sampling, like an index
that ``mmsearch index`` built. Then ``mmsearch index FOLDER --index IDX -q`` runs ``--repeats`` times,
each in a fresh process; the record holds each run's wall time and peak resident memory (the
child's ru_maxrss), and checks that no run wrote a new generation.

    python benchmarks/reindex_unchanged.py [--items 1000000] [--videos 1000] [--repeats 5]

Writes benchmarks/results/reindex_unchanged.json. Needs about 2.5 GB of disk in --workdir and
about 3 GB of RAM while building the index.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SECONDS, TARGET_MB = 2.0, 300  # issue 14


def make_index(work: Path, n_items: int, n_videos: int, dim: int = 256) -> tuple[Path, Path]:
    """A folder of ``n_videos`` video files and an index of ``n_items`` frames of them."""
    from mmsearch.config import DEFAULT_MODEL, IndexSpec, ModelRef
    from mmsearch.index import VectorIndex
    from mmsearch.manifest import IndexedModel, Manifest, Sampling, normalise_spec
    from mmsearch.store import Items, commit, write_lock
    from mmsearch.weights import default_precision, load_query_bank, model_record

    folder, idx = work / "videos", work / "index"
    folder.mkdir()
    rng = np.random.default_rng(0)
    per = n_items // n_videos
    paths, sizes, mtimes = [], [], []
    for v in range(n_videos):
        p = folder / f"clip-{v:05d}.mp4"
        p.write_bytes(rng.bytes(64))  # only listed and stat'ed: nothing changed, so nothing is decoded
        st = p.stat()
        paths.append(str(p))
        sizes.append(st.st_size)
        mtimes.append(st.st_mtime_ns)
    n = per * n_videos
    video = np.repeat(np.arange(n_videos), per)
    items = Items(np.arange(n, dtype=np.int64), [paths[v] for v in video], np.asarray(sizes, np.int64)[video],
                  np.asarray(mtimes, np.int64)[video], ["video"] * n, None,
                  np.tile(np.arange(per, dtype=np.float64), n_videos), rng.random(n, dtype=np.float32),
                  shot=np.zeros(n, np.int32), shot_start=np.zeros(n), shot_end=np.full(n, float(per)))  # one shot each
    emb = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        block = rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32)
        emb[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    spec = normalise_spec(IndexSpec(index_type="flat"))
    vindex = VectorIndex.build(emb, items.id, spec)
    ref = ModelRef(DEFAULT_MODEL)
    record = model_record(ref)
    bank = load_query_bank(ref)
    manifest = Manifest(model=IndexedModel.from_record(record, dim, default_precision(ref.name, record.weights)),
                        next_id=n, index_spec=spec, video_sampled={p: Sampling() for p in paths},
                        video_sampling=Sampling(), hubness=bank.settings() if bank is not None else None)
    with write_lock(idx):
        commit(idx, items, emb, vindex, manifest)
    return folder, idx


# `mmsearch index ...` in a fresh interpreter that reports its own peak RSS (VmHWM) on exit: a
# child's ru_maxrss would also count the pages it shared with this (large) process before exec
CLI = """
import atexit, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("\\nVmHWM_kB " + line.split()[1] + "\\n")
atexit.register(peak)
sys.argv = ["mmsearch"] + sys.argv[1:]
from mmsearch.cli import app
app()
"""


def run_once(folder: Path, idx: Path) -> dict:
    """One `mmsearch index` in a fresh process: wall seconds, its peak RSS, what it reported."""
    cmd = [sys.executable, "-c", CLI, "index", str(folder), "--index", str(idx), "-q"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"mmsearch index failed: {proc.stderr.strip()}")
    lines = proc.stderr.strip().splitlines()
    peak_kb = int(next(line.split()[1] for line in lines if line.startswith("VmHWM_kB")))
    return {"wall_seconds": round(wall, 3), "peak_rss_mb": round(peak_kb / 1024, 1),
            "reported": next(line for line in lines if " items in " in line)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--videos", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default=None, help="where to build the synthetic index (default: a temp folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="mmsearch-reindex-") as tmp:
        t0 = time.perf_counter()
        folder, idx = make_index(Path(tmp), args.items, args.videos)
        build = time.perf_counter() - t0
        generation = json.loads((idx / "manifest.json").read_text())["generation"]
        runs = [run_once(folder, idx) for _ in range(args.repeats)]
        unchanged = json.loads((idx / "manifest.json").read_text())["generation"] == generation
        disk = sum(f.stat().st_size for f in idx.rglob("*") if f.is_file())
    walls = [r["wall_seconds"] for r in runs]
    peak = max(r["peak_rss_mb"] for r in runs)
    record = {
        "what": f"`mmsearch index` with nothing changed: {args.items:,} items ({args.videos:,} videos x "
                f"{args.items // args.videos:,} frames), flat faiss index, fresh process per run",
        "command": "python benchmarks/reindex_unchanged.py" + "".join(
            f" --{k} {v}" for k, v in (("items", args.items), ("videos", args.videos), ("repeats", args.repeats))
            if v != ap.get_default(k)),
        "items": args.items,
        "index_disk_bytes": disk,
        "build_seconds": round(build, 1),
        "runs": runs,
        "wall_seconds_median": statistics.median(walls),
        "peak_rss_mb_max": peak,
        "no_new_generation": unchanged,
        "targets": {"wall_seconds <= 2": statistics.median(walls) <= TARGET_SECONDS,
                    "peak_rss_mb <= 300": peak <= TARGET_MB},
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}",
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "reindex_unchanged.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{record['what']}: median {record['wall_seconds_median']} s, peak {peak} MB, "
          f"no new generation: {unchanged} -> {out}")


if __name__ == "__main__":
    main()
