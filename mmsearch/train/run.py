"""``train_model`` (``mmsearch train``): load the model, lock its towers, pick cached-tower or end-to-end
training, train, and write the checkpoint folder with its record and query bank."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import models
from .._util import atomic_write_text
from ..config import DEFAULT_MODEL, ModelRef, TrainConfig
from ..data import Pairs
from ..encoder import Encoder
from ..errors import DataError, MediaError
from ..media import load_image
from ..weights import BANK_FILE, fingerprint
from .bank import build_query_bank
from .features import FeatureCache, _text_layers, train_views
from .fit import _end_to_end, train_heads
from .tails import ImageTail, TextTail, _image_tail_shape, _tail_works

MAX_CACHED_MAPS_BYTES = 4 << 30  # unlocked image layers train end to end when their input maps need more


def train_model(
    train_pairs,
    val_pairs,
    out_dir: str | Path,
    model_name: str | None = None,
    pretrained: str | None = None,
    cfg: TrainConfig = TrainConfig(),
    unlock_image: int = 0,
    unlock_text: int = 0,
    cache_dir: str | Path | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    on_skip: Callable[[str, str], None] | None = None,
    device: str | None = None,
) -> dict:
    """Fine-tune ``model_name`` (default: the built-in default model) on image-caption pairs with
    InfoNCE and write the best epoch (by validation rsum) to ``out_dir`` as an open_clip checkpoint
    folder that ``Encoder(out_dir)`` and ``mmsearch index --model out_dir`` load. Returns the record.

    A timm + HF model: image features (and ``cfg``'s augmented views) are computed once and cached
    under ``cache_dir``, or with ``unlock_image`` the trunk's feature maps entering those layer
    groups (EfficientNet-style trunks, maps up to MAX_CACHED_MAPS_BYTES), which then train on them
    (``ImageTail``); so are the text features, or with ``unlock_text`` the hidden states below those
    layers (``TextTail``). Otherwise the last ``unlock_image`` layer groups / ``unlock_text`` layers
    train end to end on decoded images.
    Images that cannot be decoded are left out with their captions (``on_skip(path, reason)``).
    ``device``: "cpu", "cuda", ...; None picks CUDA when available (end to end: bf16 autocast there).
    """
    import json
    import time


    _check_sizes(train_pairs, val_pairs)
    t0 = time.time()
    model_name = model_name or DEFAULT_MODEL
    run = _prepare(model_name, pretrained, cfg, device, unlock_image, unlock_text, len(train_pairs), len(val_pairs))
    if run.cached:
        cache = FeatureCache.of(cache_dir or Path.home() / ".cache" / "mmsearch" / "features", model_name, pretrained)
        train_feats, train_pairs = _cached_split(run, cache, "train", train_pairs, cfg, on_progress, on_skip)
        val_feats, val_pairs = _cached_split(run, cache, "val", val_pairs, cfg, on_progress, on_skip)
        _check_sizes(train_pairs, val_pairs)
        history = train_heads(run.model, *train_feats, *val_feats, cfg=cfg, on_epoch=on_epoch, reset=False)
    else:
        train_pairs, _ = usable_images(train_pairs, on_skip=on_skip)
        val_pairs, _ = usable_images(val_pairs, on_skip=on_skip)
        _check_sizes(train_pairs, val_pairs)
        history = _end_to_end(run.model, run.preprocess, run.tokenizer, train_pairs, val_pairs, cfg, on_epoch)
    out_dir = Path(out_dir)
    run.save(out_dir)
    record = run.record(model_name, pretrained, cfg, train_pairs, val_pairs, history)
    record["seconds"] = round(time.time() - t0, 1)
    _write_query_bank(out_dir, cfg, train_pairs, val_pairs, run.device, record)
    atomic_write_text(out_dir / "mmsearch_train.json", json.dumps(record, indent=2, default=str) + "\n")
    return record


@dataclass
class _Run:
    """A model ready to train: towers locked, and whether it trains on cached tower features."""

    model: Any
    preprocess: Any
    tokenizer: Any
    model_config: dict | None  # open_clip model config, written with the checkpoint
    preprocess_cfg: dict | None
    device: str
    unlock_image: int
    unlock_text: int  # at most the text tower's layers when it is cached
    n_text_layers: int  # 0 unless cached
    cached: bool

    def save(self, out_dir: Path) -> None:
        """Write the (trained) model as an open_clip checkpoint folder."""

        self.model = self.model.cpu().eval()
        models.save_open_clip_folder(self.model, out_dir, model_config=self.model_config,
                                     hf_tokenizer=self.tokenizer if hasattr(self.tokenizer, "tokenizer") else None,
                                     preprocess_cfg=self.preprocess_cfg or None)

    def mode(self) -> str:
        if not self.cached:
            return "end to end"
        return ", ".join(["image layers on cached maps" if self.unlock_image else "cached image tower",
                          "text layers on cached states" if self.unlock_text else "cached text tower"]
                         ).replace("cached image tower, cached text tower", "cached towers")

    def record(self, model_name: str, pretrained: str | None, cfg: TrainConfig, train_pairs, val_pairs,
               history: list[dict]) -> dict:
        """What ``mmsearch_train.json`` says about the run (its "seconds" added by the caller)."""
        best = max(history, key=lambda r: r["val_rsum"])
        return {
            "base_model": model_name, "pretrained": pretrained, "mode": self.mode(),
            "unlock_image": self.unlock_image, "unlock_text": self.unlock_text,
            "n_train_images": len(train_pairs), "n_val_images": len(val_pairs), "device": str(self.device),
            "train_config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
            "best_epoch": best["epoch"], "best_val": best["val"], "history": history,
        }


def _prepare(model_name: str, pretrained: str | None, cfg: TrainConfig, device: str | None, unlock_image: int,
             unlock_text: int, n_train: int, n_val: int) -> _Run:
    """Load the model onto ``device``, lock its towers, and decide whether it trains on cached features:
    a timm + HF model whose unlocked layers ``TextTail`` / ``ImageTail`` reproduce, the image maps
    (for ``n_train`` training images in all views and ``n_val`` validation images) fitting in memory."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, preprocess, tokenizer, model_config, pp_cfg = _load_for_training(model_name, pretrained)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    cached, n_layers = _cacheable(model), 0
    if cached:
        n_layers = len(_text_layers(model.text.transformer))
        unlock_text = min(unlock_text, n_layers)
        cached = unlock_text == 0 or _tail_works(model, tokenizer, unlock_text)
    _lock_towers(model, unlock_image, unlock_text)
    if cached and unlock_image:  # unlocked image layers train on cached maps when they fit in memory
        shape = _image_tail_shape(model, unlock_image)
        views = len(train_views(cfg))
        cached = shape is not None and (2 * math.prod(shape) * (n_train * views + n_val) <= MAX_CACHED_MAPS_BYTES)
    return _Run(model, preprocess, tokenizer, model_config, pp_cfg, device, unlock_image, unlock_text, n_layers, cached)


def _cached_split(run: _Run, cache: FeatureCache, name: str, pairs, cfg: TrainConfig,
                  on_progress: Callable[[str, int, int], None] | None,
                  on_skip: Callable[[str, str], None] | None) -> tuple[tuple, Any]:
    """((image features, text features, caption owners), usable pairs) of one split ("train" or
    "val") from the cache, ``ImageTail`` / ``TextTail`` where layers are unlocked. Images that do not
    decode are left out; training images come in all of ``cfg``'s views, validation ones as they are."""
    model = run.model
    first = ImageTail.first_block(model, run.unlock_image) if run.unlock_image else None

    def images(view: str = "orig", label: str = name) -> np.ndarray:  # of all the split's images
        progress = _Progress(on_progress, label, len(pairs.images))
        return cache.images(model, run.preprocess, pairs.images, view, first, progress)

    img = images()
    usable, keep = usable_images(pairs, on_skip=on_skip, bad=np.flatnonzero(np.isnan(img.reshape(len(img), -1)).any(1)))
    img = img[keep]
    extra = train_views(cfg)[1:] if name == "train" else ()  # validation sees the images as they are
    if extra:
        img = np.stack([img] + [images(view, f"train, {view}")[keep] for view in extra])
    if run.unlock_image:
        img = ImageTail(model, img, run.unlock_image)
    texts, owner = usable.flat()
    if run.unlock_text:  # hidden states below the unlocked layers, cached; those layers train
        hidden, mask = cache.text_states(model, run.tokenizer, texts, run.n_text_layers - run.unlock_text)
        txt = TextTail(model, hidden, mask, run.unlock_text)
    else:
        txt = cache.texts(model, run.tokenizer, texts)
    return (img, txt, owner), usable


def _write_query_bank(out_dir: Path, cfg: TrainConfig, train_pairs, val_pairs, device: str, record: dict) -> None:
    """The trained model's own query bank (``cfg.query_bank`` training images and a caption of each),
    for the hubness correction of its searches; none with ``cfg.query_bank`` 0."""
    import time


    bank_file = out_dir / BANK_FILE
    bank_file.unlink(missing_ok=True)  # an earlier run's bank belongs to other weights
    if not cfg.query_bank:
        return

    t1 = time.time()
    bank = build_query_bank(Encoder(str(out_dir), device=str(device), backend="torch"), train_pairs, val_pairs,
                            max_items=cfg.query_bank, seed=cfg.seed, weights=fingerprint(str(out_dir)))
    bank.save(bank_file)
    record["query_bank"] = dict(bank.settings(), seconds=round(time.time() - t1, 1))


# ---- loading, locking, checks ---------------------------------------------------------------------
def _load_for_training(model_name: str, pretrained: str | None):
    """(model, preprocess, tokenizer, open_clip model config, preprocess config) of any model."""

    if model_name in models.BUILTINS and pretrained is None:
        return (models.build(name=model_name), models.preprocess(model_name), models.tokenizer(),
                models.model_cfg(model_name), models.preprocess_config(model_name))
    import os

    import open_clip

    from ..backends.torch_backend import load_open_clip

    model, preprocess, tokenizer = load_open_clip(ModelRef(model_name, pretrained), None)
    name = "local-dir:" + os.path.abspath(model_name) if os.path.isdir(model_name) else model_name
    config = open_clip.get_model_config(name)
    return model, preprocess, tokenizer, config, dict(getattr(model.visual, "preprocess_cfg", {}) or {})


def _cacheable(model) -> bool:
    """Both towers can be run once and cached: a timm image trunk + head and an HF text tower."""
    from open_clip.hf_model import HFTextEncoder

    return hasattr(model.visual, "trunk") and hasattr(model.visual, "head") and isinstance(model.text, HFTextEncoder)


def _lock_towers(model, unlock_image: int, unlock_text: int) -> None:
    """Freeze both towers except their last ``unlock_*`` layer groups; heads stay trainable.

    HF text towers are handled here: open_clip's own HFTextEncoder.lock fails for BERT-family
    models and prints. The trainable layers are those of the transformer's longest ModuleList.
    """
    import contextlib
    import io

    from open_clip.hf_model import HFTextEncoder

    with contextlib.redirect_stdout(io.StringIO()):  # the library never prints
        # freeze_bn_stats=False on purpose: open_clip swaps timm's BatchNormAct2d for FrozenBatchNorm2d,
        # which drops the activation inside it and wrecks EfficientNet (outputs off by ~1e15).
        # BatchNorm statistics are kept fixed instead by _train_mode() leaving BN layers in eval mode.
        model.lock_image_tower(unlocked_groups=unlock_image, freeze_bn_stats=False)
        if not isinstance(model.text, HFTextEncoder):
            model.lock_text_tower(unlocked_layers=unlock_text)
            return
    for p in model.text.transformer.parameters():
        p.requires_grad_(False)
    layers = _text_layers(model.text.transformer)
    for layer in layers[len(layers) - unlock_text:] if unlock_text else []:
        for p in layer.parameters():
            p.requires_grad_(True)


def _check_sizes(train_pairs, val_pairs) -> None:
    if len(train_pairs) < 2 or len(val_pairs) < 1:
        raise DataError(f"training needs at least 2 usable training images and 1 validation image "
                        f"(got {len(train_pairs)} and {len(val_pairs)})")


class _Progress:
    """A progress callback taking increments, reporting (name, done, total)."""

    def __init__(self, report: Callable[[str, int, int], None] | None, name: str, total: int):
        self.report, self.name, self.total, self.done = report, name, total, 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.report:
            self.report(self.name, self.done, self.total)


def usable_images(pairs, check: Callable[[str], None] | None = None,
                  on_skip: Callable[[str, str], None] | None = None, bad: Sequence[int] | None = None):
    """The pairs without images that cannot be decoded, and the kept indices.

    ``bad``: indices already known to be unusable; otherwise each image is tried with ``check``
    (default: a full decode). ``on_skip(path, reason)`` is told about each one left out.
    """

    check = check or load_image

    def reason(p: str) -> str | None:
        try:
            check(p)
        except (MediaError, OSError) as e:
            return str(e)
        return None

    if bad is None:
        bad = []
        for i, p in enumerate(pairs.images):
            why = reason(p)
            if why is not None:
                bad.append(i)
                if on_skip:
                    on_skip(p, why)
    elif on_skip:
        for i in bad:  # known bad (e.g. from cached features): decode again only to say why
            on_skip(pairs.images[i], reason(pairs.images[i]) or "could not be decoded")
    drop = set(int(i) for i in bad)
    keep = [i for i in range(len(pairs)) if i not in drop]
    if not drop:
        return pairs, keep
    return Pairs([pairs.images[i] for i in keep], [pairs.captions[i] for i in keep]), keep
