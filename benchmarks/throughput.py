"""Indexing throughput and query latency: torch eager vs ONNX Runtime fp32 vs ONNX Runtime int8.

In one run, in a fresh model cache (so the first-use export is timed too), for each of the three:
1. forward only: photos decoded and preprocessed beforehand, timed around ``embed_pixels`` alone
   (batches of 32, best of 3 passes);
2. ``mmsearch index FOLDER`` end to end in a fresh process (scan, decode, embed, faiss, commit), on
   N Flickr8k dev photos (224x224 JPEG) and on L large JPEGs (12 MP, made by upscaling dev photos
   with Pillow, quality 90): images/s from the wall time, and the pipeline's own embed-stage rate;
3. cold ``mmsearch query "..."``: a fresh process each time, median of R runs; and a warm query
   in the library (a Searcher already loaded), mean of 50.

int8 is the built-in model's shipped int8 image graph (calibrated on 256 Flickr8k *train* photos by
benchmarks/build_int8.py) with the fp32 text graph; nothing here reads the test split.

    python benchmarks/throughput.py [--model mmsearch-lite2] [--n 400] [--large 100] [--repeats 10]

Writes benchmarks/results/throughput_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsearch.config import DEFAULT_MODEL  # noqa: E402
from mmsearch.data import load_flickr8k  # noqa: E402

QUERY = "a dog runs on the grass"
CONFIGS = {  # name -> (index options, encoder options)
    "torch": (["--backend", "torch"], {"backend": "torch"}),
    "onnx_fp32": (["--precision", "fp32"], {"precision": "fp32"}),
    "onnx_int8": (["--precision", "int8"], {"precision": "int8"}),
}


def timed_run(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    timed_run.last = p  # type: ignore[attr-defined]
    return time.perf_counter() - t


def make_large_jpegs(paths: list[str], folder: Path, size=(4000, 3000)) -> None:
    from PIL import Image

    folder.mkdir()
    for p in paths:
        Image.open(p).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(folder / Path(p).name, quality=90)


def forward_only(enc, pixels: np.ndarray, bs: int = 32) -> float:
    enc.embed_pixels(pixels[:bs])  # warm-up
    best = 0.0
    for _ in range(3):  # best of 3: the baseline should not be the one slowed by a busy machine
        t = time.perf_counter()
        for i in range(0, len(pixels), bs):
            enc.embed_pixels(pixels[i : i + bs])
        best = max(best, len(pixels) / (time.perf_counter() - t))
    return best


def index_run(mmsearch: list[str], folder: Path, index: Path, opts: list[str], model: str, env: dict) -> dict:
    wall = timed_run(mmsearch + ["index", str(folder), "--index", str(index), "--model", model, "-q", *opts], env)
    summary = timed_run.last.stderr.strip().splitlines()[-1]  # type: ignore[attr-defined]
    n = int(re.search(r"files (\d+) added", summary)[1])
    embed = float(summary.rsplit(",", 1)[1].split()[0])  # the pipeline's own embed-stage rate (items/s)
    return {"images": n, "wall_seconds": round(wall, 2), "images_per_s": round(n / wall, 1),
            "embed_stage_images_per_s": round(embed, 1)}


def measure(name: str, opts: list[str], enc_opts: dict, args, folders: dict, pixels: np.ndarray, env: dict,
            tmp: Path) -> dict:
    from mmsearch.encoder import Encoder
    from mmsearch.search import Searcher

    mmsearch = [sys.executable, "-m", "mmsearch.cli"]
    t = time.perf_counter()
    enc = Encoder(args.model, **enc_opts)
    enc.warm("image", "text")
    load = time.perf_counter() - t
    out = {"model_load_seconds_in_process": round(load, 2), "forward_only_images_per_s": round(forward_only(enc, pixels), 1)}
    for what, folder in folders.items():
        out[f"index_{what}"] = index_run(mmsearch, folder, tmp / f"idx-{name}-{what}", opts, args.model, env)
    rerun = timed_run(mmsearch + ["index", str(folders["small"]), "--index", str(tmp / f"idx-{name}-small"), "-q",
                                  *opts], env)
    out["reindex_unchanged_wall_seconds"] = round(rerun, 2)
    index = tmp / f"idx-{name}-small"
    query_opts = ["--backend", "torch"] if name == "torch" else []
    colds = [timed_run(mmsearch + ["query", QUERY, "--index", str(index), "-k", "5", *query_opts], env)
             for _ in range(args.repeats)]
    out["cold_query_seconds_median"] = round(statistics.median(colds), 3)
    out["cold_query_seconds_all"] = [round(c, 3) for c in colds]
    s = Searcher(index, encoder=enc)
    s.search_text("warm up")
    t = time.perf_counter()
    for _ in range(50):
        s.search_text(QUERY, k=5)
    out["warm_query_ms"] = round((time.perf_counter() - t) / 50 * 1000, 2)
    return out


def import_seconds(code: str, env: dict) -> float:
    return round(min(timed_run([sys.executable, "-c", code], env) for _ in range(3)), 3)


def ratios(r: dict) -> dict:
    t, f, q = r["torch"], r["onnx_fp32"], r["onnx_int8"]
    e2e = lambda c, what="small": c[f"index_{what}"]["images_per_s"]  # noqa: E731
    return {
        "index_small_end_to_end_fp32_vs_torch": round(e2e(f) / e2e(t), 2),
        "index_small_end_to_end_int8_vs_torch": round(e2e(q) / e2e(t), 2),
        "index_large_end_to_end_fp32_vs_torch": round(e2e(f, "large") / e2e(t, "large"), 2),
        "index_large_end_to_end_int8_vs_torch": round(e2e(q, "large") / e2e(t, "large"), 2),
        **{f"large_vs_small_rate_{n}": round(e2e(c, "large") / e2e(c), 2) for n, c in r.items()},
        "forward_fp32_vs_torch": round(f["forward_only_images_per_s"] / t["forward_only_images_per_s"], 2),
        "forward_int8_vs_torch": round(q["forward_only_images_per_s"] / t["forward_only_images_per_s"], 2),
        "cold_query_torch_vs_fp32": round(t["cold_query_seconds_median"] / f["cold_query_seconds_median"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--n", type=int, default=400, help="small photos to index")
    ap.add_argument("--large", type=int, default=100, help="12 MP JPEGs to index")
    ap.add_argument("--repeats", type=int, default=10, help="cold query runs")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a built-in model")
    args = ap.parse_args()

    from mmsearch.media import load_image

    paths = load_flickr8k(args.data, "dev").images[: args.n]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = {k: v for k, v in os.environ.items() if k != "MMSEARCH_INDEX"}
        env["MMSEARCH_CACHE"] = os.environ["MMSEARCH_CACHE"] = str(tmp / "cache")  # a new machine: nothing exported
        mmsearch = [sys.executable, "-m", "mmsearch.cli"]
        export_seconds = timed_run(mmsearch + ["export", args.model], env)
        folders = {"small": tmp / "photos", "large": tmp / "large"}
        folders["small"].mkdir()
        for p in paths:
            os.symlink(p, folders["small"] / Path(p).name)
        make_large_jpegs(paths[: args.large], folders["large"])
        from mmsearch.encoder import Encoder

        pixels = np.stack([Encoder(args.model, precision="fp32").preprocess(load_image(p)) for p in paths])
        results = {name: measure(name, opts, enc_opts, args, folders, pixels, env, tmp)
                   for name, (opts, enc_opts) in CONFIGS.items()}
        imports = {"onnx_path": import_seconds("import numpy, onnxruntime, tokenizers, faiss, pyarrow.parquet", env),
                   "torch_open_clip": import_seconds("import torch, open_clip", env)}
        large_mb = sum(f.stat().st_size for f in folders["large"].iterdir()) / len(paths[: args.large]) / 2**20

    import onnxruntime
    import torch

    from mmsearch._util import available_cores

    record = {
        "what": f"throughput: {len(paths)} Flickr8k dev photos (224x224 JPEG) and {args.large} 12 MP JPEGs "
                f"(4000x3000, {large_mb:.1f} MB each), model {args.model}",
        "model": args.model,
        "command": f"python benchmarks/throughput.py --model {args.model} --n {args.n} --large {args.large} "
                   f"--repeats {args.repeats}",
        "first_use_export_seconds": round(export_seconds, 1),
        "import_seconds": imports,
        **results,
        "ratios": ratios(results),
        "machine": f"{platform.machine()}, {available_cores()} cpus, torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}",
    }
    out = ROOT / "benchmarks" / "results" / f"throughput_{args.model}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
