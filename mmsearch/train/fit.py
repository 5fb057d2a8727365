"""The InfoNCE training loops: one epoch loop with early stopping (``Trainer.fit``), run by the heads
trainer on cached tower features (``train_heads``) and by the end-to-end trainer on decoded images."""

from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import numpy as np

from ..config import TrainConfig
from ..evaluate import evaluate
from ..media import load_image
from ..metrics import recall_at_k
from .tails import ImageTail, TextTail


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


def _train_mode(model) -> None:
    """Training mode, except BatchNorm layers: their running statistics stay as pretrained (small
    fine-tuning batches would only make them noisier)."""
    import torch

    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


class Trainer:
    """One training run: ``fit`` runs epochs of ``train_epoch`` until ``patience`` epochs in a row bring
    no better validation score, then restores the best epoch's ``snapshot``. Subclasses hold the run's
    state (model, optimiser, data, random generator) and define these steps."""

    def set_mode(self, training: bool) -> None:
        raise NotImplementedError

    def train_epoch(self) -> list[float]:
        """One pass over the training data; the loss of each step."""
        raise NotImplementedError

    def validate(self) -> dict:
        """{"val": recalls, "val_rsum": the score epochs are compared by, ...}: the epoch's record."""
        raise NotImplementedError

    def snapshot(self):
        """A copy of the weights being trained."""
        raise NotImplementedError

    def restore(self, state) -> None:
        raise NotImplementedError

    def fit(self, epochs: int, patience: int, on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
        """Train; the weights of the best validation epoch are kept. Returns the per-epoch records."""
        history, best, best_state, bad_epochs = [], -1.0, None, 0
        for epoch in range(epochs):
            self.set_mode(True)
            losses = self.train_epoch()
            self.set_mode(False)
            record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), **self.validate()}
            history.append(record)
            if on_epoch:
                on_epoch(record)
            if record["val_rsum"] > best:
                best, bad_epochs, best_state = record["val_rsum"], 0, self.snapshot()
            else:
                bad_epochs += 1
                if bad_epochs >= patience:
                    break
        if best_state is not None:
            self.restore(best_state)
        return history


# ---- heads (and tails) on cached tower features ---------------------------------------------------
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
    ``train_img`` / ``train_txt`` may be an ``ImageTail`` / ``TextTail`` (``val_*`` too): their
    layers then train with the heads, at ``cfg.tower_lr_scale`` times the learning rate.
    The model is left with the heads of the best validation epoch; returns the per-epoch history.
    ``reset=False`` fine-tunes the heads the model already has instead of starting from scratch.
    """
    trainer = _HeadTrainer(model, train_img, train_txt, train_owner, (val_img, val_txt, val_owner), cfg, reset)
    return trainer.fit(cfg.epochs, cfg.patience, on_epoch)


class _HeadTrainer(Trainer):
    """The state of ``train_heads``: heads, tails, optimiser, the training features on the model's
    device, which captions belong to which image, the step count of the learning-rate schedule."""

    def __init__(self, model, train_img, train_txt, train_owner, val: tuple, cfg: TrainConfig, reset: bool):
        import torch
        from open_clip.loss import ClipLoss

        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.model, self.cfg, self.val = model, cfg, val
        self.vhead, self.tproj = model.visual.head, model.text.proj
        if reset:
            self._reset_heads()
        self.text_tail = train_txt if isinstance(train_txt, TextTail) else None
        self.image_tail = train_img if isinstance(train_img, ImageTail) else None
        self.opt = torch.optim.AdamW(self._param_groups(), lr=cfg.lr)
        self.loss_fn = ClipLoss()
        self._load_features(train_img, train_txt, train_owner)
        self.k = max(1, int(cfg.captions_per_step))
        self.steps_per_epoch = math.ceil(self.n_img / cfg.batch_size)
        self.total = self.steps_per_epoch * cfg.epochs
        self.step = 0

    def _reset_heads(self) -> None:
        import torch

        for module in (self.vhead, self.tproj):
            for layer in module.modules():
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
        with torch.no_grad():
            self.model.logit_scale.fill_(math.log(1 / self.cfg.init_temperature))

    def _param_groups(self) -> list[dict]:
        """Heads with weight decay on matrices; unlocked tower layers: small steps for pretrained weights."""
        cfg = self.cfg
        params = list(self.vhead.parameters()) + list(self.tproj.parameters())
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay, "scale": 1.0},
                  {"params": [p for p in params if p.ndim < 2] + [self.model.logit_scale], "weight_decay": 0.0,
                   "scale": 1.0}]
        for tail in self.tails:
            groups += tail.param_groups(cfg.weight_decay, cfg.tower_lr_scale)
        return groups

    @property
    def tails(self) -> list:
        return [t for t in (self.text_tail, self.image_tail) if t is not None]

    def _load_features(self, train_img, train_txt, train_owner) -> None:
        """The training features as tensors on the model's device (or the tails), and each image's captions."""
        import torch

        device = self.model.logit_scale.device  # the heads train where the model is (CUDA when there is one)
        if self.image_tail is not None:
            self.img, self.n_views, self.n_img = self.image_tail, self.image_tail.views, len(self.image_tail)
        else:
            views = train_img if train_img.ndim == 3 else train_img[None]
            self.n_views, self.n_img = len(views), views.shape[1]
            self.img = torch.from_numpy(np.ascontiguousarray(views, dtype=np.float32)).to(device)
        self.txt = (self.text_tail if self.text_tail is not None
                    else torch.from_numpy(np.ascontiguousarray(train_txt, dtype=np.float32)).to(device))
        self.caps_of = [[] for _ in range(self.n_img)]
        for t, i in enumerate(np.asarray(train_owner)):
            self.caps_of[i].append(t)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 0 over the remaining steps."""
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, self.total - cfg.warmup_steps)))

    def set_mode(self, training: bool) -> None:
        self.vhead.train(training), self.tproj.train(training)
        for tail in self.tails:
            tail.train(training)

    def train_epoch(self) -> list[float]:
        perm = self.rng.permutation(self.n_img)
        size, losses = self.cfg.batch_size, []
        for b in range(self.steps_per_epoch):
            imgs = perm[b * size : (b + 1) * size]
            if len(imgs) < 2:
                continue
            losses.append(self._train_step(imgs))
            self.step += 1
        return losses

    def _train_step(self, imgs: np.ndarray) -> float:
        """One InfoNCE step on these images, a random view of each and ``k`` random captions of each."""
        import torch

        k, rng, caps_of = self.k, self.rng, self.caps_of
        if k == 1:
            caps = np.array([[caps_of[i][rng.integers(len(caps_of[i]))] for i in imgs]])
        else:  # (k, batch): k distinct captions of each image (repeats only if it has fewer)
            caps = np.array([rng.choice(caps_of[i], size=k, replace=len(caps_of[i]) < k) for i in imgs]).T
        view = rng.integers(self.n_views, size=len(imgs)) if self.n_views > 1 else np.zeros(len(imgs), np.int64)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step) * group["scale"]
        drop = lambda x: torch.nn.functional.dropout(x, self.cfg.feature_dropout)  # noqa: E731
        pixels = self.img(view, imgs) if self.image_tail is not None else self.img[view, imgs]
        fi = torch.nn.functional.normalize(self.vhead(drop(pixels)), dim=-1)
        flat = caps.reshape(-1)
        pooled = self.txt(flat) if self.text_tail is not None else self.txt[flat]
        ft = torch.nn.functional.normalize(self.tproj(drop(pooled)), dim=-1).view(k, len(imgs), -1)
        scale = self.model.logit_scale.exp()
        loss = sum(self.loss_fn(fi, ft[j], scale) for j in range(k)) / k
        return _step(self.opt, loss, self.model)

    def validate(self) -> dict:
        val_img, val_txt, val_owner = self.val
        r = recall_at_k(val_img.embed(self.vhead) if isinstance(val_img, ImageTail) else _embed(self.vhead, val_img),
                        val_txt.embed(self.tproj) if isinstance(val_txt, TextTail) else _embed(self.tproj, val_txt),
                        val_owner)
        return {"val": r, "val_rsum": validation_score(r),
                "temperature": float(1 / self.model.logit_scale.detach().exp())}

    def snapshot(self) -> dict:
        state = copy.deepcopy({"v": self.vhead.state_dict(), "t": self.tproj.state_dict(),
                               "s": self.model.logit_scale.detach().clone()})
        if self.text_tail is not None:
            state["layers"] = self.text_tail.state_dict()
        if self.image_tail is not None:
            state["image_layers"] = self.image_tail.state_dict()
        return state

    def restore(self, state: dict) -> None:
        import torch

        self.vhead.load_state_dict(state["v"])
        self.tproj.load_state_dict(state["t"])
        with torch.no_grad():
            self.model.logit_scale.copy_(state["s"])
        if self.text_tail is not None:
            self.text_tail.load_state_dict(state["layers"])
        if self.image_tail is not None:
            self.image_tail.load_state_dict(state["image_layers"])


# ---- end to end, on decoded images ----------------------------------------------------------------
@_own_rng
def _end_to_end(model, preprocess, tokenizer, train_pairs, val_pairs, cfg: TrainConfig,
                on_epoch: Callable[[dict], None] | None) -> list[dict]:
    """InfoNCE over the unlocked parameters, images decoded every step (GPU: bf16 autocast)."""
    trainer = _EndToEndTrainer(model, preprocess, tokenizer, train_pairs, val_pairs, cfg)
    return trainer.fit(cfg.epochs, cfg.patience, on_epoch)


class _TrainingEncoder:
    """The encoder interface ``evaluate`` needs, over the model being trained."""

    name, batch_size, dim = "training", 32, None

    def __init__(self, model, preprocess, tokenizer, device):
        self.model, self.preprocess, self.tokenizer, self.device = model, preprocess, tokenizer, device

    def embed_images(self, paths):
        import torch


        with torch.no_grad():
            x = torch.stack([self.preprocess(load_image(p)) for p in paths]).to(self.device)
            return torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1).cpu().numpy()

    def embed_texts(self, texts):
        import torch

        with torch.no_grad():
            out = [self.model.encode_text(self.tokenizer(list(texts[i:i + 256])).to(self.device)).float()
                   for i in range(0, len(texts), 256)]
            return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu().numpy()


class _EndToEndTrainer(Trainer):
    """The state of ``_end_to_end``: the model with its unlocked layers, the optimiser (heads at
    ``cfg.lr``, tower layers at ``cfg.tower_lr_scale`` times it), the pairs, the random generator."""

    def __init__(self, model, preprocess, tokenizer, train_pairs, val_pairs, cfg: TrainConfig):
        import torch
        from open_clip.loss import ClipLoss

        self.model, self.preprocess, self.tokenizer, self.cfg = model, preprocess, tokenizer, cfg
        self.train_pairs, self.val_pairs = train_pairs, val_pairs
        self.device = next(model.parameters()).device
        heads = self._head_ids()
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW([
            {"params": [p for p in trainable if id(p) in heads], "lr": cfg.lr},
            {"params": [p for p in trainable if id(p) not in heads], "lr": cfg.lr * cfg.tower_lr_scale},
        ], weight_decay=cfg.weight_decay)
        self.loss_fn = ClipLoss()
        self.rng = np.random.default_rng(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.encoder = _TrainingEncoder(model, preprocess, tokenizer, self.device)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))

    def _head_ids(self) -> set[int]:
        """ids of the projection heads' parameters and the temperature."""
        import torch

        model = self.model
        heads = {id(p) for m in (getattr(model.visual, "head", None), getattr(model.text, "proj", None))
                 if m is not None for p in m.parameters()} | {id(model.logit_scale)}
        for name in ("proj", "text_projection"):  # CLIP-style towers keep their projections as parameters
            for owner in (model, model.visual):
                if isinstance(getattr(owner, name, None), torch.nn.Parameter):
                    heads.add(id(getattr(owner, name)))
        return heads

    def set_mode(self, training: bool) -> None:
        if training:
            _train_mode(self.model)
        else:
            self.model.eval()

    def train_epoch(self) -> list[float]:
        import torch


        pairs, model, rng = self.train_pairs, self.model, self.rng
        perm = rng.permutation(len(pairs))
        losses = []
        for start in range(0, len(perm), self.cfg.batch_size):
            idx = perm[start:start + self.cfg.batch_size]
            if len(idx) < 2:
                continue
            images = torch.stack([self.preprocess(load_image(pairs.images[i])) for i in idx]).to(self.device)
            caps = [pairs.captions[i][rng.integers(len(pairs.captions[i]))] for i in idx]
            with self.autocast:
                fi = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
                ft = torch.nn.functional.normalize(model.encode_text(self.tokenizer(caps).to(self.device)), dim=-1)
                loss = self.loss_fn(fi, ft, model.logit_scale.exp())
            losses.append(_step(self.opt, loss, model))
        return losses

    def validate(self) -> dict:
        r = evaluate(self.encoder, self.val_pairs)
        return {"val": {k: r[k] for k in ("t2i", "i2t")}, "val_rsum": validation_score(r)}

    def snapshot(self) -> dict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state)
