"""recall_at_k against a naive, loop-based reference (ties counted against the query)."""

import numpy as np
import pytest

from mmsearch.metrics import recall_at_k


def naive_recall(img, txt, owner, ks=(1, 5, 10), image_bias=None, text_bias=None):
    sim = txt @ img.T
    ib = np.zeros(len(img)) if image_bias is None else image_bias
    tb = np.zeros(len(txt)) if text_bias is None else text_bias
    t2i = {k: 0 for k in ks}
    for t in range(len(txt)):
        true = sim[t, owner[t]] + ib[owner[t]]
        rank = sum(1 for i in range(len(img)) if i != owner[t] and sim[t, i] + ib[i] >= true)
        for k in ks:
            t2i[k] += rank < k
    i2t = {k: 0 for k in ks}
    for i in range(len(img)):
        mine = [t for t in range(len(txt)) if owner[t] == i]
        best = max(sim[t, i] + tb[t] for t in mine)
        rank = sum(1 for t in range(len(txt)) if owner[t] != i and sim[t, i] + tb[t] >= best)
        for k in ks:
            i2t[k] += rank < k
    return ({k: v / len(txt) for k, v in t2i.items()}, {k: v / len(img) for k, v in i2t.items()})


@pytest.mark.parametrize("seed,chunk", [(0, 2048), (1, 2048), (2, 7)])
def test_matches_naive_reference_with_several_captions_per_image(seed, chunk, monkeypatch):
    from mmsearch import metrics

    monkeypatch.setattr(metrics, "CHUNK", chunk)  # 7: queries in blocks that do not divide the sets
    rng = np.random.default_rng(seed)
    n_img, d = 40, 8
    img = rng.normal(size=(n_img, d)).astype(np.float32)
    owner = np.repeat(np.arange(n_img), rng.integers(1, 6, n_img))  # 1..5 captions each
    txt = (img[owner] + rng.normal(scale=1.5, size=(len(owner), d))).astype(np.float32)
    got = recall_at_k(img, txt, owner)
    t2i, i2t = naive_recall(img, txt, owner)
    assert got["t2i"] == pytest.approx(t2i)
    assert got["i2t"] == pytest.approx(i2t)
    assert got["n_images"] == n_img and got["n_texts"] == len(owner)
    assert 0 < got["t2i"][10] < 1  # a non-degenerate case


@pytest.mark.parametrize("seed", [0, 1])
def test_per_item_biases_match_the_naive_reference(seed, monkeypatch):
    """Hubness corrections: a bias per image (text->image) and per text (image->text) moves their ranks."""
    from mmsearch import metrics

    monkeypatch.setattr(metrics, "CHUNK", 7)
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(30, 8)).astype(np.float32)
    owner = np.repeat(np.arange(30), rng.integers(1, 6, 30))
    txt = (img[owner] + rng.normal(scale=1.5, size=(len(owner), 8))).astype(np.float32)
    ib = rng.normal(scale=2.0, size=30).astype(np.float32)
    tb = rng.normal(scale=2.0, size=len(owner)).astype(np.float32)
    got = recall_at_k(img, txt, owner, image_bias=ib, text_bias=tb)
    t2i, i2t = naive_recall(img, txt, owner, image_bias=ib, text_bias=tb)
    assert got["t2i"] == pytest.approx(t2i) and got["i2t"] == pytest.approx(i2t)
    assert got["t2i"] != recall_at_k(img, txt, owner)["t2i"]  # the biases changed something
    with pytest.raises(ValueError, match="image_bias must be 30 finite values"):
        recall_at_k(img, txt, owner, image_bias=ib[:5])


def test_ties_count_against_the_query():
    # constant embeddings: every candidate ties with the true one, so nothing is found at k < n
    img = np.ones((20, 4), np.float32)
    txt = np.ones((20, 4), np.float32)
    r = recall_at_k(img, txt, np.arange(20))
    assert r["t2i"] == {1: 0.0, 5: 0.0, 10: 0.0}
    assert r["i2t"] == {1: 0.0, 5: 0.0, 10: 0.0}


def test_known_tiny_case_by_hand():
    # 3 images on the axes; texts: t0 -> image 0 exactly, t1 (of image 1) closest to image 2,
    # t2 and t3 belong to image 2; t2 points at image 0, t3 at image 2.
    img = np.eye(3, dtype=np.float32)
    txt = np.array([[1, 0, 0], [0, 0.4, 0.9], [0.9, 0, 0.1], [0, 0, 1]], np.float32)
    owner = [0, 1, 2, 2]
    r = recall_at_k(img, txt, owner, ks=(1, 2))
    # t2i ranks: t0 -> 0, t1 -> 1 (image 2 above), t2 -> 1 (image 0 above), t3 -> 0
    assert r["t2i"] == {1: 0.5, 2: 1.0}
    # i2t: image 0 scores t0=1, t2=.9 -> own best t0 rank 0; image 1 scores t1=.4 best own, no other
    # text > 0.4 on axis 1 -> rank 0; image 2: own best t3=1 -> rank 0
    assert r["i2t"] == {1: 1.0, 2: 1.0}


def test_bad_labels_are_errors():
    img = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="labels"):
        recall_at_k(img, img, [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        recall_at_k(img, img, [0, 1, 3])
    with pytest.raises(ValueError, match="without any caption"):
        recall_at_k(img, img[:2], [0, 1])


def test_nan_embeddings_are_refused():
    img = np.eye(3, dtype=np.float32)
    txt = img.copy()
    txt[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(img, txt, [0, 1, 2])
