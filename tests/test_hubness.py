"""Hubness correction (mmsearch.hubness) against naive references, on seeded synthetic vectors."""

import numpy as np
import pytest

from mmsearch.hubness import QueryBank, Side, calibrate, corrections, mean_topk, rerank
from mmsearch.metrics import recall_at_k


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_mean_topk_matches_a_loop(monkeypatch):
    from mmsearch import hubness

    monkeypatch.setattr(hubness, "CHUNK", 3)  # blocks that do not divide the items
    rng = np.random.default_rng(0)
    bank, emb = unit(rng.normal(size=(50, 6))), unit(rng.normal(size=(11, 6)))
    want = [np.mean(sorted(bank @ e)[-7:]) for e in emb]
    assert np.allclose(mean_topk(bank, emb, 7), want, atol=1e-6)
    assert np.allclose(mean_topk(bank, emb, 500), (emb @ bank.T).mean(1), atol=1e-6)  # k > bank: all of it


def exact_search(vectors):
    def search(q, depth):
        sim = q @ vectors.T
        order = np.argsort(-sim, axis=1, kind="stable")[:, :depth]
        return np.take_along_axis(sim, order, 1), order
    return search


@pytest.mark.parametrize("n,k", [(200, 10), (200, 1), (30, 50), (500, 100)])
def test_rerank_equals_scoring_everything(n, k):
    """Over-fetching by plain score and re-ranking gives the top k of all n corrected scores."""
    rng = np.random.default_rng(n + k)
    vectors, q = unit(rng.normal(size=(n, 16))), unit(rng.normal(size=(25, 16)))
    corr = rng.normal(scale=0.2, size=n).astype(np.float32)
    calls = []

    def search(qq, depth):
        calls.append(depth)
        return exact_search(vectors)(qq, depth)

    D, I = rerank(search, q, min(k, n), n, lambda ids: corr[ids], float(corr.max()))
    full = q @ vectors.T + corr[None, :]
    want = np.argsort(-full, axis=1, kind="stable")[:, :min(k, n)]
    assert (I == want).all()
    assert np.allclose(D, np.take_along_axis(full, want, 1), atol=1e-6)
    if n >= 200 and k <= 10:
        assert calls[-1] < n  # it stopped before fetching everything


def test_corrections_apply_to_the_other_modality_only():
    settings = {"text": {"k": 5, "beta": 0.5, "threshold": 0.3}, "image": {"k": 5, "beta": 0.0, "threshold": 0.2}}
    hubs = np.array([0.5, 0.1, 0.4, np.nan, 0.9, 0.36], np.float32)
    kinds = ["image", "video", "text", "image", "text", "video"]
    c = corrections(hubs, kinds, "text", settings)
    # photos and frames above the threshold pushed down, never lifted; texts untouched; NaN: none
    assert np.allclose(c, [-0.1, 0.0, 0.0, 0.0, 0.0, -0.03])
    assert corrections(hubs, kinds, "image", settings) is None  # beta 0: off
    assert corrections(hubs, kinds, "text", None) is None  # a model without a bank


def planted_hub_data(seed=0):
    """Images with captions near them, plus a few hub images that sit near every caption."""
    d, n = 32, 300
    centre = unit(np.random.default_rng(100).normal(size=(1, d)))  # the same for every seed
    rng = np.random.default_rng(seed)
    img = unit(rng.normal(size=(n, d)))
    hubs = rng.choice(n, 15, replace=False)
    img[hubs] = unit(img[hubs] + 2.5 * centre)  # close to everything that leans towards the centre
    owner = np.repeat(np.arange(n), 2)
    txt = unit(img[owner] + rng.normal(scale=0.9, size=(2 * n, d)) + 0.8 * centre)
    return img, txt, owner, hubs


def test_calibrate_finds_and_damps_planted_hubs():
    img, txt, owner, hubs = planted_hub_data()
    bank_img, bank_txt, bank_owner, _ = planted_hub_data(seed=1)  # other pairs of the same kind
    qb = calibrate(img, txt, owner, bank_img, bank_txt)
    assert qb.sides["text"].beta > 0
    bias = corrections(qb.hubs(img, ["image"] * len(img)), ["image"] * len(img), "text", qb.settings())
    assert bias[hubs].mean() < bias[np.setdiff1d(np.arange(len(img)), hubs)].mean()  # hubs pushed down
    plain, fixed = recall_at_k(img, txt, owner), recall_at_k(img, txt, owner, image_bias=bias)
    assert fixed["t2i"][1] > plain["t2i"][1]


def test_calibrate_turns_the_correction_off_when_it_does_not_help():
    rng = np.random.default_rng(3)
    img = unit(rng.normal(size=(100, 16)))
    owner = np.arange(100)
    txt = img.copy()  # every caption is its image: plain cosine is already perfect
    qb = calibrate(img, txt, owner, unit(rng.normal(size=(50, 16))), unit(rng.normal(size=(50, 16))))
    assert qb.sides["text"].beta == 0 and qb.sides["image"].beta == 0


def test_too_few_validation_pairs_leave_the_correction_off():
    img, txt, owner, _ = planted_hub_data()
    keep = owner < 60
    bank_img, bank_txt, _, _ = planted_hub_data(seed=1)
    qb = calibrate(img[:60], txt[keep], owner[keep], bank_img, bank_txt)
    assert qb.sides["text"].beta == 0 and qb.sides["image"].beta == 0


def test_bank_round_trip_and_bad_files(tmp_path):
    from mmsearch.errors import ModelLoadError

    rng = np.random.default_rng(0)
    qb = QueryBank({"text": unit(rng.normal(size=(20, 8))), "image": unit(rng.normal(size=(10, 8)))},
                   {"text": Side(5, 0.5, 0.3), "image": Side(10, 0.2, 0.1)}, weights="abc")
    path = qb.save(tmp_path / "bank.safetensors")
    back = QueryBank.load(path)
    assert back.sides == qb.sides and back.weights == "abc" and back.settings() == qb.settings()
    assert np.allclose(back.vectors["text"], qb.vectors["text"], atol=1e-3)  # float16 on disk
    emb = unit(rng.normal(size=(4, 8)))
    assert np.allclose(back.hubs(emb, ["image", "text", "video", "image"]),
                       qb.hubs(emb, ["image", "text", "video", "image"]), atol=2e-3)
    assert not list(tmp_path.glob(".*tmp"))  # written through a temp file, renamed
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ModelLoadError, match=r"query bank .*junk.safetensors is unreadable"):
        QueryBank.load(tmp_path / "junk.safetensors")
