"""Train the multilingual query head of a built-in model (``mmsearch.multilingual.QueryHead``).

The sentence encoder (USE multilingual v3) stays frozen; only the head learns, on Flickr8k *train*
captions (English: no translated training data exists here). Two losses, as multilingual CLIP text
towers were distilled (Carlsson et al. 2022): InfoNCE between the head's vectors and the model's own
image embeddings of the same photos, plus matching the model's English text tower on the same captions
(``1 - cos``, weighted by ``distill``). Because the encoder places a sentence and its translations
close together, a head that maps English sentences into the model's space maps the other languages
there too. Each candidate recipe is scored on *dev* captions searched against all dev photos with the
model's hubness correction (recall@5 + recall@10, text -> image); the best one ships.

Then the head gets its ``Pivot`` (``pivot_tensors``): the train captions' sentence features and the
English tower's vectors of them, blended into the head's answer by nearest neighbours; its setting
(k, temperature, weight) is chosen on the same dev captions the same way (``choose_pivot``).

Torch is imported inside the functions.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np

from ..metrics import text_to_image_recall
from ..multilingual import PivotSetting


@dataclass(frozen=True)
class HeadRecipe:
    """One candidate head and how it is trained."""

    hidden: int = 0  # width of the MLP beside the linear map; 0 = linear only
    tau: float = 0.05  # InfoNCE temperature
    distill: float = 0.3  # weight of matching the English tower (1 - cos) against InfoNCE's 1
    epochs: int = 30  # passes over the training photos, one random caption of each per pass
    lr: float = 1e-3  # peak learning rate (one-cycle schedule, AdamW)
    weight_decay: float = 1e-4
    batch: int = 256  # photos per step (distinct, so InfoNCE has no false negatives from shared photos)
    seed: int = 0


#: the recipes tried by default: linear vs MLP, two temperatures, two distillation weights
GRID = tuple(HeadRecipe(hidden=h, tau=t, distill=w) for h in (0, 1024) for t in (0.05, 0.1) for w in (0.3, 1.0))
#: the pivot settings tried: neighbours, softmax temperature, blend weight
PIVOT_GRID = tuple(PivotSetting(k, t, w) for k in (10, 30) for t in (0.02, 0.05) for w in (0.2, 0.3, 0.5))
PIVOT_DIM = 128  # principal directions the pivot's keys keep (int8: 128 bytes a caption)
DISTILL_SCALE = 10.0  # (1 - cos) is ~0.1 where InfoNCE is ~1: scaled so that distill 1.0 weighs them alike


@dataclass
class HeadData:
    """What training and choosing a head read: features, the model's embeddings, caption owners."""

    features: np.ndarray  # (n captions, 512) sentence-encoder features of the train captions
    text: np.ndarray  # (n captions, d) the model's English tower on the same captions
    images: np.ndarray  # (n photos, d) the model's image embeddings of the train photos
    owner: np.ndarray  # (n captions,) row of each caption's photo
    dev_features: np.ndarray  # dev captions chosen on (held-out photos' captions left out)
    dev_images: np.ndarray  # all dev photos (the gallery)
    dev_owner: np.ndarray
    dev_image_bias: np.ndarray | None  # the hubness correction of the dev photos, as a search applies it


def _modules(recipe: HeadRecipe, d_in: int, d_out: int):
    import torch

    skip = torch.nn.Linear(d_in, d_out)
    mlp = None
    if recipe.hidden:
        mlp = torch.nn.Sequential(torch.nn.Linear(d_in, recipe.hidden), torch.nn.GELU(approximate="tanh"),
                                  torch.nn.Linear(recipe.hidden, d_out))
    return skip, mlp


def _forward(skip, mlp, x):
    import torch

    z = skip(x) + (mlp(x) if mlp is not None else 0)
    return torch.nn.functional.normalize(z, dim=1)


def _steps(recipe: HeadRecipe, data: HeadData, rng: np.random.Generator):
    """Batches of (caption rows, photo rows): each pass visits every photo once, with one random caption."""
    by_photo = [np.flatnonzero(data.owner == i) for i in range(len(data.images))]
    per_pass = len(data.images) // recipe.batch
    for _ in range(recipe.epochs):
        order = rng.permutation(len(data.images))
        for b in range(per_pass):
            photos = order[b * recipe.batch:(b + 1) * recipe.batch]
            yield np.array([rng.choice(by_photo[p]) for p in photos]), photos


def train_head(recipe: HeadRecipe, data: HeadData) -> dict[str, np.ndarray]:
    """Train one head; its tensors, named as ``QueryHead`` reads them."""
    import torch

    torch.manual_seed(recipe.seed)
    skip, mlp = _modules(recipe, data.features.shape[1], data.images.shape[1])
    params = list(skip.parameters()) + (list(mlp.parameters()) if mlp is not None else [])
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    total = recipe.epochs * (len(data.images) // recipe.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=total, pct_start=0.1)
    feats, text, images = (torch.from_numpy(np.ascontiguousarray(a, np.float32))
                           for a in (data.features, data.text, data.images))
    ce = torch.nn.functional.cross_entropy
    for caps, photos in _steps(recipe, data, np.random.default_rng(recipe.seed)):
        z = _forward(skip, mlp, feats[caps])
        logits = z @ images[photos].T / recipe.tau
        labels = torch.arange(len(photos))
        loss = 0.5 * (ce(logits, labels) + ce(logits.T, labels))
        loss = loss + recipe.distill * DISTILL_SCALE * (1 - (z * text[caps]).sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    tensors = {"skip.weight": skip.weight, "skip.bias": skip.bias}
    if mlp is not None:
        tensors.update({"mlp.0.weight": mlp[0].weight, "mlp.0.bias": mlp[0].bias,
                        "mlp.2.weight": mlp[2].weight, "mlp.2.bias": mlp[2].bias})
    return {k: v.detach().numpy().copy() for k, v in tensors.items()}


def dev_recall(head, data: HeadData) -> dict[int, float]:
    """Text -> image recall@1/5/10 of the head's vectors of the dev captions over all dev photos,
    ranked as a search ranks them (with the hubness correction)."""
    q = head(data.dev_features)
    return text_to_image_recall(data.dev_images, q, data.dev_owner, (1, 5, 10), image_bias=data.dev_image_bias)


def choose_head(data: HeadData, grid: Sequence[HeadRecipe] = GRID,
                on_result: Callable[[HeadRecipe, dict], None] | None = None):
    """Train every recipe of ``grid``; (best tensors, best recipe, every recipe's dev recall)."""
    from ..multilingual import HeadInfo, QueryHead

    tried, best = [], None
    for recipe in grid:
        t0 = time.perf_counter()
        tensors = train_head(recipe, data)
        r = dev_recall(QueryHead(tensors, HeadInfo("", "", "", {})), data)
        row = {"recipe": asdict(recipe), "dev_t2i": r, "seconds": round(time.perf_counter() - t0, 1)}
        tried.append(row)
        if on_result:
            on_result(recipe, r)
        if best is None or r[5] + r[10] > best[2][5] + best[2][10]:
            best = (tensors, recipe, r)
    return best[0], best[1], tried


def _int8_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows -> (int8 rows, float32 (n, 1) scales) with x ~= int8 * scale."""
    scale = np.maximum(np.abs(x).max(1, keepdims=True), 1e-12) / 127.0
    return np.round(x / scale).astype(np.int8), scale.astype(np.float32)


def pivot_tensors(data: HeadData, dim: int = PIVOT_DIM) -> dict[str, np.ndarray]:
    """A ``Pivot``'s tensors from the train captions: their features centred and projected onto the
    top ``dim`` principal directions (unit rows, int8) as keys, the English tower's vectors as values."""
    mean = data.features.mean(0)
    _, _, vt = np.linalg.svd(data.features - mean, full_matrices=False)
    proj = np.ascontiguousarray(vt[:dim].T, np.float32)
    keys = (data.features - mean) @ proj
    keys /= np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    keys8, key_scale = _int8_rows(keys)
    values8, value_scale = _int8_rows(data.text)
    return {"pivot.mean": mean.astype(np.float32), "pivot.proj": proj, "pivot.keys": keys8,
            "pivot.key_scale": key_scale, "pivot.values": values8, "pivot.value_scale": value_scale}


def choose_pivot(tensors: dict[str, np.ndarray], info, data: HeadData, grid: Sequence[PivotSetting] = PIVOT_GRID):
    """Score a head without a pivot and with each setting of ``grid`` on dev (R@5 + R@10); (the best
    setting or None when no pivot beats the head alone, every row tried)."""
    from ..multilingual import QueryHead

    bare = {k: v for k, v in tensors.items() if not k.startswith("pivot.")}
    tried = [{"pivot": None, "dev_t2i": dev_recall(QueryHead(bare, info), data)}]
    best, score = None, tried[0]["dev_t2i"][5] + tried[0]["dev_t2i"][10]
    for setting in grid:
        r = dev_recall(QueryHead(tensors, replace(info, recipe={**info.recipe, "pivot": asdict(setting)})), data)
        tried.append({"pivot": asdict(setting), "dev_t2i": r})
        if r[5] + r[10] > score:
            best, score = setting, r[5] + r[10]
    return best, tried
