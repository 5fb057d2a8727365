"""Scale-out on Ray (issue 18), on this machine's local Ray runtime.

1. Embedding: ``index_folder`` over N Flickr8k train photos (read in place, never copied), in one
   process (the single-machine path, both cores) and on Ray with 1 and 2 embedding actors; photos/s
   from the run's wall time with the model already loaded on the driver and Ray already started;
   efficiency at 2 workers = rate(2) / (2 x rate(1)). Ray's fixed start-up: ``ray.init`` of a
   local runtime, and a Ray run over 4 photos (actor start and model load, pipeline set-up).
2. Index: a seeded clustered set (N x 256, like the clustered sets of index_scale.py) built as one
   IVF-PQ index (``VectorIndex.build``, ``--index-type ivfpq``) and as 2 shards on Ray
   (``ShardedIndex.build``, the same plan: trained once on the driver, codes added in parallel tasks); build seconds, and agreement of the top-10
   of 1,000 held-out queries: sharded vs the single build on the same trained quantizer, sharded vs
   merged (in memory and on disk), single build vs exact.

    python benchmarks/scale_out.py [--photos 2000] [--vectors 200000]

Writes benchmarks/results/scale_out.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mmsearch.config import DEFAULT_MODEL, IndexingConfig, IndexSpec, RayOptions

RESULTS = ROOT / "benchmarks" / "results"
READ_RESERVE_NOTE = "actors share the CPUs less half a CPU for Ray Data's reads"


def photo_folder(data: Path, n: int, tmp: Path) -> Path:
    """A folder of symlinks to the first ``n`` Flickr8k train photos (the files stay in place)."""
    from mmsearch.data import load_flickr8k

    folder = tmp / "photos"
    folder.mkdir()
    for src in load_flickr8k(data, "train").subset(n).images:
        (folder / Path(src).name).symlink_to(src)
    return folder


def timed_index(folder: Path, out: Path, encoder, config: IndexingConfig) -> dict:
    from mmsearch.indexing import index_folder

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    report = index_folder(folder, out, encoder=encoder, config=config)
    wall = time.perf_counter() - t
    return {"photos": report.added, "seconds": round(wall, 2), "photos_per_s": round(report.added / wall, 2)}


def embedding(args, tmp: Path) -> dict:
    from mmsearch.encoder import get_encoder
    from mmsearch.scale import connect

    encoder = get_encoder(args.model)
    encoder.embed_texts(["warm"])
    folder = photo_folder(Path(args.data), args.photos, tmp)
    few = photo_folder_subset(folder, 4, tmp)
    out = {"photos": args.photos, "single_process": timed_index(folder, tmp / "single", encoder, IndexingConfig())}
    print("single", out["single_process"], flush=True)
    t = time.perf_counter()
    connect("local", num_cpus=os.cpu_count())
    out["ray_init_seconds"] = round(time.perf_counter() - t, 2)
    tiny = timed_index(few, tmp / "tiny", encoder, IndexingConfig(ray=RayOptions(workers=1)))
    out["ray_run_4_photos_seconds"] = tiny["seconds"]
    for workers in (1, 2):
        config = IndexingConfig(ray=RayOptions(workers=workers))
        out[f"ray_{workers}_workers"] = timed_index(folder, tmp / f"ray{workers}", encoder, config)
        print(workers, out[f"ray_{workers}_workers"], flush=True)
    r1, r2 = out["ray_1_workers"]["photos_per_s"], out["ray_2_workers"]["photos_per_s"]
    out["efficiency_2_workers"] = round(r2 / (2 * r1), 3)
    out[">= 0.75 of linear"] = out["efficiency_2_workers"] >= 0.75
    out["pool"] = READ_RESERVE_NOTE
    return out


def photo_folder_subset(folder: Path, n: int, tmp: Path) -> Path:
    few = tmp / "few"
    few.mkdir()
    for p in sorted(folder.iterdir())[:n]:
        (few / p.name).symlink_to(os.readlink(p))
    return few


def index_build(args, tmp: Path) -> dict:
    import faiss
    from index_scale import clustered, recall

    from mmsearch.index import VectorIndex
    from mmsearch.index.files import read_index
    from mmsearch.scale.shards import TEMPLATE, ShardedIndex

    x = clustered(args.vectors + 1000, 2000, 256, seed=400)
    q, base = x[:1000], np.ascontiguousarray(x[1000:])
    ids = np.arange(len(base), dtype=np.int64)
    path = tmp / "vectors.npy"
    np.save(path, base)
    spec = IndexSpec(index_type="ivfpq")  # the same plan for both: plain PQ codes, so on-disk merging applies too
    t = time.perf_counter()
    single = VectorIndex.build(base, ids, spec)
    single_s = time.perf_counter() - t
    t = time.perf_counter()
    sharded = ShardedIndex.build(path, ids, tmp / "shards", shards=2, spec=spec, ray=True)
    sharded.attach(base, ids)
    sharded_s = time.perf_counter() - t
    same_q = read_index(tmp / "shards" / TEMPLATE, "ivfpq")
    same_q.add_with_ids(base, ids)
    reference = VectorIndex(same_q, "ivfpq", sharded.params)
    reference.attach(base, ids)
    truth = faiss.knn(q, base, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]
    I_sh, I_ref = sharded.search(q, 10)[1], reference.search(q, 10)[1]
    out = {"vectors": len(base), "d": 256, "clusters": 2000, "shards": 2,
           "codes": sharded.config.plan.codes or f"PQ{sharded.config.plan.m}",
           "single_build_seconds": round(single_s, 2), "sharded_build_seconds": round(sharded_s, 2),
           "sharded_tuned": {"nprobe": sharded.config.nprobe, "rerank_factor": sharded.config.rerank_factor},
           "single_tuned": {"nprobe": single.config.nprobe, "rerank_factor": single.config.rerank_factor},
           "top10_sharded_vs_same_quantizer": recall(I_sh, I_ref, 10),
           "identical_rows_sharded_vs_same_quantizer": float(np.mean((I_sh == I_ref).all(1))),
           "top10_sharded_vs_merged": recall(I_sh, sharded.merge().search(q, 10)[1], 10),
           "recall10_sharded": recall(I_sh, truth, 10),
           "recall10_single": recall(single.search(q, 10)[1], truth, 10)}
    if not sharded.config.plan.codes:  # on-disk merging takes plain PQ lists only
        out["top10_sharded_vs_merged_on_disk"] = recall(I_sh, sharded.merge(on_disk=True).search(q, 10)[1], 10)
    print(out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--photos", type=int, default=2000)
    ap.add_argument("--vectors", type=int, default=200_000)
    args = ap.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        record = {"what": "embedding on Ray actors vs one process, and a sharded IVF-PQ build vs a single one",
                  "command": "python benchmarks/scale_out.py " + " ".join(sys.argv[1:]),
                  "machine": f"{platform.machine()} {os.cpu_count()} threads, no GPU, ray {ray.__version__}",
                  "model": args.model, "embedding": embedding(args, Path(tmp))}
        record["index"] = index_build(args, Path(tmp))
    (RESULTS / "scale_out.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
