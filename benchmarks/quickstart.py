"""The README's main job, run as a user runs it: index the Flickr8k photos, then ask the first query.

With the installed ``mmsearch`` command (the console script beside this Python), in fresh processes:

    mmsearch index ../shared/data/flickr8k/images --index <tmp>
    mmsearch query "a dog running on the grass" --index <tmp>

``<tmp>`` is a temporary index folder, removed afterwards. The model cache is the user's
(``$MMSEARCH_CACHE`` or ``~/.cache/mmsearch``), so a model exported before is reused, as on a
user's second run; ``--fresh-cache`` uses an empty temporary cache instead, and the index run then
includes the one-time export of the model to ONNX.

    python benchmarks/quickstart.py [--fresh-cache]

Writes benchmarks/results/quickstart.json: the command lines, their output (paths relative to the
data folder, the temporary folder as ``<tmp>``), the wall time of each, and whether the model's
export was already cached. ``report.py`` renders the README's first-query block from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"  # ../shared/data beside the repo, as the README says
SHOWN_DATA = "../shared/data"            # how the README's commands name it
QUERY = "a dog running on the grass"


def mmsearch_command() -> str:
    """The installed console script: the one beside this Python (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "mmsearch"
    found = str(beside) if beside.is_file() else shutil.which("mmsearch")
    if not found:
        raise SystemExit("no `mmsearch` command: install the package first (pip install -e \".[cpu,torch]\")")
    return found


@dataclass
class Step:
    """One command as the user types it, and what it did."""
    argv: list[str]          # after `mmsearch`
    wall_seconds: float
    stdout: list[str]
    stderr: list[str]

    def record(self) -> dict:
        return {"command": "mmsearch " + shlex.join(self.argv), "argv": ["mmsearch", *self.argv],
                "wall_seconds": round(self.wall_seconds, 2),
                "stdout": self.stdout, "stderr": self.stderr}


class Runner:
    """Runs ``mmsearch`` subcommands in fresh processes, in the repo root, and rewrites machine-specific
    paths in what they print: paths under the data folder become relative to it, the temp folder ``<tmp>``."""

    def __init__(self, tmp: Path, env: dict):
        self.exe, self.tmp, self.env = mmsearch_command(), tmp, env

    def shown(self, text: str) -> str:
        for real in {str(DATA.resolve()), str(DATA)}:
            text = text.replace(real + os.sep, "")
        return text.replace(str(self.tmp), "<tmp>")

    def run(self, *argv: str) -> Step:
        t = time.perf_counter()
        p = subprocess.run([self.exe, *argv], capture_output=True, text=True, env=self.env, cwd=ROOT)
        wall = time.perf_counter() - t
        if p.returncode:
            raise SystemExit(f"mmsearch {shlex.join(argv)} failed ({p.returncode}):\n{p.stderr}")
        # stderr: the summary, warnings and notes; not the progress bar's redraws ("embedding: 45%|...")
        err = [self.shown(line) for line in p.stderr.splitlines() if line.strip() and not line.startswith("embedding:")]
        return Step(argv=[self.shown(a) for a in argv], wall_seconds=wall,
                    stdout=[self.shown(line) for line in p.stdout.splitlines()], stderr=err)


def export_cached(env: dict) -> bool:
    """Whether the default model's ONNX export sits in the cache this run uses."""
    from mmsearch.config import DEFAULT_MODEL
    from mmsearch.weights import fingerprint

    root = Path(env["MMSEARCH_CACHE"]).expanduser() if env.get("MMSEARCH_CACHE") else Path.home() / ".cache" / "mmsearch"
    fp = fingerprint(DEFAULT_MODEL)
    return fp is not None and (root / "onnx" / fp).is_dir()


def machine() -> str:
    from mmsearch._util import available_cores

    return f"{platform.machine()}, {available_cores()} cpus"


def load_average() -> float:
    """The 1-minute load average: how busy the machine was with other work when a run started."""
    return round(os.getloadavg()[0], 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fresh-cache", action="store_true",
                    help="use an empty temporary MMSEARCH_CACHE (the index run then exports the model)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quickstart.json"))
    args = ap.parse_args()

    from mmsearch._util import atomic_write_text

    load = load_average()
    photos = DATA / "flickr8k" / "images"
    if not photos.is_dir():
        raise SystemExit(f"no photos at {photos}")
    with tempfile.TemporaryDirectory(prefix="mmsearch-quickstart-") as tmp:
        env = dict(os.environ)
        if args.fresh_cache:
            env["MMSEARCH_CACHE"] = str(Path(tmp) / "cache")
        cached = export_cached(env)
        run = Runner(Path(tmp), env)
        index_dir = str(Path(tmp) / "index")
        index = run.run("index", f"{SHOWN_DATA}/flickr8k/images", "--index", index_dir)  # run in the repo root
        query = run.run("query", QUERY, "--index", index_dir)
        info = json.loads("\n".join(run.run("info", "--json", "--index", index_dir).stdout))
    record = {
        "what": "the README's quick start: index the Flickr8k photos, then the first query, with the installed CLI",
        "command": "python benchmarks/quickstart.py" + (" --fresh-cache" if args.fresh_cache else ""),
        "model": info["model"],
        "precision": info["precision"],
        "items": info["count"],
        "export_already_cached": cached,
        "index": index.record(),
        "query": query.record(),
        "machine": machine(),
        "load_average_at_start": load,
    }
    atomic_write_text(args.out, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(record, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
