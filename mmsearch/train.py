"""InfoNCE training (``mmsearch train``), open_clip's ``ClipLoss`` with a learnable temperature.

With the image tower locked (the LiT recipe), its pooled features are computed once and cached, for
the images and any augmented views; the text tower's pooled features too when it is locked, or its
hidden states below the unlocked layers (``TextTail``). Unlocked layers of an EfficientNet-style image
trunk train on its cached feature maps entering them (``ImageTail``). Training then runs only the small
heads and those layers: seconds to minutes on a CPU. Other unlocked towers train end to end on decoded
images.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ._util import batched, prefetch_iter
from .config import TrainConfig
from .errors import BadArgumentError, DataError
from .hubness import BANK_FILE, build_query_bank
from .metrics import recall_at_k


# ---- tower features (what is cached) ----------------------------------------------------------
VIEWS = ("orig", "flip", "zoom", "zoomflip")  # augmented views of an image whose features can be cached
MAX_CACHED_MAPS_BYTES = 4 << 30  # unlocked image layers train end to end when their input maps need more
ZOOM = 1.125  # the "zoom" views crop the central 1/ZOOM of the image (resize to ZOOM x size, centre crop)


def train_views(cfg: TrainConfig) -> tuple[str, ...]:
    """The image views cached-tower training uses, "orig" first."""
    views = ["orig"] + (["flip"] if cfg.flip_views else [])
    if cfg.zoom_views:
        views += ["zoom"] + (["zoomflip"] if cfg.flip_views else [])
    return tuple(views)


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

    from .errors import MediaError
    from .media import load_image

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


def usable_images(pairs, check: Callable[[str], None] | None = None,
                  on_skip: Callable[[str, str], None] | None = None, bad: Sequence[int] | None = None):
    """The pairs without images that cannot be decoded, and the kept indices.

    ``bad``: indices already known to be unusable; otherwise each image is tried with ``check``
    (default: a full decode). ``on_skip(path, reason)`` is told about each one left out.
    """
    from .data import Pairs
    from .errors import MediaError
    from .media import load_image

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


class TextTail:
    """The last ``n`` layers of an HF text tower (and its pooler) run on cached hidden states, so
    those layers can train without re-running the locked ones below them. Called with caption
    indices, returns their pooled features (before the projection)."""

    def __init__(self, model, hidden: np.ndarray, mask: np.ndarray, n: int):
        self.text = model.text
        self.layers = _text_layers(self.text.transformer)[-n:]
        self.hidden, self.mask = hidden, mask
        self.device = next(self.text.parameters()).device

    def parameters(self):
        return [p for layer in self.layers for p in layer.parameters()]

    def train(self, mode: bool = True) -> None:
        for layer in self.layers:
            layer.train(mode)

    def state_dict(self) -> list:
        return [copy.deepcopy(layer.state_dict()) for layer in self.layers]

    def load_state_dict(self, states: list) -> None:
        for layer, state in zip(self.layers, states):
            layer.load_state_dict(state)

    def __len__(self) -> int:
        return len(self.mask)

    def __call__(self, idx):
        import types

        import torch

        idx = np.asarray(idx)
        m = torch.from_numpy(np.asarray(self.mask[idx], dtype=np.int64))
        t = max(1, int(m.sum(1).max()))
        m = m[:, :t].to(self.device)
        h = torch.from_numpy(np.asarray(self.hidden[idx, :t], dtype=np.float32)).to(self.device)
        ext = self._attention_mask(h, m)
        for layer in self.layers:
            h = layer(h, attention_mask=ext)
            h = h[0] if isinstance(h, tuple) else h
        return self.text.pooler(types.SimpleNamespace(last_hidden_state=h), m)

    def _attention_mask(self, h, m):
        try:
            from transformers.masking_utils import create_bidirectional_mask

            return create_bidirectional_mask(config=self.text.transformer.config, inputs_embeds=h, attention_mask=m)
        except ImportError:  # older transformers
            return self.text.transformer.get_extended_attention_mask(m, m.shape)

    def features(self, proj=None, batch: int = 512) -> np.ndarray:
        """Pooled features of all captions (no grad), or their projections by ``proj``."""
        import torch

        order = np.argsort(self.mask.sum(1), kind="stable")
        out = None
        with torch.no_grad():
            for s in range(0, len(order), batch):
                e = self(order[s:s + batch])
                e = (proj(e) if proj is not None else e).float()
                if out is None:
                    out = torch.zeros(len(order), e.shape[1])
                out[torch.from_numpy(order[s:s + batch])] = e.cpu()
        return out.numpy()

    def embed(self, proj, batch: int = 512) -> np.ndarray:
        """Normalised projected embeddings of all captions (no grad), for validation."""
        import torch

        return torch.nn.functional.normalize(torch.from_numpy(self.features(proj, batch)), dim=-1).numpy()


class ImageTail:
    """The last ``n`` layer groups of an EfficientNet-style timm trunk (as open_clip's
    ``lock_image_tower(unlocked_groups=n)`` counts them: the last n blocks, the last one with the head
    convolution) and its pooling, run on cached feature maps entering them (``image_trunk_maps`` at
    ``ImageTail.first_block(model, n)``), so those layers can train without re-running the locked ones
    below. Batch norms keep their ImageNet statistics. ``maps`` is (n_images, C, H, W) or
    (views, n_images, C, H, W); called with view and image indices, returns pooled features (before
    the projection)."""

    def __init__(self, model, maps: np.ndarray, n: int):
        trunk = model.visual.trunk
        self.trunk = trunk
        self.modules = _flat_blocks(trunk)[self.first_block(model, n):] + [trunk.conv_head, trunk.bn2]
        self.maps = maps if maps.ndim == 5 else maps[None]
        self.device = next(trunk.parameters()).device

    @staticmethod
    def first_block(model, n: int) -> int:
        """Index (over all stages) of the first block the last ``n`` layer groups train."""
        blocks = len(_flat_blocks(model.visual.trunk))
        if not 0 < n <= blocks:
            raise BadArgumentError(f"cannot unlock {n} image layer groups: the trunk has {blocks}")
        return blocks - n

    @property
    def views(self) -> int:
        return self.maps.shape[0]

    def parameters(self):
        return [p for m in self.modules for p in m.parameters()]

    def train(self, mode: bool = True) -> None:
        for m in self.modules:
            m.eval()  # batch-norm statistics stay those of ImageNet; there is no dropout in these layers

    def state_dict(self) -> list:
        return [copy.deepcopy(m.state_dict()) for m in self.modules]

    def load_state_dict(self, states: list) -> None:
        for m, state in zip(self.modules, states):
            m.load_state_dict(state)

    def __len__(self) -> int:
        return self.maps.shape[1]

    def __call__(self, view, idx):
        import torch

        x = torch.from_numpy(np.asarray(self.maps[view, idx], dtype=np.float32)).to(self.device)
        for m in self.modules:
            x = m(x)
        return self.trunk.global_pool(x)

    def embed(self, head, batch: int = 256, view: int = 0) -> np.ndarray:
        """Normalised projected embeddings of all images in one view (no grad), for validation."""
        import torch

        with torch.no_grad():
            out = [head(self(view, np.arange(s, min(s + batch, len(self))))).float().cpu()
                   for s in range(0, len(self), batch)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).numpy()


# ---- head training ---------------------------------------------------------------------------
def _own_rng(fn):
    """Run ``fn`` with torch's global random state forked: seeding inside does not leak to the caller."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.random.fork_rng(devices=None if torch.cuda.is_available() else []):
            return fn(*args, **kwargs)

    return wrapper


def _step(opt, loss, model) -> float:
    """One optimiser step on ``loss``; the temperature stays >= 0.01 (logit scale <= 100, as CLIP)."""
    import torch

    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return float(loss.detach())


def _embed(head, feats, batch: int = 4096) -> np.ndarray:
    import torch

    device = next(head.parameters()).device
    with torch.no_grad():
        outs = [head(torch.from_numpy(feats[i : i + batch]).to(device)) for i in range(0, len(feats), batch)]
        x = torch.nn.functional.normalize(torch.cat(outs).float(), dim=-1)
    return x.cpu().numpy()


def validation_score(r: dict) -> float:
    """Sum of recall@1/5/10 in both directions (rsum), the usual model-selection criterion."""
    return sum(r["t2i"].values()) + sum(r["i2t"].values())


@_own_rng
def train_heads(
    model,
    train_img: np.ndarray,
    train_txt: np.ndarray,
    train_owner: Sequence[int],
    val_img: np.ndarray,
    val_txt: np.ndarray,
    val_owner: Sequence[int],
    cfg: TrainConfig = TrainConfig(),
    on_epoch: Callable[[dict], None] | None = None,
    reset: bool = True,
) -> list[dict]:
    """Train ``model.visual.head``, ``model.text.proj`` and ``model.logit_scale`` with InfoNCE.

    Features are tower outputs (``image_tower_features`` / ``text_tower_features``);
    ``train_owner[t]`` is the image index of caption t. ``train_img`` may hold several views of each
    image, shape (views, n, C): each step then uses a random view per image. Each step draws a batch
    of distinct images (no duplicate image inside a batch, so no false negatives) and
    ``cfg.captions_per_step`` random captions of each; the loss averages one InfoNCE term per caption.
    The model is left with the heads of the best validation epoch; returns the per-epoch history.
    ``reset=False`` fine-tunes the heads the model already has instead of starting from scratch.
    """
    import torch
    from open_clip.loss import ClipLoss

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vhead, tproj = model.visual.head, model.text.proj
    if reset:
        for module in (vhead, tproj):
            for layer in module.modules():
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / cfg.init_temperature))
    params = list(vhead.parameters()) + list(tproj.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2] + [model.logit_scale]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "scale": 1.0}]
    tail = train_txt if isinstance(train_txt, TextTail) else None
    itail = train_img if isinstance(train_img, ImageTail) else None
    for t in (tail, itail):  # unlocked tower layers: small steps for pretrained weights
        if t is not None:
            groups.append({"params": [p for p in t.parameters() if p.ndim >= 2], "weight_decay": cfg.weight_decay,
                           "scale": cfg.tower_lr_scale})
            groups.append({"params": [p for p in t.parameters() if p.ndim < 2], "weight_decay": 0.0,
                           "scale": cfg.tower_lr_scale})
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    loss_fn = ClipLoss()

    views = None if itail is not None else (train_img if train_img.ndim == 3 else train_img[None])
    n_views = itail.views if itail is not None else len(views)
    owner = np.asarray(train_owner)
    n_img = len(itail) if itail is not None else views.shape[1]
    caps_of = [[] for _ in range(n_img)]
    for t, i in enumerate(owner):
        caps_of[i].append(t)
    k = max(1, int(cfg.captions_per_step))
    steps_per_epoch = math.ceil(n_img / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs

    def lr_at(step):
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)))

    device = model.logit_scale.device  # the heads train where the model is (CUDA when there is one)
    img_t = itail if itail is not None else torch.from_numpy(np.ascontiguousarray(views, dtype=np.float32)).to(device)
    txt_t = (tail if tail is not None
             else torch.from_numpy(np.ascontiguousarray(train_txt, dtype=np.float32)).to(device))
    history, best, best_state, bad_epochs, step = [], -1.0, None, 0, 0
    for epoch in range(cfg.epochs):
        vhead.train(), tproj.train()
        for t in (tail, itail):
            if t is not None:
                t.train()
        perm = rng.permutation(n_img)
        losses = []
        for b in range(steps_per_epoch):
            imgs = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            if len(imgs) < 2:
                continue
            if k == 1:
                caps = np.array([[caps_of[i][rng.integers(len(caps_of[i]))] for i in imgs]])
            else:  # (k, batch): k distinct captions of each image (repeats only if it has fewer)
                caps = np.array([rng.choice(caps_of[i], size=k, replace=len(caps_of[i]) < k) for i in imgs]).T
            view = rng.integers(n_views, size=len(imgs)) if n_views > 1 else np.zeros(len(imgs), np.int64)
            for group in opt.param_groups:
                group["lr"] = lr_at(step) * group["scale"]
            drop = lambda x: torch.nn.functional.dropout(x, cfg.feature_dropout)  # noqa: E731
            fi = torch.nn.functional.normalize(vhead(drop(img_t(view, imgs) if itail is not None
                                                          else img_t[view, imgs])), dim=-1)
            flat = caps.reshape(-1)
            pooled = txt_t(flat) if tail is not None else txt_t[flat]
            ft = torch.nn.functional.normalize(tproj(drop(pooled)), dim=-1).view(k, len(imgs), -1)
            scale = model.logit_scale.exp()
            loss = sum(loss_fn(fi, ft[j], scale) for j in range(k)) / k
            losses.append(_step(opt, loss, model))
            step += 1
        vhead.eval(), tproj.eval()
        for t in (tail, itail):
            if t is not None:
                t.train(False)
        r = recall_at_k(val_img.embed(vhead) if isinstance(val_img, ImageTail) else _embed(vhead, val_img),
                        val_txt.embed(tproj) if isinstance(val_txt, TextTail) else _embed(tproj, val_txt), val_owner)
        score = validation_score(r)
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val": r, "val_rsum": score,
                  "temperature": float(1 / model.logit_scale.detach().exp())}
        history.append(record)
        if on_epoch:
            on_epoch(record)
        if score > best:
            best, bad_epochs = score, 0
            best_state = copy.deepcopy({"v": vhead.state_dict(), "t": tproj.state_dict(),
                                        "s": model.logit_scale.detach().clone()})
            if tail is not None:
                best_state["layers"] = tail.state_dict()
            if itail is not None:
                best_state["image_layers"] = itail.state_dict()
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break
    if best_state is not None:
        vhead.load_state_dict(best_state["v"])
        tproj.load_state_dict(best_state["t"])
        with torch.no_grad():
            model.logit_scale.copy_(best_state["s"])
        if tail is not None:
            tail.load_state_dict(best_state["layers"])
        if itail is not None:
            itail.load_state_dict(best_state["image_layers"])
    return history


def cached_features(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Load features from ``path`` (.npy) or compute and save them atomically."""
    path = Path(path)
    if path.is_file():
        return np.load(path)
    feats = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")  # two runs filling one cache don't collide
    np.save(tmp, feats)
    tmp.replace(path)
    return feats


# ---- the product feature: `mmsearch train` ------------------------------------------------------
def _load_for_training(model_name: str, pretrained: str | None):
    """(model, preprocess, tokenizer, open_clip model config, preprocess config) of any model."""
    from . import models
    from .config import ModelRef

    if model_name in models.BUILTINS and pretrained is None:
        return (models.build(name=model_name), models.preprocess(model_name), models.tokenizer(),
                models.model_cfg(model_name), models.preprocess_config(model_name))
    import os

    import open_clip

    from .backends.torch_backend import load_open_clip

    model, preprocess, tokenizer = load_open_clip(ModelRef(model_name, pretrained), None)
    name = "local-dir:" + os.path.abspath(model_name) if os.path.isdir(model_name) else model_name
    config = open_clip.get_model_config(name)
    return model, preprocess, tokenizer, config, dict(getattr(model.visual, "preprocess_cfg", {}) or {})


def _tail_works(model, tokenizer, n: int) -> bool:
    """Whether TextTail reproduces this text tower's own output (so its last ``n`` layers can train
    on cached hidden states); checked on a few captions, to the precision of float16 storage."""
    import torch

    texts = ["a dog runs on the grass .", "two children play football in a park near the river", "a man"]
    try:
        with torch.inference_mode():
            layers = _text_layers(model.text.transformer)
            if not 0 < n <= len(layers):
                return False
            hidden, mask = text_hidden_states(model, tokenizer, texts, len(layers) - n)
            got = TextTail(model, hidden, mask, n)(np.arange(len(texts))).float().cpu().numpy()
        want = text_tower_features(model, tokenizer, texts)
        return bool(np.abs(got - want).max() <= 2e-2 * max(1.0, float(np.abs(want).max())))
    except Exception:  # any architecture TextTail cannot drive: train end to end instead
        return False


def _image_tail_shape(model, n: int) -> tuple[int, ...] | None:
    """The shape (C, H, W) of the maps ``ImageTail`` needs to train this image trunk's last ``n``
    layer groups, or None when it cannot: not an EfficientNet-style trunk, not the same parameters
    as open_clip unlocks (call after ``_lock_towers``), or not the trunk's own output on a test input."""
    import torch

    try:
        trunk = model.visual.trunk
        tail = ImageTail(model, np.zeros((1, 1, 1, 1), np.float16), n)
        if {id(p) for p in tail.parameters()} != {id(p) for p in trunk.parameters() if p.requires_grad}:
            return None
        device = next(trunk.parameters()).device
        x = torch.randn(2, 3, *_pair(model.visual.image_size), generator=torch.Generator().manual_seed(0))
        start = ImageTail.first_block(model, n)
        with torch.inference_mode():
            want = trunk.eval()(x.to(device)).float().cpu().numpy()
            maps = _maps(trunk, x.to(device), [start])[start].half().cpu().numpy()
            got = ImageTail(model, maps, n)(0, np.arange(2)).float().cpu().numpy()
        if np.abs(got - want).max() > 2e-2 * max(1.0, float(np.abs(want).max())):
            return None
        return tuple(maps.shape[1:])
    except Exception:  # any trunk ImageTail cannot drive: train end to end instead
        return None


def _cacheable(model) -> bool:
    """Both towers can be run once and cached: a timm image trunk + head and an HF text tower."""
    from open_clip.hf_model import HFTextEncoder

    return hasattr(model.visual, "trunk") and hasattr(model.visual, "head") and isinstance(model.text, HFTextEncoder)


def _counter(report: Callable[[str, int, int], None] | None, name: str, total: int) -> Callable[[int], None]:
    """A progress callback taking increments, reporting (name, done, total)."""
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if report:
            report(name, done, total)

    return step


def _train_mode(model) -> None:
    """Training mode, except BatchNorm layers: their running statistics stay as pretrained (small
    fine-tuning batches would only make them noisier)."""
    import torch

    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


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

    from . import models

    paths = tuple(os.path.abspath(x) if x and os.path.exists(x) else x for x in (model_name, pretrained))
    return (*paths, models.fingerprint(model_name, pretrained))


def _cache_key(*parts) -> str:
    import hashlib

    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


@_own_rng
def _end_to_end(model, preprocess, tokenizer, train_pairs, val_pairs, cfg: TrainConfig,
                on_epoch: Callable[[dict], None] | None) -> list[dict]:
    """InfoNCE over the unlocked parameters, images decoded every step (GPU: bf16 autocast)."""
    import torch
    from open_clip.loss import ClipLoss

    from .evaluate import evaluate
    from .media import load_image

    device = next(model.parameters()).device
    heads = {id(p) for m in (getattr(model.visual, "head", None), getattr(model.text, "proj", None)) if m is not None
             for p in m.parameters()} | {id(model.logit_scale)}
    for name in ("proj", "text_projection"):  # CLIP-style towers keep their projections as parameters
        for owner in (model, model.visual):
            if isinstance(getattr(owner, name, None), torch.nn.Parameter):
                heads.add(id(getattr(owner, name)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([
        {"params": [p for p in trainable if id(p) in heads], "lr": cfg.lr},
        {"params": [p for p in trainable if id(p) not in heads], "lr": cfg.lr * cfg.tower_lr_scale},
    ], weight_decay=cfg.weight_decay)
    loss_fn = ClipLoss()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)

    class _Enc:  # the encoder interface `evaluate` needs, over the model being trained
        name, batch_size = "training", 32
        dim = None

        @staticmethod
        def embed_images(paths):
            with torch.no_grad():
                x = torch.stack([preprocess(load_image(p)) for p in paths]).to(device)
                return torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1).cpu().numpy()

        @staticmethod
        def embed_texts(texts):
            with torch.no_grad():
                out = [model.encode_text(tokenizer(list(texts[i:i + 256])).to(device)).float()
                       for i in range(0, len(texts), 256)]
                return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu().numpy()

    history, best, best_state, bad = [], -1.0, None, 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for epoch in range(cfg.epochs):
        _train_mode(model)
        perm = rng.permutation(len(train_pairs))
        losses = []
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            if len(idx) < 2:
                continue
            images = torch.stack([preprocess(load_image(train_pairs.images[i])) for i in idx]).to(device)
            caps = [train_pairs.captions[i][rng.integers(len(train_pairs.captions[i]))] for i in idx]
            with autocast:
                fi = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
                ft = torch.nn.functional.normalize(model.encode_text(tokenizer(caps).to(device)), dim=-1)
                loss = loss_fn(fi, ft, model.logit_scale.exp())
            losses.append(_step(opt, loss, model))
        model.eval()
        r = evaluate(_Enc, val_pairs)
        score = validation_score(r)
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val": {k: r[k] for k in ("t2i", "i2t")},
                  "val_rsum": score}
        history.append(record)
        if on_epoch:
            on_epoch(record)
        if score > best:
            best, bad = score, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history


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

    import torch

    from . import models
    from .config import DEFAULT_MODEL

    _check_sizes(train_pairs, val_pairs)
    t0 = time.time()
    model_name = model_name or DEFAULT_MODEL
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, preprocess, tokenizer, model_config, pp_cfg = _load_for_training(model_name, pretrained)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    cached = _cacheable(model)
    if cached:
        n_layers = len(_text_layers(model.text.transformer))
        unlock_text = min(unlock_text, n_layers)
        cached = unlock_text == 0 or _tail_works(model, tokenizer, unlock_text)
    _lock_towers(model, unlock_image, unlock_text)
    if cached and unlock_image:  # unlocked image layers train on cached maps when they fit in memory
        shape = _image_tail_shape(model, unlock_image)
        views = len(train_views(cfg))
        cached = shape is not None and (
            2 * math.prod(shape) * (len(train_pairs) * views + len(val_pairs)) <= MAX_CACHED_MAPS_BYTES)
    if cached:
        cache = Path(cache_dir or Path.home() / ".cache" / "mmsearch" / "features")
        feats, used = [], []
        model_key = _model_identity(model_name, pretrained)
        for name, pairs in (("train", train_pairs), ("val", val_pairs)):
            stamp = [(p, *_stat(p)) for p in pairs.images]
            first = ImageTail.first_block(model, unlock_image) if unlock_image else None
            kind = f"img-b{first}" if unlock_image else "img"  # maps entering the unlocked blocks, or pooled

            def features(paths, view="orig", label=name):
                count = _counter(on_progress, label, len(paths))
                if unlock_image:
                    return image_trunk_maps(model, preprocess, paths, [first], view=view, progress=count)[0]
                return image_tower_features(model, preprocess, paths, view=view, progress=count)

            img = cached_features(cache / f"{kind}-{_cache_key(model_key, stamp)}.npy", lambda: features(pairs.images))
            pairs_all = pairs
            bad = np.isnan(img.reshape(len(img), -1)).any(1)
            pairs, keep = usable_images(pairs, on_skip=on_skip, bad=np.flatnonzero(bad))
            img = img[keep]
            extra = train_views(cfg)[1:] if name == "train" else ()  # validation sees the images as they are
            if extra:
                img = np.stack([img] + [cached_features(
                    cache / f"{kind}-{view}-{_cache_key(model_key, stamp)}.npy",
                    lambda: features(pairs_all.images, view, f"train, {view}"))[keep] for view in extra])
            if unlock_image:
                img = ImageTail(model, img, unlock_image)
            texts, owner = pairs.flat()
            if unlock_text:  # hidden states below the unlocked layers, cached; those layers train
                start = n_layers - unlock_text
                key = _cache_key(model_key, texts)
                hidden_file, mask_file = cache / f"txt-h{start}-{key}.npy", cache / f"txt-mask-{key}.npy"
                if not (hidden_file.is_file() and mask_file.is_file()):
                    hidden, mask = text_hidden_states(model, tokenizer, texts, start)
                    cached_features(mask_file, lambda: mask)
                    cached_features(hidden_file, lambda: hidden)
                    del hidden
                txt = TextTail(model, np.load(hidden_file, mmap_mode="r"), np.load(mask_file), unlock_text)
            else:
                txt = cached_features(cache / f"txt-{_cache_key(model_key, texts)}.npy",
                                      lambda: text_tower_features(model, tokenizer, texts))
            feats.append((img, txt, owner))
            used.append(pairs)
        train_pairs, val_pairs = used
        _check_sizes(train_pairs, val_pairs)
        history = train_heads(model, *feats[0], *feats[1], cfg=cfg, on_epoch=on_epoch,
                              reset=False)
    else:
        train_pairs, _ = usable_images(train_pairs, on_skip=on_skip)
        val_pairs, _ = usable_images(val_pairs, on_skip=on_skip)
        _check_sizes(train_pairs, val_pairs)
        history = _end_to_end(model, preprocess, tokenizer, train_pairs, val_pairs, cfg, on_epoch)
    best = max(history, key=lambda r: r["val_rsum"])
    model = model.cpu().eval()
    out_dir = Path(out_dir)
    models.save_open_clip_folder(model, out_dir, model_config=model_config,
                                 hf_tokenizer=tokenizer if hasattr(tokenizer, "tokenizer") else None,
                                 preprocess_cfg=pp_cfg or None)
    record = {
        "base_model": model_name, "pretrained": pretrained,
        "mode": ", ".join(["image layers on cached maps" if unlock_image else "cached image tower",
                           "text layers on cached states" if unlock_text else "cached text tower"]
                          ).replace("cached image tower, cached text tower", "cached towers")
                if cached else "end to end",
        "unlock_image": unlock_image, "unlock_text": unlock_text,
        "n_train_images": len(train_pairs), "n_val_images": len(val_pairs), "device": str(device),
        "train_config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "best_epoch": best["epoch"], "best_val": best["val"], "history": history,
        "seconds": round(time.time() - t0, 1),
    }
    bank_file = out_dir / BANK_FILE
    bank_file.unlink(missing_ok=True)  # an earlier run's bank belongs to other weights
    if cfg.query_bank:  # the trained model's own query bank, for the hubness correction of its searches
        from .encoder import Encoder

        t1 = time.time()
        bank = build_query_bank(Encoder(str(out_dir), device=str(device), backend="torch"), train_pairs, val_pairs,
                                max_items=cfg.query_bank, seed=cfg.seed, weights=models.fingerprint(str(out_dir)))
        bank.save(bank_file)
        record["query_bank"] = dict(bank.settings(), seconds=round(time.time() - t1, 1))
    (out_dir / "mmsearch_train.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record
