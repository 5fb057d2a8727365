"""Issue 4 through the pipeline users run: IVF indexes updated in place (stable ids, no retraining),
rebuilt when outgrown and saying so, settings remembered, memory-mapped queries, batched CLI queries.

Thousands of items are needed to get IVF indexes, so these tests index texts with a fast stand-in
encoder (seeded vectors per text, clustered by topic); the real encoder is covered elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from mmsearch.config import IndexingConfig, IndexSpec, ModelRef
from mmsearch.indexing import index_texts as _index_texts
from mmsearch.search import Searcher
from mmsearch.store import Collection

D = 32
TOPICS = np.random.default_rng(0).standard_normal((40, D))


class HashEncoder:
    """Text -> a unit vector near its topic's centre ("t<topic> <n>"), the same on every call."""

    ref = ModelRef("hash-encoder-for-tests")
    name = ref.key()
    dim = D

    def embed_texts(self, texts, batch_size=None):
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha1(t.encode()).digest()[:8], "little")
            topic = int(t.split()[0][1:]) if t.startswith("t") else seed % len(TOPICS)
            v = TOPICS[topic] + 0.6 * np.random.default_rng(seed).standard_normal(D)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, np.float32)


def index_texts(*args, **kwargs):
    """One commit per run (the default commits every 2,048 items, which builds on the first chunk)."""
    return _index_texts(*args, config=IndexingConfig(commit_every=10**6), **kwargs)


def lines(n: int, start: int = 0, tag: str = "") -> list[str]:
    return [f"t{i % 40} caption {i}{tag}" for i in range(start, start + n)]


def write(path, texts) -> None:
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")


def exact_ids(c: Collection, q: np.ndarray, k: int) -> np.ndarray:
    scores = q @ np.asarray(c.embeddings).T
    return c.items.id[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


@pytest.fixture(autouse=True)
def one_faiss_thread():
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.mark.parametrize("kind", ["ivfflat", "ivfpq"])
def test_ivf_index_is_updated_in_place_with_stable_ids(tmp_path, kind):
    enc, src, idx = HashEncoder(), tmp_path / "texts.txt", tmp_path / "idx"
    texts = lines(3000)
    write(src, texts)
    spec = IndexSpec(index_type=kind, pq_m=8)
    r = index_texts(src, idx, encoder=enc, spec=spec)
    assert r.index_kind == kind and any(f"built a {kind} index over 3000" in n for n in r.index_notes)
    first = Collection.open(idx)
    params = first.manifest.index.params
    assert params["n_trained"] == 3000 and params["tuning"]["reached"]
    id_of = dict(zip(first.items.text, first.items.id.tolist()))

    # blank every 10th line (texts are keyed by line number), edit 50 others, append 400:
    # updated in place, not rebuilt
    edited = {i: t + " edited" for i, t in enumerate(texts) if i % 60 == 1}
    new_lines = [edited.get(i, t) if i % 10 else "" for i, t in enumerate(texts)] + lines(400, 3000)
    new_texts = [t for t in new_lines if t]
    write(src, new_lines)
    r = index_texts(src, idx, encoder=enc)  # settings remembered: no spec given
    assert r.index_kind == kind and r.index_notes == [], r.index_notes
    c = Collection.open(idx)
    assert c.manifest.index.params["n_trained"] == 3000  # the quantizer was not retrained
    assert c.manifest.index_spec.index_type == kind
    assert c.count == len(new_texts) == c.index.ntotal
    np.testing.assert_array_equal(np.sort(c.index.ids()), np.sort(c.items.id))
    kept = [t for i, t in enumerate(texts) if i % 10 and i not in edited]
    assert all(id_of[t] == i for t, i in zip(c.items.text, c.items.id.tolist()) if t in id_of)  # ids are stable
    assert set(kept) <= set(c.items.text)

    # answers: exact search over what is stored now, when every list is probed
    q = enc.embed_texts(lines(30, 5000))
    s = Searcher(idx, encoder=enc, nprobe=10**6)
    D_, I = s.search_vectors(q, 10, kind="text")
    np.testing.assert_array_equal(I, exact_ids(c, q, 10))
    removed = {id_of[t] for i, t in enumerate(texts) if i % 10 == 0}
    assert not removed & set(np.ravel(I).tolist())


def test_outgrown_ivf_index_is_rebuilt_and_says_why(tmp_path):
    enc, src, idx = HashEncoder(), tmp_path / "texts.txt", tmp_path / "idx"
    write(src, lines(2000))
    index_texts(src, idx, encoder=enc, spec=IndexSpec(index_type="ivfflat"))
    write(src, lines(8000))
    r = index_texts(src, idx, encoder=enc)
    assert r.index_notes == []  # 4x is still served
    write(src, lines(8100))
    r = index_texts(src, idx, encoder=enc)
    assert any("grew from 2000 to 8100" in n for n in r.index_notes), r.index_notes
    assert Collection.open(idx).manifest.index.params["n_trained"] == 8100


def test_new_settings_rebuild_and_hnsw_removal_rebuilds(tmp_path):
    enc, src, idx = HashEncoder(), tmp_path / "texts.txt", tmp_path / "idx"
    write(src, lines(1500))
    index_texts(src, idx, encoder=enc, spec=IndexSpec(index_type="hnsw", hnsw_m=8))
    write(src, lines(1400))  # a removal: HNSW cannot drop nodes
    r = index_texts(src, idx, encoder=enc)
    assert any("cannot remove items in place" in n for n in r.index_notes), r.index_notes
    r = index_texts(src, idx, encoder=enc, spec=IndexSpec(factory="IVF16,SQ8"))
    assert r.index_kind == "factory" and any("settings changed" in n for n in r.index_notes)
    m = Collection.open(idx).manifest
    assert m.index_spec.factory == "IVF16,SQ8" and m.index.params["factory"] == "IVF16,SQ8"


def test_a_bad_factory_string_leaves_the_index_untouched(tmp_path):
    enc, src, idx = HashEncoder(), tmp_path / "texts.txt", tmp_path / "idx"
    write(src, lines(500))
    index_texts(src, idx, encoder=enc)
    before = Collection.open(idx).manifest
    with pytest.raises(ValueError, match="bad index factory string 'IVF16,PQ5'"):
        index_texts(src, idx, encoder=enc, spec=IndexSpec(factory="IVF16,PQ5"))
    after = Collection.open(idx)
    assert after.manifest.generation == before.generation and after.count == 500


def test_queries_memory_map_the_index(tmp_path):
    enc, src, idx = HashEncoder(), tmp_path / "texts.txt", tmp_path / "idx"
    write(src, lines(600))
    index_texts(src, idx, encoder=enc, spec=IndexSpec(index_type="ivfflat"))
    c = Collection.open(idx, load_index=True)
    assert isinstance(c.embeddings, np.memmap)
    assert c.index.read_only  # faiss would abort the process on a write to a mapped index
    with pytest.raises(ValueError, match="memory-mapped .* mmap=False"):
        c.index.add(np.zeros((1, D), np.float32), np.array([10**9]))
    with pytest.raises(ValueError, match="memory-mapped"):
        c.index.remove(c.items.id[:1])
    writable = c.load_index(mmap=False)
    assert writable.remove(c.items.id[:1]) == 1


def test_cli_batch_queries_and_index_options(tmp_path):
    """`mmsearch query --batch`, `--nprobe`, `--index-factory` and `--memory` as a user runs them."""
    enc, src, idx = HashEncoder(), tmp_path / "texts.txt", tmp_path / "idx"
    write(src, lines(300))
    index_texts(src, idx, encoder=enc)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "mmsearch.cli", *map(str, args)], capture_output=True, text=True)

    bad = run("index", "--texts", src, "--index", idx, "--index-factory", "IVF8,PQ5", "-q")
    assert bad.returncode == 1 and bad.stderr.startswith("error: bad index factory string 'IVF8,PQ5'")
    assert bad.stderr.count("\n") == 1
    bad = run("index", "--texts", src, "--index", idx, "--memory", "lots")
    assert bad.returncode == 1 and "memory budget 'lots' is not a size" in bad.stderr
    bad = run("index", "--texts", src, "--index", idx, "--index-type", "annoy")
    assert bad.returncode == 1 and "unknown --index-type 'annoy'" in bad.stderr
    # the hash encoder cannot run in a subprocess: batch queries go through the library's Searcher
    missing = run("query", "--batch", tmp_path / "nope.txt", "--index", idx)
    assert missing.returncode == 1 and "queries file not found" in missing.stderr
    s = Searcher(idx, encoder=enc)
    batch = s.search_texts(lines(3, 9000), k=4, kind="text")
    assert [len(h) for h in batch] == [4, 4, 4]
    single = [s.search_text(t, k=4, kind="text") for t in lines(3, 9000)]
    assert [[h.id for h in hs] for hs in batch] == [[h.id for h in hs] for hs in single]
    info = json.loads(run("info", "--json", "--index", idx).stdout)
    assert info["index_type"] == "flat" and info["index_params"]["reason"].startswith("300 <= flat_max")


def test_cli_style_overrides_keep_the_other_settings(tmp_path):
    """A dict of changes (what the CLI passes) keeps the rest of the index's settings; "4G" is the default."""
    enc, src, idx = HashEncoder(), tmp_path / "texts.txt", tmp_path / "idx"
    write(src, lines(1200))
    index_texts(src, idx, encoder=enc, spec=IndexSpec(factory="IVF8,Flat", memory="1G"))
    r = index_texts(src, idx, encoder=enc, spec={"target_recall": 0.9})
    m = Collection.open(idx).manifest
    assert m.index_spec.factory == "IVF8,Flat" and m.index_spec.memory == 2**30
    assert m.index_spec.target_recall == 0.9 and r.index_kind == "factory"
    write(src, lines(1200))
    r = index_texts(src, idx, encoder=enc, spec={"memory": "1024M"})  # the same budget, spelt differently
    assert r.index_notes == [] and not r.changed


def test_shrinking_back_to_flat_says_so(tmp_path):
    enc, src, idx = HashEncoder(), tmp_path / "texts.txt", tmp_path / "idx"
    write(src, lines(3000))
    index_texts(src, idx, encoder=enc, spec=IndexSpec(flat_max=2000))
    assert Collection.open(idx).manifest.index.kind == "ivfflat"
    write(src, lines(500))
    r = index_texts(src, idx, encoder=enc)
    assert r.index_kind == "flat" and any("built a flat index over 500" in n for n in r.index_notes), r.index_notes


def test_removed_then_re_added_id_is_re_ranked_with_its_new_vector():
    from mmsearch.index import VectorIndex

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = VectorIndex.build(x, np.arange(3000), IndexSpec(index_type="ivfpq", pq_m=8, nprobe=64))
    new = rng.standard_normal((1, D)).astype(np.float32)
    new /= np.linalg.norm(new)
    index.remove(np.array([105]))
    index.add(new, np.array([105]))
    D_, I = index.search(new, 3)
    assert I[0, 0] == 105 and D_[0, 0] == pytest.approx(1.0, abs=1e-5)


#: ``index.params`` that the release before IndexPlan wrote for ``lines(3000)`` indexed as ivfpq, pq_m=8
LAST_RELEASE_IVFPQ = {
    "memory_budget": 4294967296, "n_trained": 3000, "kind": "ivfpq", "reason": "forced index type ivfpq",
    "nlist": 76, "n_train": 3000, "m": 8, "nbits": 8, "rerank_factor": 4, "ram_bytes_estimate": 48000,
    "gpu_build": False, "nprobe": 2,
    "tuning": {"target_recall": 0.95, "k": 10, "queries": 500, "queries_from": "stored vectors, own entry left out",
               "sweep": [{"nprobe": 1, "recall": 0.8178, "rerank_factor": 4},
                         {"nprobe": 2, "recall": 0.9526, "rerank_factor": 4}],
               "recall": 0.9526, "reached": True},
    "build_seconds": {"train": 0.353, "add": 0.003, "tune": 0.031},
}


def test_index_of_the_last_release_shows_the_same_info_and_keeps_its_params(tmp_path):
    """A manifest in the last release's format: `mmsearch info` shows its index params as stored,
    searches use its tuned nprobe, and an in-place update writes them back byte for byte."""
    enc, src, idx = HashEncoder(), tmp_path / "texts.txt", tmp_path / "idx"
    write(src, lines(3000))
    index_texts(src, idx, encoder=enc, spec=IndexSpec(index_type="ivfpq", pq_m=8))
    mf = idx / "manifest.json"
    m = json.loads(mf.read_text(encoding="utf-8"))
    built = m["index"]["params"]
    assert list(built) == list(LAST_RELEASE_IVFPQ)  # built now: the same keys in the same order
    plan_keys = list(LAST_RELEASE_IVFPQ)[:10]
    assert [built[k] for k in plan_keys] == [LAST_RELEASE_IVFPQ[k] for k in plan_keys]
    m["index"]["params"] = LAST_RELEASE_IVFPQ
    mf.write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")

    out = subprocess.run([sys.executable, "-m", "mmsearch.cli", "info", "--json", "--index", str(idx)],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    assert info["index_type"] == "ivfpq" and info["count"] == 3000
    assert json.dumps(info["index_params"]) == json.dumps(LAST_RELEASE_IVFPQ)
    c = Collection.open(idx)
    assert c.index.config.nprobe == 2 and c.index.config.tuning.recall == 0.9526
    q = enc.embed_texts(lines(5, 7000))
    _, I = Searcher(idx, encoder=enc).search_vectors(q, 5, kind=None)
    assert I.shape == (5, 5) and set(np.ravel(I)) <= set(c.items.id.tolist())

    write(src, lines(3000) + lines(20, 5000))
    r = index_texts(src, idx, encoder=enc)
    assert r.index_notes == [] and r.added == 20  # updated in place, not rebuilt
    after = json.loads(mf.read_text(encoding="utf-8"))
    assert after["count"] == 3020
    assert json.dumps(after["index"]["params"], indent=2) == json.dumps(LAST_RELEASE_IVFPQ, indent=2)
