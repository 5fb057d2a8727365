"""Retrieval metrics (numpy only), CLIP_benchmark convention.

text->image: a caption hits at k if its own image is among the k best images.
image->text: an image hits at k if any of its captions is among the k best texts.
Ties count against the query: a candidate scoring exactly as much as the true match is ranked above
it, so tied (e.g. constant) embeddings never inflate recall.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)


CHUNK = 2048  # queries per block: memory stays O(CHUNK * n) however large the evaluation set


def _ranks_t2i(text_emb: np.ndarray, image_emb: np.ndarray, text_image: np.ndarray, image_bias=None) -> np.ndarray:
    """0-based rank of each text's own image (number of other images scoring >= it)."""
    out = np.empty(len(text_emb), np.int64)
    for s in range(0, len(text_emb), CHUNK):
        sim = text_emb[s : s + CHUNK] @ image_emb.T
        if image_bias is not None:
            sim += image_bias[None, :]
        true = sim[np.arange(sim.shape[0]), text_image[s : s + CHUNK]]
        out[s : s + CHUNK] = (sim >= true[:, None]).sum(axis=1) - 1  # the true image itself is counted once
    return out


def _ranks_i2t(text_emb: np.ndarray, image_emb: np.ndarray, text_image: np.ndarray, text_bias=None) -> np.ndarray:
    """0-based rank of each image's best caption (number of non-own texts scoring >= it)."""
    counts = np.bincount(text_image, minlength=len(image_emb))
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)[:5].tolist()
        raise ValueError(f"images without any caption (first: {missing}); every image needs one")
    out = np.empty(len(image_emb), np.int64)
    for s in range(0, len(image_emb), CHUNK):
        sim = image_emb[s : s + CHUNK] @ text_emb.T  # (chunk images, texts)
        if text_bias is not None:
            sim += text_bias[None, :]
        own = text_image[None, :] == np.arange(s, s + sim.shape[0])[:, None]
        best_own = np.where(own, sim, -np.inf).max(axis=1)
        out[s : s + CHUNK] = ((sim >= best_own[:, None]) & ~own).sum(axis=1)
    return out


def text_to_image_recall(image_emb: np.ndarray, text_emb: np.ndarray, text_image: Sequence[int],
                         ks: Sequence[int] = DEFAULT_KS, image_bias: np.ndarray | None = None) -> dict[int, float]:
    """Text -> image recall@k only ({k: r}): images need not all have a caption (a gallery with
    distractors), unlike ``recall_at_k``, which ranks both ways."""
    ranks = text_to_image_ranks(image_emb, text_emb, text_image, image_bias)
    return {int(k): float(np.mean(ranks < k)) for k in ks}


def text_to_image_ranks(image_emb: np.ndarray, text_emb: np.ndarray, text_image: Sequence[int],
                        image_bias: np.ndarray | None = None) -> np.ndarray:
    """Where each text's own image ranks among all images (0 = first), as ``text_to_image_recall`` counts."""
    return _ranks_t2i(np.asarray(text_emb, np.float32), np.asarray(image_emb, np.float32),
                      np.asarray(text_image, np.int64), None if image_bias is None else np.asarray(image_bias, np.float32))


def recall_at_k(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_image: Sequence[int],
    ks: Sequence[int] = DEFAULT_KS,
    image_bias: np.ndarray | None = None,
    text_bias: np.ndarray | None = None,
) -> dict:
    """Recall@k both ways for (n_images, d) and (n_texts, d) embeddings; ``text_image[t]`` is the
    index of text t's image. Returns {"t2i": {k: r}, "i2t": {k: r}, "n_images": .., "n_texts": ..}.

    ``image_bias`` (n_images,) / ``text_bias`` (n_texts,) are added to every score of that item when
    it is ranked for a query of the other modality (the hubness correction, mmsearch.hubness).
    """
    image_emb = np.asarray(image_emb, dtype=np.float32)
    text_emb = np.asarray(text_emb, dtype=np.float32)
    text_image = np.asarray(text_image, dtype=np.int64)
    if text_emb.shape[0] != text_image.shape[0]:
        raise ValueError(f"{text_emb.shape[0]} texts but {text_image.shape[0]} text->image labels")
    if text_image.size and (text_image.min() < 0 or text_image.max() >= image_emb.shape[0]):
        raise ValueError("text->image labels out of range of the image embeddings")
    if not (np.isfinite(image_emb).all() and np.isfinite(text_emb).all()):
        raise ValueError("embeddings contain NaN or inf: recall would be meaningless")
    biases = []
    for bias, n, what in ((image_bias, len(image_emb), "image"), (text_bias, len(text_emb), "text")):
        if bias is not None:
            bias = np.asarray(bias, dtype=np.float32)
            if bias.shape != (n,) or not np.isfinite(bias).all():
                raise ValueError(f"{what}_bias must be {n} finite values, one per {what}")
        biases.append(bias)
    r_t2i = _ranks_t2i(text_emb, image_emb, text_image, biases[0])
    r_i2t = _ranks_i2t(text_emb, image_emb, text_image, biases[1])
    return {
        "t2i": {int(k): float(np.mean(r_t2i < k)) for k in ks},
        "i2t": {int(k): float(np.mean(r_i2t < k)) for k in ks},
        "n_images": int(image_emb.shape[0]),
        "n_texts": int(text_emb.shape[0]),
    }
