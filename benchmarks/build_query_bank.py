"""Build the query bank of a built-in model (its hubness correction, see mmsearch.hubness).

The bank holds embeddings of 2,000 Flickr8k *train* photos and one caption of each; ``k`` and
``beta`` are chosen on the *dev* split (the test split is never read). Writes
``mmsearch/models/<model>_bank.safetensors`` and ``benchmarks/results/query_bank_<model>.json``
with dev recall by plain cosine and with the correction. Run it again whenever the model's heads
change (``train_default_model.py`` does, when it ships a candidate).

    python benchmarks/build_query_bank.py [--model mmsearch-lite2] [--bank 2000]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsearch import models  # noqa: E402
from mmsearch.weights import fingerprint  # noqa: E402
from mmsearch.config import DEFAULT_MODEL, TrainConfig  # noqa: E402
from mmsearch.data import load_flickr8k  # noqa: E402


def build(model: str, data: str, bank_size: int = TrainConfig.query_bank) -> dict:
    """Build, calibrate and write the bank of built-in ``model``; return its record."""
    import torch

    from mmsearch.encoder import Encoder
    from mmsearch.evaluate import embed_pairs, hub_biases
    from mmsearch.metrics import recall_at_k
    from mmsearch.train import build_query_bank

    t0 = time.time()
    b = models.builtin(model)
    enc = Encoder(model)  # its (perhaps stale) bank is never loaded here; the new one replaces it atomically
    train, dev = load_flickr8k(data, "train"), load_flickr8k(data, "dev")
    img, txt, owner = val = embed_pairs(enc, dev)
    bank = build_query_bank(enc, train, dev, max_items=bank_size, seed=0, weights=fingerprint(model),
                            val_embedded=val)
    bank.save(b.bank_file)
    image_bias, text_bias = hub_biases(bank, img, txt)  # what evaluate() and a search apply
    fixed, plain = recall_at_k(img, txt, owner, image_bias=image_bias, text_bias=text_bias), recall_at_k(img, txt, owner)
    record = {
        "what": f"{model} query bank: {bank_size} Flickr8k train photos + one caption each; k and beta chosen on dev",
        "command": f"python benchmarks/build_query_bank.py --model {model}"
                   + (f" --bank {bank_size}" if bank_size != TrainConfig.query_bank else ""),
        "model": model,
        "weights": bank.weights,
        "settings": bank.settings(),
        "dev_hubness": {"t2i": fixed["t2i"], "i2t": fixed["i2t"]},
        "dev_plain": {"t2i": plain["t2i"], "i2t": plain["i2t"]},
        "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    out = ROOT / "benchmarks" / "results" / f"query_bank_{model}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(models.BUILTINS))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--bank", type=int, default=TrainConfig.query_bank, help="train photos (one caption each) in the bank")
    args = ap.parse_args()
    rec = build(args.model, args.data, args.bank)
    fmt = lambda d: "/".join(f"{d[k]:.3f}" for k in (1, 5, 10))  # noqa: E731
    print(f"wrote {models.builtin(args.model).bank_file}: {json.dumps(rec['settings'])}")
    for key in ("t2i", "i2t"):
        print(f"dev {key}: plain {fmt(rec['dev_plain'][key])}, with the correction {fmt(rec['dev_hubness'][key])}")


if __name__ == "__main__":
    main()
