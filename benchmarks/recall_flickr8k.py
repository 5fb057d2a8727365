"""Recall@1/5/10 of a model on the Flickr8k 1k test split, through the same path as the CLI.

The 1,000 test photos are linked into a temporary folder and indexed with ``index_folder`` (scan,
decode, preprocess, embed, faiss) exactly as ``mmsearch index`` does; the 5,000 captions are
embedded by the index's encoder and text->image is answered by the faiss index
(``Searcher.search_vectors``, with the hubness correction of the model's query bank, as a query
is). The captions are also indexed as texts (``index_texts``, as ``mmsearch index --texts`` does)
and image->text is answered through that mixed index too. The headline figures are exact recall on
the stored embeddings, ranked as a search ranks them (with the correction); "plain" is the same by
plain cosine. Convention: CLIP_benchmark (a caption
hits if its image is in the top k; an image hits if any of its 5 captions is), ties counted against
the query.

    python benchmarks/recall_flickr8k.py [--model mmsearch-lite] [--split test] [--backend auto|torch]
                                         [--precision fp32|int8]

By default the model runs as `mmsearch index` runs it (ONNX Runtime, at the model's default
precision). ``--backend torch`` runs it in torch (the reference the ONNX Runtime path is checked
against); ``--precision`` forces fp32 or int8 (int8 graphs are added to the model's cached export,
calibrated on the train split, if it has none). Writes
benchmarks/results/recall_flickr8k_<model>_<split>.json for the default, else
recall_flickr8k_<model>_<split>_<backend>_<precision>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from mmsearch.config import DEFAULT_MODEL  # noqa: E402
from mmsearch.data import load_flickr8k  # noqa: E402
from mmsearch.evaluate import hub_biases  # noqa: E402
from mmsearch.metrics import recall_at_k  # noqa: E402


def ensure_int8(args) -> None:
    """Give the model's cached export int8 graphs (calibrated on the train split) if it has none."""
    from mmsearch.encoder import get_encoder
    from mmsearch.quantize import add_int8
    from mmsearch.exported import ExportManifest

    folder = get_encoder(args.model, pretrained=args.pretrained).export_folder
    if "int8" not in ExportManifest.load(folder).precisions:
        add_int8(folder, load_flickr8k(args.data, "train"), source=f"{args.data} (train split)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--split", default="test", choices=["test", "dev"])
    ap.add_argument("--backend", default="auto", choices=["auto", "torch"])
    ap.add_argument("--precision", default=None, choices=["fp32", "int8"])
    args = ap.parse_args()
    if args.precision == "int8":
        ensure_int8(args)

    from mmsearch.encoder import get_encoder
    from mmsearch.indexing import index_folder, index_texts
    from mmsearch.search import Searcher

    pairs = load_flickr8k(args.data, args.split)
    texts, owner = pairs.flat()
    t0 = time.perf_counter()
    enc = get_encoder(args.model, pretrained=args.pretrained, backend=args.backend, precision=args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        for p in pairs.images:
            os.symlink(p, photos / Path(p).name)
        report = index_folder(photos, Path(tmp) / "index", encoder=enc)
        searcher = Searcher(Path(tmp) / "index", encoder=enc)
        c = searcher.collection
        row_of_name = {Path(p).name: i for i, p in enumerate(c.items.path)}
        order = np.array([row_of_name[Path(p).name] for p in pairs.images])
        image_emb = np.asarray(c.embeddings)[order]  # row i = pairs.images[i]
        t1 = time.perf_counter()
        text_emb = enc.embed_texts(texts)
        text_seconds = time.perf_counter() - t1

        # text -> image through the faiss index, as `mmsearch query` answers it
        D, I = searcher.search_vectors(text_emb, k=10, query="text")
        id_to_pair = {int(c.items.id[r]): j for j, r in enumerate(order)}
        ranked = np.vectorize(id_to_pair.get)(I)
        via_index = {k: float(np.mean((ranked[:, :k] == np.asarray(owner)[:, None]).any(1))) for k in (1, 5, 10)}

        # image -> text through the same index, now also holding the captions as text items
        captions = Path(tmp) / "captions.txt"
        captions.write_text("\n".join(" ".join(t.split()) for t in texts) + "\n")
        index_texts(captions, Path(tmp) / "index", encoder=enc)
        searcher = Searcher(Path(tmp) / "index", encoder=enc)
        c = searcher.collection
        caption_of_id = {int(i): int(p.rsplit("#", 1)[1]) - 1 for i, p, k in zip(c.items.id, c.items.path, c.items.kind)
                         if k == "text"}
        _, I = searcher.search_vectors(image_emb, k=10, kind="text", query="image")
        owner_arr = np.asarray(owner)
        hit_rank = owner_arr[np.vectorize(caption_of_id.get)(I)] == np.arange(len(order))[:, None]
        i2t_via_index = {k: float(np.mean(hit_rank[:, :k].any(1))) for k in (1, 5, 10)}

    image_bias, text_bias = hub_biases(enc.query_bank, image_emb, text_emb)
    r = recall_at_k(image_emb, text_emb, owner, image_bias=image_bias, text_bias=text_bias)
    plain = recall_at_k(image_emb, text_emb, owner)
    record = {
        "what": f"Flickr8k {args.split} split retrieval, {len(pairs.images)} images x {len(texts)} captions",
        "command": f"python benchmarks/recall_flickr8k.py --model {args.model}"
                   + (f" --split {args.split}" if args.split != "test" else "")
                   + (f" --backend {args.backend}" if args.backend != "auto" else "")
                   + (f" --precision {args.precision}" if args.precision else ""),
        "model": enc.name,
        "backend": enc.backend.name,
        "precision": enc.precision,
        "t2i": r["t2i"],
        "i2t": r["i2t"],
        "plain": {"t2i": plain["t2i"], "i2t": plain["i2t"]},
        "hubness": enc.query_bank.settings() if enc.query_bank is not None else None,
        "t2i_via_faiss_index": via_index,
        "i2t_via_faiss_index": i2t_via_index,
        "n_images": r["n_images"],
        "n_texts": r["n_texts"],
        "index_kind": report.index_kind,
        "skipped": [s.__dict__ for s in report.skipped],
        "seconds": {"index_images": round(report.seconds, 1), "embed_texts": round(text_seconds, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }
    name = args.model.replace("/", "_").replace(":", "_")
    suffix = f"_{enc.backend.name}_{enc.precision}" if args.backend != "auto" or args.precision else ""
    out = ROOT / "benchmarks" / "results" / f"recall_flickr8k_{Path(name).name}_{args.split}{suffix}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    fmt = lambda d: "/".join(f"{d[k]:.3f}" for k in (1, 5, 10))  # noqa: E731
    print(f"{enc.name} on Flickr8k {args.split}: text->image R@1/5/10 {fmt(r['t2i'])} "
          f"(via index {fmt(via_index)}, plain cosine {fmt(plain['t2i'])}), image->text {fmt(r['i2t'])} "
          f"(via index {fmt(i2t_via_index)}, plain cosine {fmt(plain['i2t'])}) -> {out}")


if __name__ == "__main__":
    main()
