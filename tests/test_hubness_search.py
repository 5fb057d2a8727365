"""The hubness correction as a user meets it: indexes store hub values, cross-modal queries are
re-ranked exactly, `--plain` turns it off, eval reports both, and stale weights are refused."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.hubness import corrections
from mmsearch.indexing import index_folder, index_texts
from mmsearch.search import Searcher
from mmsearch.store import Collection
from tests.conftest import CountingEncoder

runner = CliRunner()


def naive_top(searcher, q, query, k, kind=None):
    """Every item (of ``kind``) scored: cosine plus its correction, best first (the reference)."""
    c = searcher.collection
    emb = np.asarray(c.embeddings)
    corr = corrections(c.items.hub, c.items.kind, query, c.manifest.hubness)
    full = q @ emb.T + corr[None, :]
    if kind is not None:
        full[:, np.asarray(c.items.kind) != kind] = -np.inf
    order = np.argsort(-full, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(full, order, 1), c.items.id[order]


def test_the_built_in_model_ships_a_bank_and_indexes_store_hub_values(built_index, encoder):
    bank = encoder.query_bank
    assert bank is not None and bank.sides["text"].beta > 0  # calibrated on Flickr8k dev: it helps there
    c = Collection.open(built_index[0])
    assert c.manifest.hubness == bank.settings()
    assert c.manifest.model.weights == encoder.weights
    assert np.isfinite(c.items.hub).all()
    assert np.allclose(c.items.hub, bank.hubs(np.asarray(c.embeddings), c.items.kind), atol=1e-5)


def test_text_queries_are_re_ranked_exactly_and_plain_turns_it_off(built_index, encoder, pairs):
    idx, mapping = built_index
    s = Searcher(idx, encoder=encoder)
    captions = [caps[0] for caps in pairs.captions]
    q = encoder.embed_texts(captions)
    for k in (1, 3, 12):
        D, I = s.search_vectors(q, k, query="text")
        want_d, want_i = naive_top(s, q, "text", k)
        assert (I == want_i).all() and np.allclose(D, want_d, atol=1e-5)
    plain_d, plain_i = s.search_vectors(q, 12)
    assert np.allclose(plain_d, np.sort(q @ np.asarray(s.collection.embeddings).T, axis=1)[:, ::-1], atol=1e-5)
    assert not np.allclose(plain_d, s.search_vectors(q, 12, query="text")[0])  # the scores moved
    hits = s.search_text(captions[0], k=3)
    assert [h.score for h in hits] == pytest.approx(naive_top(s, q[:1], "text", 3)[0][0].tolist(), abs=1e-5)
    off = Searcher(idx, encoder=encoder, hubness=False).search_text(captions[0], k=3)
    assert [h.score for h in off] == pytest.approx(plain_d[0, :3].tolist(), abs=1e-5)
    # an image query for images (same modality) is never corrected
    img = encoder.embed_images(pairs.images[:2])
    assert np.allclose(s.search_vectors(img, 5, query="image")[0], s.search_vectors(img, 5)[0])


def test_image_queries_over_texts_are_corrected_and_the_cli_has_plain(photo_dir, pairs, encoder, tmp_path):
    folder, _ = photo_dir
    index = tmp_path / "idx"
    index_folder(folder, index, encoder=encoder)
    texts = tmp_path / "captions.txt"
    texts.write_text("\n".join(c for caps in pairs.captions for c in caps) + "\n")
    index_texts(texts, index, encoder=encoder)
    s = Searcher(index, encoder=encoder)
    assert np.isfinite(s.collection.items.hub).all()
    q = encoder.embed_images(pairs.images[:4])
    D, I = s.search_vectors(q, 10, kind="text", query="image")
    want_d, want_i = naive_top(s, q, "image", 10, kind="text")
    assert (I == want_i).all() and np.allclose(D, want_d, atol=1e-5)
    with_fix = runner.invoke(app, ["query", pairs.captions[0][0], "--index", str(index), "--json", "-k", "5"])
    plain = runner.invoke(app, ["query", pairs.captions[0][0], "--index", str(index), "--json", "-k", "5", "--plain"])
    assert with_fix.exit_code == 0 and plain.exit_code == 0, with_fix.output + plain.output
    emb = encoder.embed_texts([pairs.captions[0][0]])[0]
    c = s.collection
    for hit in json.loads(plain.stdout):
        row = c.items.path.index(hit["path"])
        assert hit["score"] == pytest.approx(float(np.asarray(c.embeddings)[row] @ emb), abs=1e-4)
    fixed_scores = [h["score"] for h in json.loads(with_fix.stdout)]
    assert fixed_scores != [h["score"] for h in json.loads(plain.stdout)]
    info = runner.invoke(app, ["info", "--index", str(index), "--json"])
    assert json.loads(info.stdout)["hubness"] == encoder.query_bank.settings()


class NoBank(CountingEncoder):
    query_bank = None  # as a model without a query bank (any open_clip model)


def test_an_index_without_hub_values_gets_them_without_re_embedding(photo_dir, encoder, tmp_path):
    folder, _ = photo_dir
    index = tmp_path / "idx"
    index_folder(folder, index, encoder=NoBank(encoder))
    c = Collection.open(index)
    assert c.manifest.hubness is None and np.isnan(c.items.hub).all()
    s = Searcher(index, encoder=encoder)
    q = encoder.embed_texts(["a dog"])
    assert np.allclose(s.search_vectors(q, 5, query="text")[0], s.search_vectors(q, 5)[0])  # nothing to apply
    counting = CountingEncoder(encoder)
    report = index_folder(folder, index, encoder=counting)
    assert counting.embedded == 0 and report.added == 0
    c = Collection.open(index)
    assert c.manifest.hubness == encoder.query_bank.settings() and np.isfinite(c.items.hub).all()
    gen = c.manifest.generation
    index_folder(folder, index, encoder=counting)  # now nothing is due: no new generation
    assert Collection.open(index).manifest.generation == gen


def test_an_index_embedded_with_other_weights_is_refused(built_index, encoder, tmp_path):
    import shutil

    from mmsearch.errors import ModelMismatchError
    from mmsearch.store import read_manifest, write_manifest

    idx = tmp_path / "copy"
    shutil.copytree(built_index[0], idx)
    m = read_manifest(idx)
    m.model = replace(m.model, weights="0123456789abcdef")  # as if built before the shipped heads changed
    write_manifest(idx, m)
    with pytest.raises(ModelMismatchError, match="other weights of mmsearch-lite2"):
        index_folder(built_index[0].parent / "photos", idx, encoder=encoder)
    with pytest.raises(ModelMismatchError, match="other weights"):
        Searcher(idx, encoder=encoder)
    r = runner.invoke(app, ["query", "a dog", "--index", str(idx)])
    assert r.exit_code == 1 and "other weights" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    manifest = json.loads((idx / "manifest.json").read_text())
    del manifest["model"]["weights"]  # built by an mmsearch before weights were recorded: other heads than now
    (idx / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelMismatchError, match="other weights"):
        Searcher(idx, encoder=encoder)
    assert Collection.open(idx).count == Collection.open(built_index[0]).count  # refused, not touched


def test_eval_reports_the_corrected_and_the_plain_recall(pairs, encoder):
    from mmsearch.config import IndexSpec
    from mmsearch.evaluate import embed_pairs, evaluate
    from mmsearch.metrics import recall_at_k

    r = evaluate(encoder, pairs, via_index=IndexSpec(index_type="flat"))
    img, txt, owner = embed_pairs(encoder, pairs)
    bank = encoder.query_bank
    ib = corrections(bank.hubs(img, ["image"] * len(img)), ["image"] * len(img), "text", bank.settings())
    tb = corrections(bank.hubs(txt, ["text"] * len(txt)), ["text"] * len(txt), "image", bank.settings())
    want = recall_at_k(img, txt, owner, image_bias=ib, text_bias=tb)
    assert r["t2i"] == want["t2i"] and r["i2t"] == want["i2t"]
    assert r["plain"] == {k: recall_at_k(img, txt, owner)[k] for k in ("t2i", "i2t")}
    assert r["via_index"]["t2i"] == r["t2i"] and r["via_index"]["ann_recall"] == {1: 1.0, 5: 1.0, 10: 1.0}
    off = evaluate(encoder, pairs, hubness=False)
    assert "plain" not in off and off["t2i"] == r["plain"]["t2i"]


def test_indexes_without_a_weights_record_are_judged_per_built_in_model():
    """mmsearch-lite2's weights changed after such indexes were written; mmsearch-lite's did not."""
    from mmsearch.errors import ModelMismatchError
    from mmsearch.manifest import IndexedModel
    from mmsearch.weights import check_weights, fingerprint

    for name in ("mmsearch-lite", "mmsearch-lite2"):
        record = IndexedModel(name=name, pretrained=None, key=name, weights=None)
        if name == "mmsearch-lite":
            check_weights(record, fingerprint(name), "idx")
        else:
            with pytest.raises(ModelMismatchError, match="index idx was embedded with other weights"):
                check_weights(record, fingerprint(name), "idx")
        check_weights(replace(record, weights=fingerprint(name)), fingerprint(name), "idx")  # recorded and equal
    folder = IndexedModel(name="/models/mine", pretrained=None, key="/models/mine", weights=None)
    check_weights(folder, "abc", "idx")  # a checkpoint folder's old index: nothing to judge by


class TextsOnly:
    """A fast stand-in encoder for thousands of texts (seeded vectors), with a settable query bank."""

    from mmsearch.config import ModelRef

    ref = ModelRef("texts-only-encoder-for-tests")
    name = ref.key()
    dim = 16

    def __init__(self, bank=None):
        self.query_bank = bank

    def embed_texts(self, texts, batch_size=None):
        import hashlib

        out = [np.random.default_rng(int.from_bytes(hashlib.sha1(t.encode()).digest()[:8], "little")).normal(size=16)
               for t in texts]
        out = np.asarray(out, np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def image_bank(seed, beta=0.5):
    from mmsearch.hubness import QueryBank, Side

    rng = np.random.default_rng(seed)
    v = rng.normal(size=(300, 16)).astype(np.float32)
    v[:100] += 2.0 * rng.normal(size=16).astype(np.float32)  # a crowded direction: texts near it are hubs
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return QueryBank({"image": v}, {"image": Side(k=10, beta=beta, threshold=0.3)})


def test_deep_over_fetching_stays_exact_on_thousands_of_items(tmp_path):
    """3,000 texts searched by image vectors: the re-ranking has to fetch beyond its first depth."""
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"text number {i}" for i in range(3000)) + "\n")
    enc = TextsOnly(image_bank(0, beta=2.0))
    index_texts(texts, tmp_path / "idx", encoder=enc)
    s = Searcher(tmp_path / "idx", encoder=enc)
    calls = []
    plain = s._search_plain
    s._search_plain = lambda q, k, kind: calls.append(k) or plain(q, k, kind)
    q = image_bank(1).vectors["image"][:40]
    for k in (1, 10, 100):
        calls.clear()
        D, I = s.search_vectors(q, k, query="image")
        want_d, want_i = naive_top(s, q, "image", k)
        assert (I == want_i).all() and np.allclose(D, want_d, atol=1e-5)
        assert len(calls) > 1 and calls[-1] < 3000  # it deepened, and stopped before fetching everything
    calls.clear()
    s.search_vectors(enc.embed_texts(["a text query"]), 10, query="text")  # text -> texts: nothing to correct
    assert calls == [10]


def test_hub_values_follow_the_bank_a_model_has_now(tmp_path):
    from mmsearch.hubness import Side

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"text number {i}" for i in range(200)) + "\n")
    idx = tmp_path / "idx"
    a, b = image_bank(0), image_bank(1)
    index_texts(texts, idx, encoder=TextsOnly(a))
    c = Collection.open(idx)
    assert np.allclose(c.items.hub, a.hubs(np.asarray(c.embeddings), c.items.kind))
    index_texts(texts, idx, encoder=TextsOnly(None))  # the bank went away (being rebuilt, say)
    c = Collection.open(idx)
    assert c.manifest.hubness is None and np.isnan(c.items.hub).all()
    index_texts(texts, idx, encoder=TextsOnly(b))  # a new bank: measured with it, not the old values
    c = Collection.open(idx)
    assert np.allclose(c.items.hub, b.hubs(np.asarray(c.embeddings), c.items.kind))
    assert c.manifest.hubness == b.settings()
    b.sides["image"] = Side(k=10, beta=0.0, threshold=0.3)  # recalibrated: same vectors, correction off
    index_texts(texts, idx, encoder=TextsOnly(b))
    assert Collection.open(idx).manifest.hubness["image"]["beta"] == 0.0
    gen = Collection.open(idx).manifest.generation
    index_texts(texts, idx, encoder=TextsOnly(b))  # nothing due: no new generation
    assert Collection.open(idx).manifest.generation == gen
