"""Load on `mmsearch serve` through the full HTTP path: text queries (encoding included) at
concurrency 1 and 4, and cold thumbnails of 12 MP JPEGs. A bounded loop against 127.0.0.1 that
stops by itself.

    python benchmarks/serve_load.py [--index DIR] [--queries 300] [--thumbs 40]

Without --index it first indexes the 8,091 Flickr8k photos into a temporary folder (about a
minute). Queries are Flickr8k dev captions, each request `GET /api/search?q=...&k=20`. Writes
benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "flickr8k"
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"p50_ms_c4": 50, "p95_ms_c4": 150, "qps_min": 20, "thumbs_per_s_min": 30}


def start_server(index: Path) -> tuple[subprocess.Popen, str, int]:
    """`mmsearch serve --port 0` in a fresh process; (process, host, port) once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "mmsearch.cli", "serve", "--index", str(index), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if not line.startswith("serving http://"):
        proc.kill()
        raise SystemExit(f"mmsearch serve did not start: {line}{proc.stderr.read()}")
    host, port = line.split("//")[1].strip().rsplit(":", 1)
    return proc, host, int(port)


def run_load(host: str, port: int, urls: list[str], concurrency: int) -> dict:
    """GET every url once, ``concurrency`` keep-alive connections at a time; latencies and errors."""
    latencies: list[float] = []
    errors: list[str] = []
    queue = list(reversed(urls))
    lock = threading.Lock()

    def worker():
        conn = http.client.HTTPConnection(host, port, timeout=60)
        while True:
            with lock:
                if not queue:
                    break
                url = queue.pop()
            t0 = time.perf_counter()
            conn.request("GET", url)
            resp = conn.getresponse()
            body = resp.read()
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                if resp.status != 200 or not body:
                    errors.append(f"{resp.status} {url}")
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = sorted(1000 * x for x in latencies)
    pick = lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 1)  # noqa: E731
    return {"requests": len(ms), "errors": len(errors), "error_examples": errors[:3],
            "p50_ms": round(statistics.median(ms), 1), "p95_ms": pick(0.95), "p99_ms": pick(0.99),
            "per_s": round(len(ms) / wall, 1), "wall_seconds": round(wall, 2)}


def dev_captions(n: int) -> list[str]:
    from mmsearch.data import load_flickr8k

    dev = load_flickr8k(DATA, "dev")
    return [caps[0] for caps in dev.captions][:n]


def large_jpegs(folder: Path, n: int) -> None:
    """``n`` 12 MP JPEGs (4000x3000, quality 90), upscaled from Flickr8k dev photos, each with one
    random pixel: contents no earlier run has seen, so their thumbnails are made cold."""
    import random

    from PIL import Image

    from mmsearch.data import load_flickr8k

    folder.mkdir(parents=True)
    for i, src in enumerate(load_flickr8k(DATA, "dev").images[:n]):
        with Image.open(src) as im:
            big = im.convert("RGB").resize((4000, 3000), Image.BICUBIC)
            big.putpixel((random.randrange(4000), random.randrange(3000)), tuple(random.randrange(256) for _ in "rgb"))
            big.save(folder / f"big{i:03d}.jpg", quality=90)


def thumbs_cold(work: Path, n: int) -> dict:
    """Thumbnails of ``n`` 12 MP JPEGs through /thumb, each made for the first time (empty cache)."""
    from mmsearch.indexing import index_folder
    from mmsearch.store import Collection

    large_jpegs(work / "big", n)
    index_folder(work / "big", work / "big-index")
    ids = Collection.open(work / "big-index").items.id.tolist()
    proc, host, port = start_server(work / "big-index")
    try:
        urls = [f"/thumb/{i}?size=256" for i in ids]
        one = run_load(host, port, urls[: n // 2], 1)
        two = run_load(host, port, urls[n // 2:], 2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"images": n, "size": 256, "concurrency_1": one, "concurrency_2": two}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", type=Path, default=None, help="an index of the Flickr8k photos (default: build one)")
    ap.add_argument("--queries", type=int, default=300, help="queries per concurrency level")
    ap.add_argument("--thumbs", type=int, default=40, help="12 MP JPEGs for the cold-thumbnail run")
    args = ap.parse_args()
    captions = dev_captions(2 * args.queries + 20)
    with tempfile.TemporaryDirectory(prefix="mmsearch-serve-load-") as tmp:
        work = Path(tmp)
        index = args.index
        if index is None:
            from mmsearch.indexing import index_folder

            index = work / "index"
            index_folder(DATA / "images", index)
        proc, host, port = start_server(index)
        try:
            url = lambda q: "/api/search?" + urllib.parse.urlencode({"q": q, "k": 20})  # noqa: E731
            run_load(host, port, [url(q) for q in captions[:20]], 1)  # warm-up, not recorded
            c1 = run_load(host, port, [url(q) for q in captions[20:20 + args.queries]], 1)
            c4 = run_load(host, port, [url(q) for q in captions[20 + args.queries:]], 4)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        thumbs = thumbs_cold(work, args.thumbs)
    best_thumbs = max(thumbs["concurrency_1"]["per_s"], thumbs["concurrency_2"]["per_s"])
    record = {
        "what": "mmsearch serve over 127.0.0.1: text queries (GET /api/search, k=20, encoding included) on the "
                "8,091-photo Flickr8k index, and cold 256 px thumbnails of 12 MP JPEGs",
        "command": "python benchmarks/serve_load.py" + (f" --queries {args.queries}" if args.queries != 300 else "")
                   + (f" --thumbs {args.thumbs}" if args.thumbs != 40 else ""),
        "queries": {"concurrency_1": c1, "concurrency_4": c4},
        "thumbnails": thumbs,
        "targets": {
            "p50 <= 50 ms at concurrency 4": c4["p50_ms"] <= TARGETS["p50_ms_c4"],
            "p95 <= 150 ms at concurrency 4": c4["p95_ms"] <= TARGETS["p95_ms_c4"],
            ">= 20 queries/s": max(c1["per_s"], c4["per_s"]) >= TARGETS["qps_min"],
            "zero errors": c1["errors"] == c4["errors"] == 0,
            ">= 30 cold 12 MP thumbnails/s": best_thumbs >= TARGETS["thumbs_per_s_min"],
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f} at the end",
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "serve_load.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("queries", "targets")}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
