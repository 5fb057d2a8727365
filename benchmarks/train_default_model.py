"""Rebuild the heads of the built-in model "mmsearch-lite" from scratch.

Trains the projection heads with InfoNCE on the Flickr8k *train* split, selects the best epoch on
the *dev* split (the test split is never read), and writes
``mmsearch/models/mmsearch_lite_heads.safetensors`` plus ``benchmarks/results/train_default_model.json``.

    python benchmarks/train_default_model.py [--data ../shared/data/flickr8k] [--dry-run]

Tower features are cached under ``.cache/features`` (git-ignored): ~6 min for the first run on a
2-core CPU, seconds afterwards.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsearch import models  # noqa: E402
from mmsearch.config import TrainConfig  # noqa: E402
from mmsearch.data import load_flickr8k  # noqa: E402
from mmsearch.train import cached_features, image_tower_features, text_tower_features, train_heads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "features"))
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--dry-run", action="store_true", help="train and report, but do not overwrite the shipped heads")
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    t0 = time.time()
    model = models.build(heads=None)
    preprocess, tok = models.preprocess(), models.tokenizer()
    cache = Path(args.cache)
    feats = {}
    for split in ("train", "dev"):
        pairs = load_flickr8k(args.data, split)
        texts, owner = pairs.flat()
        feats[split] = (
            cached_features(cache / f"lite0_img_{split}.npy",
                            lambda: image_tower_features(model, preprocess, pairs.images)),
            cached_features(cache / f"minilm_txt_{split}.npy", lambda: text_tower_features(model, tok, texts)),
            owner,
        )
        print(f"{split}: {len(pairs.images)} images, {len(texts)} captions ({time.time() - t0:.0f}s)", flush=True)

    cfg = replace(TrainConfig(), epochs=args.epochs)
    t1 = time.time()
    history = train_heads(model, *feats["train"], *feats["dev"], cfg=cfg,
                          on_epoch=lambda r: print(
                              f"epoch {r['epoch']:3d} loss {r['loss']:.3f} dev t2i R@1/5/10 "
                              f"{r['val']['t2i'][1]:.3f}/{r['val']['t2i'][5]:.3f}/{r['val']['t2i'][10]:.3f} "
                              f"i2t {r['val']['i2t'][1]:.3f}/{r['val']['i2t'][5]:.3f}/{r['val']['i2t'][10]:.3f}",
                              flush=True))
    best = max(history, key=lambda r: r["val_rsum"])
    record = {
        "what": "mmsearch-lite heads: InfoNCE on Flickr8k train, best epoch on dev (test never used)",
        "command": "python benchmarks/train_default_model.py",
        "towers": {"image": "efficientnet_lite0 (ImageNet, locked)", "text": "all-MiniLM-L6-v2 (locked, mean pool)"},
        "heads": {"vision": models.VISION_PROJ, "text": models.TEXT_PROJ, "embed_dim": models.EMBED_DIM},
        "train_config": asdict(cfg),
        "n_train_images": int(len(feats["train"][0])),
        "n_train_captions": int(len(feats["train"][1])),
        "best_epoch": best["epoch"],
        "dev_recall": best["val"],
        "train_seconds_heads_only": round(time.time() - t1, 1),
        "history": history,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    out = ROOT / "benchmarks" / "results" / ("train_default_model.dry.json" if args.dry_run else "train_default_model.json")
    out.write_text(json.dumps(record, indent=2) + "\n")
    if not args.dry_run:
        state = {k: v.contiguous() for k, v in models.head_state_dict(model).items()}
        tmp = models.HEADS_FILE.with_suffix(".tmp")
        save_file(state, str(tmp), metadata={"recipe": record["what"], "best_epoch": str(best["epoch"])})
        tmp.replace(models.HEADS_FILE)
        print(f"wrote {models.HEADS_FILE}")
    print(f"best epoch {best['epoch']}: dev {json.dumps(best['val'])}  -> {out}")


if __name__ == "__main__":
    main()
