"""InfoNCE training of the projection heads on cached features of locked towers (LiT recipe).

With both towers locked, their outputs (pooled image features, pooled text features) are computed
once and cached; training then only runs the small heads, seconds to minutes on a CPU. The loss is
open_clip's ``ClipLoss`` with a learnable temperature.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ._util import batched, prefetch_map
from .config import TrainConfig
from .metrics import recall_at_k


# ---- tower features (what is cached) ----------------------------------------------------------
def image_tower_features(model, preprocess, paths: Sequence[str], batch_size: int = 64,
                         progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Pooled image-trunk features (n, C) of a timm image tower, before its projection head."""
    import torch

    from .media import load_image

    def load_batch(chunk):
        return torch.stack([preprocess(load_image(p)) for p in chunk])

    trunk = model.visual.trunk.eval().to(memory_format=torch.channels_last)
    out = []
    with torch.inference_mode():
        for pixels in prefetch_map(load_batch, batched(list(paths), batch_size)):
            out.append(trunk(pixels.contiguous(memory_format=torch.channels_last)).float().numpy())
            if progress:
                progress(len(pixels))
    return np.concatenate(out) if out else np.zeros((0, trunk.num_features), np.float32)


def text_tower_features(model, tokenizer, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Pooled HF text-tower features (n, C), before the projection."""
    import torch

    text = model.text.eval()
    pad = text.config.pad_token_id
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), text.config.hidden_size), np.float32)
    with torch.inference_mode():
        for idx in batched(order, batch_size):
            ids = tokenizer([texts[i] for i in idx])
            mask = ids != pad
            ids = ids[:, : int(mask.any(0).nonzero().max()) + 1]
            mask = (ids != pad).long()
            pooled = text.pooler(text.transformer(input_ids=ids, attention_mask=mask), mask)
            out[list(idx)] = pooled.float().numpy()
    return out


# ---- head training ---------------------------------------------------------------------------
def _embed(head, feats, batch: int = 4096) -> np.ndarray:
    import torch

    with torch.no_grad():
        outs = [head(torch.from_numpy(feats[i : i + batch])) for i in range(0, len(feats), batch)]
        x = torch.nn.functional.normalize(torch.cat(outs), dim=-1)
    return x.numpy()


def validation_score(r: dict) -> float:
    """Sum of recall@1/5/10 in both directions (rsum), the usual model-selection criterion."""
    return sum(r["t2i"].values()) + sum(r["i2t"].values())


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
) -> list[dict]:
    """Train ``model.visual.head``, ``model.text.proj`` and ``model.logit_scale`` with InfoNCE.

    Features are tower outputs (``image_tower_features`` / ``text_tower_features``);
    ``train_owner[t]`` is the image index of caption t. Each step draws a batch of distinct images
    with one random caption each (no duplicate image inside a batch, so no false negatives).
    The model is left with the heads of the best validation epoch; returns the per-epoch history.
    """
    import torch
    from open_clip.loss import ClipLoss

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vhead, tproj = model.visual.head, model.text.proj
    for module in (vhead, tproj):
        for layer in module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / cfg.init_temperature))
    params = list(vhead.parameters()) + list(tproj.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2] + [model.logit_scale]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    loss_fn = ClipLoss()

    owner = np.asarray(train_owner)
    caps_of = [[] for _ in range(len(train_img))]
    for t, i in enumerate(owner):
        caps_of[i].append(t)
    n_img = len(train_img)
    steps_per_epoch = math.ceil(n_img / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs

    def lr_at(step):
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)))

    img_t = torch.from_numpy(np.ascontiguousarray(train_img, dtype=np.float32))
    txt_t = torch.from_numpy(np.ascontiguousarray(train_txt, dtype=np.float32))
    history, best, best_state, bad_epochs, step = [], -1.0, None, 0, 0
    for epoch in range(cfg.epochs):
        vhead.train(), tproj.train()
        perm = rng.permutation(n_img)
        losses = []
        for b in range(steps_per_epoch):
            imgs = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            if len(imgs) < 2:
                continue
            caps = [caps_of[i][rng.integers(len(caps_of[i]))] for i in imgs]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            drop = lambda x: torch.nn.functional.dropout(x, cfg.feature_dropout)  # noqa: E731
            fi = torch.nn.functional.normalize(vhead(drop(img_t[imgs])), dim=-1)
            ft = torch.nn.functional.normalize(tproj(drop(txt_t[caps])), dim=-1)
            loss = loss_fn(fi, ft, model.logit_scale.exp())
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(float(loss.detach()))
            step += 1
        vhead.eval(), tproj.eval()
        r = recall_at_k(_embed(vhead, val_img), _embed(tproj, val_txt), val_owner)
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
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break
    if best_state is not None:
        vhead.load_state_dict(best_state["v"])
        tproj.load_state_dict(best_state["t"])
        with torch.no_grad():
            model.logit_scale.copy_(best_state["s"])
    return history


def cached_features(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Load features from ``path`` (.npy) or compute and save them atomically."""
    path = Path(path)
    if path.is_file():
        return np.load(path)
    feats = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, feats)
    tmp.replace(path)
    return feats
