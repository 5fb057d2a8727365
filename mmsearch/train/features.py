"""Tower features that cached-tower training runs on, and the cache that keeps them.

A locked image tower is run once over the training images (and their augmented ``VIEWS``): its
pooled features, or the trunk's feature maps entering the unlocked blocks (``ImageTail``). A locked
text tower likewise: its pooled features, or its hidden states below the unlocked layers
(``TextTail``). ``FeatureCache`` keeps them as .npy files keyed by what they depend on: the model's
identity (its weights' fingerprint) and the images' paths, sizes and mtimes, or the captions' text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .._util import atomic_file, batched, prefetch_iter
from ..config import TrainConfig
from ..errors import MediaError
from ..media import load_image
from ..weights import fingerprint

VIEWS = ("orig", "flip", "zoom", "zoomflip")  # augmented views of an image whose features can be cached
ZOOM = 1.125  # the "zoom" views crop the central 1/ZOOM of the image (resize to ZOOM x size, centre crop)


def train_views(cfg: TrainConfig) -> tuple[str, ...]:
    """The image views cached-tower training uses, "orig" first."""
    views = ["orig"] + (["flip"] if cfg.flip_views else [])
    if cfg.zoom_views:
        views += ["zoom"] + (["zoomflip"] if cfg.flip_views else [])
    return tuple(views)


# ---- the cache -----------------------------------------------------------------------------------
def cached_features(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Load features from ``path`` (.npy) or compute and save them atomically."""
    path = Path(path)
    if path.is_file():
        return np.load(path)
    feats = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:  # two runs filling one cache don't collide
        np.save(f, feats)
    return feats


def _stat(path: str) -> tuple[int, int]:
    try:
        st = Path(path).stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def _model_identity(model_name: str, pretrained: str | None):
    """What the cached tower features depend on: the model reference (absolute paths for a
    checkpoint folder or weights file) and the fingerprint of its weights (retrained = new key)."""
    import os


    paths = tuple(os.path.abspath(x) if x and os.path.exists(x) else x for x in (model_name, pretrained))
    return (*paths, fingerprint(model_name, pretrained))


def _cache_key(*parts) -> str:
    import hashlib

    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FeatureCache:
    """Tower features as .npy files in ``folder``, named by kind and a key of ``model_key`` (what the
    tower's weights are, e.g. ``_model_identity``) and the inputs: image paths with their sizes and
    mtimes (an edited photo = new key), or the captions themselves."""

    folder: Path
    model_key: tuple

    @classmethod
    def of(cls, folder: str | Path, model_name: str, pretrained: str | None = None) -> "FeatureCache":
        """The cache in ``folder`` for features of this model reference's towers."""
        return cls(Path(folder), _model_identity(model_name, pretrained))

    def image_file(self, paths: Sequence[str], view: str = "orig", first_block: int | None = None) -> Path:
        """Where the pooled features (or, with ``first_block``, the maps entering it) of ``paths`` in
        ``view`` are kept."""
        kind = f"img-b{first_block}" if first_block is not None else "img"
        stamp = [(p, *_stat(p)) for p in paths]
        return self.folder / f"{kind}{'' if view == 'orig' else '-' + view}-{_cache_key(self.model_key, stamp)}.npy"

    def images(self, model, preprocess, paths: Sequence[str], view: str = "orig", first_block: int | None = None,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """``image_tower_features`` of ``paths`` in ``view``, or with ``first_block`` the
        ``image_trunk_maps`` entering that block; computed once. Undecodable images: NaN rows."""
        def compute() -> np.ndarray:
            if first_block is not None:
                return image_trunk_maps(model, preprocess, paths, [first_block], view=view, progress=progress)[0]
            return image_tower_features(model, preprocess, paths, view=view, progress=progress)

        return cached_features(self.image_file(paths, view, first_block), compute)

    def texts(self, model, tokenizer, texts: list[str]) -> np.ndarray:
        """``text_tower_features`` of ``texts``, computed once."""
        return cached_features(self.folder / f"txt-{_cache_key(self.model_key, texts)}.npy",
                               lambda: text_tower_features(model, tokenizer, texts))

    def text_states(self, model, tokenizer, texts: list[str], start: int) -> tuple[np.ndarray, np.ndarray]:
        """``text_hidden_states`` of ``texts`` entering layer ``start`` (memory-mapped) and their mask,
        computed once."""
        key = _cache_key(self.model_key, texts)
        hidden_file, mask_file = self.folder / f"txt-h{start}-{key}.npy", self.folder / f"txt-mask-{key}.npy"
        if not (hidden_file.is_file() and mask_file.is_file()):
            hidden, mask = text_hidden_states(model, tokenizer, texts, start)
            cached_features(mask_file, lambda: mask)
            cached_features(hidden_file, lambda: hidden)
            del hidden
        return np.load(hidden_file, mmap_mode="r"), np.load(mask_file)


# ---- image tower ---------------------------------------------------------------------------------
def _zoomed(preprocess, size: int):
    """``preprocess`` looking at the central 1/ZOOM of the image: its resize enlarged by ZOOM when it
    is the usual resize + centre crop, else the image is cropped before it."""
    import torchvision.transforms as T

    steps = getattr(preprocess, "transforms", None)
    if steps and len(steps) > 2 and isinstance(steps[0], T.Resize) and isinstance(steps[1], T.CenterCrop):
        first = steps[0]
        return T.Compose([T.Resize(round(size * ZOOM), interpolation=first.interpolation, antialias=first.antialias),
                          steps[1]] + list(steps[2:]))

    def crop_then(image):
        w, h = image.size
        cw, ch = round(w / ZOOM), round(h / ZOOM)
        left, top = (w - cw) // 2, (h - ch) // 2
        return preprocess(image.crop((left, top, left + cw, top + ch)))

    return crop_then


def _view_batches(model, preprocess, paths: Sequence[str], view: str, batch_size: int):
    """Per batch of ``paths``: (pixels (n, C, H, W) of the images in ``view``, or None when none of
    them decodes; the rows that failed to decode; n), decoded in a background thread."""
    import torch


    if view not in VIEWS:
        raise ValueError(f"unknown image view {view!r}: use one of {', '.join(VIEWS)}")
    if view.startswith("zoom"):
        preprocess = _zoomed(preprocess, _pair(model.visual.image_size)[0])

    def load_batch(chunk):
        out, bad = [], []
        for j, p in enumerate(chunk):
            try:
                out.append(preprocess(load_image(p)))
            except (MediaError, OSError):
                bad.append(j)
                out.append(None)
        fill = next((x for x in out if x is not None), None)
        return (torch.stack([fill if x is None else x for x in out]) if fill is not None else None), bad, len(chunk)

    for pixels, bad, n in prefetch_iter(map(load_batch, batched(list(paths), batch_size))):
        if pixels is not None and view.endswith("flip"):
            pixels = torch.flip(pixels, dims=[3])
        yield pixels, bad, n


def image_tower_features(model, preprocess, paths: Sequence[str], batch_size: int = 64,
                         progress: Callable[[int], None] | None = None, view: str = "orig") -> np.ndarray:
    """Pooled image-trunk features (n, C) of a timm image tower, before its projection head.

    ``view`` (one of VIEWS): features of the images as they are, or of an augmented view, mirrored
    and/or zoomed. Rows of images that cannot be decoded (missing, corrupt, zero-byte...) are NaN.
    """
    import torch

    trunk = model.visual.trunk.eval().to(memory_format=torch.channels_last)
    device = next(trunk.parameters()).device
    out = []
    with torch.inference_mode():
        for pixels, bad, n in _view_batches(model, preprocess, paths, view, batch_size):
            feats = (trunk(pixels.to(device).contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
                     if pixels is not None else np.zeros((n, trunk.num_features), np.float32))
            feats[bad] = np.nan
            out.append(feats)
            if progress:
                progress(n)
    return np.concatenate(out) if out else np.zeros((0, trunk.num_features), np.float32)


def _flat_blocks(trunk) -> list:
    """An EfficientNet-style trunk's blocks in order, across its stages."""
    return [block for stage in trunk.blocks for block in stage]


def image_trunk_maps(model, preprocess, paths: Sequence[str], starts: Sequence[int], batch_size: int = 64,
                     progress: Callable[[int], None] | None = None, view: str = "orig") -> list[np.ndarray]:
    """Feature maps (n, C, H, W) as float16 entering each block index in ``starts`` (counted over all
    stages of an EfficientNet-style timm trunk), what ``ImageTail`` trains on. ``view``: as for
    ``image_tower_features``. Images that cannot be decoded give NaN maps."""
    import torch

    size = _pair(model.visual.image_size)
    trunk = model.visual.trunk.eval()
    device = next(trunk.parameters()).device
    outs: dict[int, list] = {s: [] for s in starts}
    with torch.inference_mode():
        for pixels, bad, n in _view_batches(model, preprocess, paths, view, batch_size):
            if pixels is None:  # no image of the batch decodes: NaN maps of the right shape
                pixels = torch.zeros(n, 3, *size)
            for i, m in _maps(trunk, pixels.to(device), starts).items():
                m = m.half().cpu().numpy()
                m[bad] = np.nan
                outs[i].append(m)
            if progress:
                progress(n)
    return [np.concatenate(outs[s]) if outs[s] else np.zeros((0, 0, 0, 0), np.float16) for s in starts]


def _maps(trunk, pixels, starts: Sequence[int]) -> dict:
    """{start: the trunk's feature map entering block ``start``} for a batch of pixels."""
    blocks, out = _flat_blocks(trunk), {}
    x = trunk.bn1(trunk.conv_stem(pixels))
    for i in range(max(starts) + 1):
        if i in starts:
            out[i] = x
        if i < len(blocks):
            x = blocks[i](x)
    return out


def _pair(size) -> tuple[int, int]:
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


# ---- text tower ----------------------------------------------------------------------------------
def text_tower_features(model, tokenizer, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Pooled HF text-tower features (n, C), before the projection."""
    import torch

    text = model.text.eval()
    device = next(text.parameters()).device
    pad = text.config.pad_token_id
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), text.config.hidden_size), np.float32)
    with torch.inference_mode():
        for idx in batched(order, batch_size):
            ids = tokenizer([texts[i] for i in idx])
            mask = ids != pad
            ids = ids[:, : int(mask.any(0).nonzero().max()) + 1]
            mask = (ids != pad).long()
            ids, mask = ids.to(device), mask.to(device)
            pooled = text.pooler(text.transformer(input_ids=ids, attention_mask=mask), mask)
            out[list(idx)] = pooled.float().cpu().numpy()
    return out


def _text_layers(transformer) -> list:
    """The layer blocks of an HF transformer: its longest ModuleList."""
    import torch

    lists = [m for m in transformer.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def text_hidden_states(model, tokenizer, texts: Sequence[str], start: int, batch_size: int = 256):
    """(hidden, mask): the HF text tower's hidden states entering layer ``start`` (n, T, C) as float16,
    and the token mask (n, T) as uint8, T the longest caption: what ``TextTail`` trains on."""
    import torch

    text = model.text.eval()
    device = next(text.parameters()).device
    pad = text.config.pad_token_id
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    lengths = np.zeros(len(texts), np.int64)
    for idx in batched(order, 1024):
        lengths[list(idx)] = (tokenizer([texts[i] for i in idx]) != pad).sum(1).numpy()
    t_max = int(lengths.max()) if len(texts) else 1
    hidden = np.zeros((len(texts), t_max, text.config.hidden_size), np.float16)
    mask = np.zeros((len(texts), t_max), np.uint8)
    with torch.inference_mode():
        for idx in batched(order, batch_size):
            ids = tokenizer([texts[i] for i in idx])
            t = int(lengths[list(idx)].max())
            ids = ids[:, :t]
            m = (ids != pad).long()
            out = text.transformer(input_ids=ids.to(device), attention_mask=m.to(device), output_hidden_states=True)
            hidden[list(idx), :t] = out.hidden_states[start].float().cpu().numpy()
            mask[list(idx), :t] = m.numpy()
    return hidden, mask
