"""Building a trained model's query bank: embeddings of its training pairs, calibrated on validation
pairs (``hubness.calibrate``), for the hubness correction of its searches."""

from __future__ import annotations

import numpy as np

from ..evaluate import embed_pairs
from ..hubness import QueryBank, calibrate


def build_query_bank(encoder, bank_pairs, val_pairs, max_items: int = 2000, seed: int = 0,
                     weights: str | None = None, val_embedded: tuple | None = None) -> QueryBank:
    """A calibrated QueryBank for ``encoder``: at most ``max_items`` images of ``bank_pairs`` (training
    pairs) and one caption of each as the banks, ``val_pairs`` to choose the settings
    (``val_embedded``: their ``evaluate.embed_pairs`` result, when the caller has it already)."""

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(bank_pairs.images), min(max_items, len(bank_pairs.images)), replace=False))
    images = [bank_pairs.images[i] for i in pick]
    captions = [bank_pairs.captions[i][rng.integers(len(bank_pairs.captions[i]))] for i in pick]
    bank_img = encoder.embed_images(images)
    bank_txt = encoder.embed_texts(captions)
    val_img, val_txt, owner = val_embedded if val_embedded is not None else embed_pairs(encoder, val_pairs)
    return calibrate(val_img, val_txt, owner, bank_img, bank_txt, weights=weights)
