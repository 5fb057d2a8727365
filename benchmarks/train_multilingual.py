"""Train and ship the multilingual query head of a built-in model (mmsearch.train.multilingual).

Trains on the Flickr8k *train* captions; each recipe of the grid is scored on the *dev* captions
(against all 1,000 dev photos, with the model's hubness correction), leaving out the captions of the
photos that ``flickr8k-zh/dev.tsv`` covers, which ``multilingual.py`` measures the head on. The
chosen head's pivot (nearest train captions) is then chosen on the same dev captions. The test
split is never read. Writes ``mmsearch/models/<model>_multi.safetensors`` and
``benchmarks/results/train_multilingual_<model>.json``.

    python benchmarks/train_multilingual.py [--model mmsearch-lite2]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsearch import models  # noqa: E402
from mmsearch.config import DEFAULT_MODEL  # noqa: E402
from mmsearch.data import load_flickr8k, load_table  # noqa: E402
from mmsearch.weights import fingerprint  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def head_data(model: str, flickr: Path, held_out: set[str], cache: Path | None = None):
    """Features and embeddings of train and dev (dev captions of ``held_out`` photos left out),
    read from ``cache`` (an .npz this function wrote) when given and present."""
    from mmsearch.encoder import Encoder
    from mmsearch.train.multilingual import HeadData

    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            d = {k: z[k] for k in z.files}
        d["dev_image_bias"] = d["dev_image_bias"] if d["dev_image_bias"].size else None
        return HeadData(**d), Encoder(model)
    data, enc = _embed_head_data(model, flickr, held_out)
    if cache is not None:
        np.savez(cache, **{k: (v if v is not None else np.zeros(0)) for k, v in vars(data).items()})
    return data, enc


def model_side(model: str, flickr: Path, held_out: set[str], one_caption: bool = False):
    """(HeadData without features, train captions, dev captions, encoder): the model's embeddings of
    Flickr8k train (every caption, or the first of each photo) and dev (captions of ``held_out``
    photos left out); the caller fills in the sentence features of the two caption lists."""
    from mmsearch.encoder import Encoder
    from mmsearch.evaluate import hub_biases
    from mmsearch.train.multilingual import HeadData

    enc = Encoder(model)
    train, dev = load_flickr8k(flickr, "train"), load_flickr8k(flickr, "dev")
    texts, owner = ([c[0] for c in train.captions], list(range(len(train)))) if one_caption else train.flat()
    dev_texts, dev_owner = dev.flat()
    keep = [i for i, o in enumerate(dev_owner) if dev.images[o] not in held_out]
    dev_images = enc.embed_images(dev.images)
    image_bias, _ = hub_biases(enc.query_bank, dev_images, dev_images[:1])
    data = HeadData(features=np.zeros((0, 0), np.float32), text=enc.embed_texts(texts, lang="en"),
                    images=enc.embed_images(train.images), owner=np.asarray(owner),
                    dev_features=np.zeros((0, 0), np.float32), dev_images=dev_images,
                    dev_owner=np.asarray([dev_owner[i] for i in keep]), dev_image_bias=image_bias)
    return data, texts, [dev_texts[i] for i in keep], enc


def _embed_head_data(model: str, flickr: Path, held_out: set[str]):
    from mmsearch.multilingual import SentenceEncoder

    data, texts, dev_texts, enc = model_side(model, flickr, held_out)
    sent = SentenceEncoder()
    return replace(data, features=sent.embed(texts), dev_features=sent.embed(dev_texts)), enc


def _with_pivot(tensors: dict, info, data):
    """The head's tensors and info with its pivot, when a pivot setting beats the head alone on dev."""
    from dataclasses import asdict

    from mmsearch.train.multilingual import choose_pivot, pivot_tensors

    with_pivot = {**tensors, **pivot_tensors(data)}
    setting, tried = choose_pivot(with_pivot, info, data)
    best = max(tried, key=lambda row: row["dev_t2i"][5] + row["dev_t2i"][10])
    print(f"pivot {best['pivot']}: dev R@1/5/10 " + "/".join(f"{best['dev_t2i'][k]:.3f}" for k in (1, 5, 10)))
    if setting is not None:
        tensors = with_pivot
        info = replace(info, recipe={**info.recipe, "pivot": asdict(setting)})
    return tensors, info, setting, tried


def build(model: str, features: Path | None = None) -> dict:
    import torch

    from mmsearch.multilingual import PACKAGE, HeadInfo, QueryHead, SentenceEncoder
    from mmsearch.train.multilingual import GRID, choose_head

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    zh = load_table(DATA / "flickr8k-zh" / "dev.tsv")
    data, enc = head_data(model, DATA / "flickr8k", set(zh.images), features)
    t_features = time.time() - t0

    def show(recipe, r):
        print(f"{recipe}: dev R@1/5/10 " + "/".join(f"{r[k]:.3f}" for k in (1, 5, 10)), flush=True)

    tensors, recipe, tried = choose_head(data, GRID, on_result=show)
    from dataclasses import asdict

    info = HeadInfo(model=model, weights=fingerprint(model), encoder=f"{PACKAGE} {SentenceEncoder().version}",
                    recipe=asdict(recipe))
    tensors, info, setting, pivot_tried = _with_pivot(tensors, info, data)
    out = models.builtin(model).multi_file
    QueryHead(tensors, info).save(out)
    return {
        "what": f"{model} multilingual query head: trained on Flickr8k train captions (English), "
                "recipe chosen on dev captions (the flickr8k-zh photos' captions left out) by text->image R@5+R@10 "
                "over the 1,000 dev photos with the hubness correction; then its pivot (nearest train captions) chosen the same way",
        "command": "python benchmarks/train_multilingual.py" + (f" --model {model}" if model != DEFAULT_MODEL else ""),
        "model": model, "weights": info.weights, "encoder": info.encoder, "head": out.name,
        "chosen": asdict(recipe), "tried": tried,
        "pivot_chosen": asdict(setting) if setting else None, "pivot_tried": pivot_tried,
        "head_bytes": out.stat().st_size,
        "n_train_captions": int(len(data.features)), "n_dev_captions": int(len(data.dev_features)),
        "feature_seconds": round(t_features, 1), "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(models.BUILTINS))
    ap.add_argument("--features", type=Path, help="keep the computed features in this .npz and reuse them (re-runs)")
    args = ap.parse_args()
    rec = build(args.model, args.features)
    path = ROOT / "benchmarks" / "results" / f"train_multilingual_{args.model}.json"
    path.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {rec['head']} and {path.name}: chosen {rec['chosen']}")


if __name__ == "__main__":
    main()
