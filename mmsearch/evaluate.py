"""Retrieval evaluation: recall@k of an encoder on image-caption pairs, optionally through an index.

Same encoder path as the CLI (``Encoder.embed_images`` / ``embed_texts``); metrics from
``mmsearch.metrics`` (CLIP_benchmark convention, ties against the query).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .config import IndexSpec
from .data import Pairs
from .encoder import embed_texts_with
from .errors import DataError
from .hubness import corrections, rerank
from .index import VectorIndex, exact_knn
from .metrics import DEFAULT_KS, recall_at_k, text_to_image_recall


def embed_pairs(encoder, pairs: Pairs, on_progress: Callable[[int, int], None] | None = None, lang: str = "auto"):
    """(image embeddings, text embeddings, text->image labels) of the pairs; ``lang`` picks the text
    tower (mmsearch.lang)."""
    texts, owner = pairs.flat()
    chunks, bs = [], encoder.batch_size
    for start in range(0, len(pairs.images), bs):
        chunks.append(encoder.embed_images(pairs.images[start : start + bs]))
        if on_progress:
            on_progress(min(start + bs, len(pairs.images)), len(pairs.images))
    img = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
    return img, embed_texts_with(encoder, texts, lang), np.asarray(owner, np.int64)


def _routes(encoder, texts: Sequence[str], lang: str) -> dict[str, int]:
    """How many of ``texts`` each text tower embeds under ``lang``."""
    routes = encoder.routes(texts, lang) if hasattr(encoder, "routes") else ["en"] * len(texts)
    return {tower: routes.count(tower) for tower in ("en", "multi")}


def compare_texts(encoder, pairs: Pairs, img: np.ndarray, other: Pairs, ks: Sequence[int], img_bias, lang: str) -> dict:
    """Text -> image recall of ``other``'s captions (the same photos described another way, e.g. a
    table's ``caption_en`` beside its ``caption``) over the photos of ``pairs``, ranked alike."""
    row = {path: i for i, path in enumerate(pairs.images)}
    texts, owner = [], []
    for path, caps in zip(other.images, other.captions):
        if path in row:
            texts += caps
            owner += [row[path]] * len(caps)
    if not texts:
        raise DataError("no caption of the comparison column belongs to an evaluated photo")
    t2i = text_to_image_recall(img, embed_texts_with(encoder, texts, lang), owner, ks, image_bias=img_bias)
    return {"t2i": t2i, "n_texts": len(texts), "towers": _routes(encoder, texts, lang)}


def hub_biases(bank, img: np.ndarray, txt: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The score corrections a search applies to these images (for text queries) and texts (for image
    queries) with this query bank, as ``recall_at_k`` takes them; (None, None) without a bank."""
    if bank is None:
        return None, None

    settings = bank.settings()
    return (corrections(bank.hubs(img, ["image"] * len(img)), ["image"] * len(img), "text", settings),
            corrections(bank.hubs(txt, ["text"] * len(txt)), ["text"] * len(txt), "image", settings))


def evaluate(
    encoder,
    pairs: Pairs,
    ks: Sequence[int] = DEFAULT_KS,
    via_index: IndexSpec | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    hubness: bool = True,
    lang: str = "auto",
    compare: tuple[str, Pairs] | None = None,
) -> dict:
    """Recall@k both ways: {"t2i": {k: r}, "i2t": {k: r}, "n_images", "n_texts"}, ranked as a search
    ranks: with the hubness correction of the encoder's query bank when it has one (``hubness``
    False: plain cosine). Then "plain" holds the recalls by plain cosine and "hubness" the settings.

    With ``via_index``, text->image is also answered by a faiss index built with that spec over the
    image embeddings: "via_index" holds its model recall (what a user of that index gets) and
    "ann_recall" the share of the exact top-k it returns (how much the index itself loses).
    """
    if len(pairs) == 0:
        raise DataError("no image-caption pairs to evaluate")
    img, txt, owner = embed_pairs(encoder, pairs, on_progress, lang)
    bank = getattr(encoder, "query_bank", None) if hubness else None
    img_bias, txt_bias = hub_biases(bank, img, txt)
    result = recall_at_k(img, txt, owner, ks, image_bias=img_bias, text_bias=txt_bias)
    if img_bias is not None or txt_bias is not None:
        plain = recall_at_k(img, txt, owner, ks)
        result["plain"] = {"t2i": plain["t2i"], "i2t": plain["i2t"]}
        result["hubness"] = bank.settings()
    result["model"] = encoder.name
    result["towers"] = _routes(encoder, pairs.flat()[0], lang)
    if compare is not None:
        result["compare"] = {compare[0]: compare_texts(encoder, pairs, img, compare[1], ks, img_bias, lang)}
    if via_index is not None:
        k = max(ks)
        vindex = VectorIndex.build(img, np.arange(len(img)), via_index)
        bias = img_bias if img_bias is not None else np.zeros(len(img), np.float32)
        if img_bias is None:
            _, approx = vindex.search(txt, k)
        else:
            _, approx = rerank(vindex.search, txt, k, len(img), lambda ids: bias[ids], 0.0)
        _, exact = exact_knn(txt, img, k, bias=bias)
        result["via_index"] = {
            "index": {"kind": vindex.kind, "params": vindex.params},
            "t2i": {int(kk): float(np.mean((approx[:, :kk] == owner[:, None]).any(1))) for kk in ks},
            # of the exact top-k (fewer than k when there are fewer images), the share the index returns
            "ann_recall": {int(kk): float(np.mean([len(set(a[:kk]) & set(e[:kk])) / min(kk, len(img))
                                                   for a, e in zip(approx, exact)])) for kk in ks},
        }
    return result
