"""Rename the folder of the 8,091 Flickr8k photos and index it again: how long, and how many photos
are embedded again (issue 16: <= 5 % of the first run, 0 photos).

    python benchmarks/rename_reindex.py

The photos are linked (symlinks) into a temporary folder, indexed with `mmsearch index` in a fresh
process, the folder is renamed, and `mmsearch index NEW_NAME` runs again in a fresh process. Writes
benchmarks/results/rename_reindex.json.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "data" / "flickr8k" / "images"
RESULTS = ROOT / "benchmarks" / "results"


def index(folder: Path, idx: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mmsearch.cli", "index", str(folder), "--index", str(idx), "-q"],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"mmsearch index failed: {r.stderr}")
    return wall, r.stderr.strip().splitlines()[-1]


def counts(line: str) -> dict:
    return {k: int(v) for v, k in re.findall(r"(\d+) (added|updated|removed|moved|unchanged)", line)}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mmsearch-rename-") as tmp:
        photos, idx = Path(tmp) / "flickr8k", Path(tmp) / "index"
        photos.mkdir()
        for name in sorted(os.listdir(IMAGES)):
            (photos / name).symlink_to(IMAGES / name)
        first, first_line = index(photos, idx)
        renamed = photos.with_name("flickr8k-renamed")
        os.rename(photos, renamed)
        second, second_line = index(renamed, idx)
    c = counts(second_line)
    embedded_again = c.get("added", 0) + c.get("updated", 0)
    record = {
        "what": "rename the folder of the 8,091 Flickr8k photos (symlinked) and run `mmsearch index NEW_NAME` "
                "again, each run in a fresh process",
        "command": "python benchmarks/rename_reindex.py",
        "first_run_seconds": round(first, 1),
        "after_rename_seconds": round(second, 2),
        "ratio": round(second / first, 4),
        "first_run": first_line.split(": ", 1)[1],
        "after_rename": second_line.split(": ", 1)[1],
        "moved": c.get("moved", 0),
        "embedded_again": embedded_again,
        "targets": {"<= 5 % of the first run": second <= 0.05 * first, "0 photos embedded again": embedded_again == 0},
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f} at the end",
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "rename_reindex.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
