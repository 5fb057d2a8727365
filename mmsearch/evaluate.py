"""Retrieval evaluation: recall@k of an encoder on image-caption pairs, optionally through an index.

Same encoder path as the CLI (``Encoder.embed_images`` / ``embed_texts``); metrics from
``mmsearch.metrics`` (CLIP_benchmark convention, ties against the query).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .config import IndexSpec
from .data import Pairs
from .metrics import DEFAULT_KS, recall_at_k


def embed_pairs(encoder, pairs: Pairs, on_progress: Callable[[int, int], None] | None = None):
    """(image embeddings, text embeddings, text->image labels) of the pairs."""
    texts, owner = pairs.flat()
    chunks, bs = [], encoder.batch_size
    for start in range(0, len(pairs.images), bs):
        chunks.append(encoder.embed_images(pairs.images[start : start + bs]))
        if on_progress:
            on_progress(min(start + bs, len(pairs.images)), len(pairs.images))
    img = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
    return img, encoder.embed_texts(texts), np.asarray(owner, np.int64)


def evaluate(
    encoder,
    pairs: Pairs,
    ks: Sequence[int] = DEFAULT_KS,
    via_index: IndexSpec | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Recall@k both ways: {"t2i": {k: r}, "i2t": {k: r}, "n_images", "n_texts"}.

    With ``via_index``, text->image is also answered by a faiss index built with that spec over the
    image embeddings: "via_index" holds its model recall (what a user of that index gets) and
    "ann_recall" the share of the exact top-k it returns (how much the index itself loses).
    """
    if len(pairs) == 0:
        raise ValueError("no image-caption pairs to evaluate")
    img, txt, owner = embed_pairs(encoder, pairs, on_progress)
    result = recall_at_k(img, txt, owner, ks)
    result["model"] = encoder.name
    if via_index is not None:
        from .index import VectorIndex

        k = max(ks)
        vindex = VectorIndex.build(img, np.arange(len(img)), via_index)
        _, approx = vindex.search(txt, k)
        exact = np.concatenate([np.argsort(-(txt[s : s + 2048] @ img.T), axis=1, kind="stable")[:, :k]
                                for s in range(0, len(txt), 2048)])
        result["via_index"] = {
            "index": {"kind": vindex.kind, "params": vindex.params},
            "t2i": {int(kk): float(np.mean((approx[:, :kk] == owner[:, None]).any(1))) for kk in ks},
            # of the exact top-k (fewer than k when there are fewer images), the share the index returns
            "ann_recall": {int(kk): float(np.mean([len(set(a[:kk]) & set(e[:kk])) / min(kk, len(img))
                                                   for a, e in zip(approx, exact)])) for kk in ks},
        }
    return result
