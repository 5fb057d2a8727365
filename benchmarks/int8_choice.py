"""How the int8 graphs are made: what to do with the text tower, measured on dev.

The image tower is quantised statically (QDQ, per-channel weights, activation ranges calibrated on
256 Flickr8k train photos). For the text tower three ways are compared: keep it fp32, static int8
like the image tower (ranges calibrated on 512 train captions), and dynamic int8 (int8 weights,
activations quantised per batch at run time). Each variant's dev-split embeddings are compared with
fp32 (cosine) and scored by recall@k (plain cosine), its text throughput measured (batches of 256),
and, for the text side, how much a caption's vector changes between being embedded alone and in a
batch of 256 (dynamic quantisation scales activations per batch). The choice int8 makes is made
here, on dev, never on test.

    python benchmarks/int8_choice.py [--model mmsearch-lite2]

Writes benchmarks/results/int8_choice_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsearch.config import DEFAULT_MODEL  # noqa: E402
from mmsearch.data import load_flickr8k  # noqa: E402
from mmsearch.metrics import recall_at_k  # noqa: E402

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--model", default=DEFAULT_MODEL)
    args = ap.parse_args()

    from mmsearch.encoder import Encoder, get_encoder
    from mmsearch.quantize import add_int8

    train, dev = load_flickr8k(args.data, "train"), load_flickr8k(args.data, "dev")
    texts, owner = dev.flat()
    fp32 = get_encoder(args.model, precision="fp32")
    emb = {"fp32": (fp32.embed_images(dev.images), fp32.embed_texts(texts))}
    seconds, text_per_s, batch_drift = {}, {}, {}
    probe = texts[:64]
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("text_fp32", "fp32"), ("text_dynamic", "dynamic"), ("text_static", "static")):
            folder = Path(tmp) / name
            shutil.copytree(fp32.export_folder, folder)
            t = time.perf_counter()
            add_int8(folder, train, source="Flickr8k train", text=text)
            seconds[name] = round(time.perf_counter() - t, 1)
            enc = Encoder(str(folder), precision="int8")
            img = enc.embed_images(dev.images)
            t = time.perf_counter()
            txt = enc.embed_texts(texts)
            text_per_s[name] = round(len(texts) / (time.perf_counter() - t), 1)
            emb[name] = (img, txt)
            alone = np.concatenate([enc.embed_texts([p]) for p in probe])
            batched = enc.embed_texts(probe + texts[64:256])[: len(probe)]
            batch_drift[name] = float(np.abs(alone - batched).max())
    cos = lambda a, b: (a * b).sum(1)  # noqa: E731  (unit rows)
    variants = {}
    for name, (img, txt) in emb.items():
        r = recall_at_k(img, txt, owner)
        variants[name] = {
            "t2i": r["t2i"], "i2t": r["i2t"],
            "image_cosine_to_fp32": {"mean": float(cos(img, emb["fp32"][0]).mean()),
                                     "min": float(cos(img, emb["fp32"][0]).min())},
            "text_cosine_to_fp32": {"mean": float(cos(txt, emb["fp32"][1]).mean()),
                                    "min": float(cos(txt, emb["fp32"][1]).min())},
        }
    record = {
        "what": f"int8 variants of {args.model} on the Flickr8k dev split ({len(dev)} images x {len(texts)} "
                "captions), plain cosine; calibrated on the train split",
        "command": f"python benchmarks/int8_choice.py --model {args.model}",
        "variants": variants,
        "quantise_seconds": seconds,
        "text_embedded_per_s": text_per_s,
        "text_vector_change_alone_vs_in_a_batch_max_abs": batch_drift,
        "chosen": "text_fp32",
    }
    out = ROOT / "benchmarks" / "results" / f"int8_choice_{args.model}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    for name, v in variants.items():
        print(f"{name:13s} t2i R@10 {v['t2i'][10]:.3f}  i2t R@10 {v['i2t'][10]:.3f}  "
              f"text cos {v['text_cosine_to_fp32']['mean']:.4f}  image cos {v['image_cosine_to_fp32']['mean']:.4f}  "
              f"texts/s {text_per_s.get(name, '-')}  batch drift {batch_drift.get(name, 0):.2g}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
