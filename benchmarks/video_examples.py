"""The video examples of docs/video.md, run as a user runs them, with the installed ``mmsearch`` command:

    mmsearch index ../shared/data/videos --index <tmp>
    mmsearch query "people walking on a path" --index <tmp> -k 3
    mmsearch query "an airplane flying in the sky" --index <tmp> -k 2
    mmsearch frame ../shared/data/videos/<top hit> --at <its start> -o <tmp>/hit.jpg

``<tmp>`` is a temporary folder, removed afterwards; the model cache is the user's.

    python benchmarks/video_examples.py

Writes benchmarks/results/video_examples.json (command lines, their output with paths relative to the
data folder, wall times); ``report.py`` renders the examples in docs/video.md from it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quickstart import ROOT, SHOWN_DATA, Runner, load_average, machine  # noqa: E402

QUERIES = (("people walking on a path", 3), ("an airplane flying in the sky", 2))


def main() -> None:
    import os

    from mmsearch._util import atomic_write_text

    load = load_average()
    with tempfile.TemporaryDirectory(prefix="mmsearch-video-") as tmp:
        run = Runner(Path(tmp), dict(os.environ))
        index_dir = str(Path(tmp) / "index")
        steps = [run.run("index", f"{SHOWN_DATA}/videos", "--index", index_dir)]
        for text, k in QUERIES:
            steps.append(run.run("query", text, "--index", index_dir, "-k", str(k)))
        _score, video, span = steps[1].stdout[0].split("\t")  # the first query's best hit
        steps.append(run.run("frame", f"{SHOWN_DATA}/{video}", "--at", span.split("-")[0], "-o",
                             str(Path(tmp) / "hit.jpg")))
    record = {
        "what": "docs/video.md's examples: index the shared clips, two queries, one frame, with the installed CLI",
        "command": "python benchmarks/video_examples.py",
        "steps": [s.record() for s in steps],
        "machine": machine(),
        "load_average_at_start": load,
    }
    atomic_write_text(ROOT / "benchmarks" / "results" / "video_examples.json",
                      json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(record, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
