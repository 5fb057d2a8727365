"""Tests of mmsearch.index: exactness of flat, recall of ivfpq, padding-free results, persistence, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from mmsearch.config import IndexSpec
from mmsearch.errors import EmptyIndexError, IndexFormatError, IndexNotFoundError
from mmsearch.index import VectorIndex, parse_size, plan_index

FLAT = IndexSpec(index_type="flat")
IVFPQ = IndexSpec(index_type="ivfpq")
#: fewer PQ sub-quantizers than the default keeps k-means training fast on a loaded 2-core machine
IVFPQ_FAST = IndexSpec(index_type="ivfpq", pq_m=8)


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_unit(n: int, d: int, seed: int) -> np.ndarray:
    return normalise(np.random.default_rng(seed).standard_normal((n, d)))


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One faiss thread: OpenMP k-means slows down many-fold when the 2 cores are shared with other jobs."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def clustered():
    """5,000 normalised vectors, d=64, drawn around 50 gaussian centres; ids 1000 + 7*i."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 64))
    x = normalise(centres[rng.integers(0, 50, 5000)] + 0.5 * rng.standard_normal((5000, 64)))
    ids = 1000 + 7 * np.arange(5000, dtype=np.int64)
    return x, ids


@pytest.fixture(scope="module")
def ivfpq_index(clustered):
    x, ids = clustered
    return VectorIndex.build(x, ids, IVFPQ_FAST)


def exact(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ x.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def test_import_does_not_load_faiss():
    code = "import sys, mmsearch.index; assert 'faiss' not in sys.modules, 'faiss imported at module level'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_flat_matches_numpy_reference():
    x, q = random_unit(500, 32, 1), random_unit(20, 32, 2)
    ids = 1000 + 7 * np.arange(500, dtype=np.int64)
    index = VectorIndex.build(x, ids, FLAT)
    assert (index.kind, index.d, index.ntotal) == ("flat", 32, 500)
    D, I = index.search(q, 10)
    D_ref, I_ref = exact(x, ids, q, 10)
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == I.shape == (20, 10)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, atol=1e-5)


def test_single_query_vector_accepted():
    x = random_unit(50, 16, 3)
    index = VectorIndex.build(x, np.arange(50), FLAT)
    D, I = index.search(x[7].astype(np.float64), 3)
    assert D.shape == I.shape == (1, 3) and I[0, 0] == 7


def test_ivfpq_params(ivfpq_index):
    c = ivfpq_index.config
    assert ivfpq_index.kind == "ivfpq"
    assert (c.plan.nlist, c.plan.m, c.plan.nbits, c.plan.n_train) == (128, 8, 8, 5000)
    assert 1 <= c.nprobe <= 128 and c.tuning.reached and c.tuning.recall >= 0.95
    # PQ8 codes of 64-d vectors are coarse: k x 4 candidates fall short even over every list, so
    # tuning re-ranked deeper
    sweep = c.tuning.sweep
    assert sweep[0].rerank_factor == 4 and c.rerank_factor == c.tuning.chosen.rerank_factor > 4
    assert c.plan.rerank_factor == 4  # what was planned; the manifest keeps what searches use
    assert ivfpq_index.params["rerank_factor"] == c.rerank_factor
    assert max(r.recall for r in sweep if r.rerank_factor == 4) < 0.95
    assert plan_index(5000, 64, IVFPQ).m == 64
    assert plan_index(20, 32, IVFPQ).nlist == 1 and plan_index(20, 32, IVFPQ).nbits == 4
    assert plan_index(10**6, 256, IVFPQ).nlist == 4096
    assert plan_index(10**6, 384, IVFPQ).m == 64 and plan_index(10**6, 72, IVFPQ).m == 24
    with pytest.raises(ValueError, match="pq_m"):
        plan_index(1000, 64, replace(IVFPQ, pq_m=5))


def test_ivfpq_recall_against_exact(clustered, ivfpq_index):
    x, ids = clustered
    rng = np.random.default_rng(5)
    q = normalise(x[rng.choice(len(x), 200, replace=False)] + 0.1 * rng.standard_normal((200, 64)))
    _, I = ivfpq_index.search(q, 10)
    _, I_ref = exact(x, ids, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, I_ref)])
    assert recall >= 0.9, recall
    top1 = np.mean(I[:, 0] == I_ref[:, 0])
    assert top1 >= 0.95, top1


def test_ivfpq_and_flat_agree_on_easy_queries(clustered, ivfpq_index):
    x, ids = clustered
    flat = VectorIndex.build(x, ids, FLAT)
    q = x[::250]  # stored vectors: the top hit is the vector itself
    _, I_ivf = ivfpq_index.search(q, 1)
    _, I_flat = flat.search(q, 1)
    np.testing.assert_array_equal(I_ivf, I_flat)
    np.testing.assert_array_equal(I_flat[:, 0], ids[::250])


def test_ivfpq_build_is_reproducible(clustered):
    x, ids = clustered
    first, again = (VectorIndex.build(x[:1500], ids[:1500], replace(IVFPQ, pq_m=4)) for _ in range(2))
    q = x[:50]
    for a, b in zip(first.search(q, 10, nprobe=1), again.search(q, 10, nprobe=1)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("spec", [FLAT, IVFPQ, replace(IVFPQ, nprobe=1)], ids=["flat", "ivfpq", "ivfpq-nprobe1"])
@pytest.mark.parametrize("n", [1, 2, 20])
def test_k_larger_than_n_returns_all_items(spec, n):
    x = random_unit(n, 32, n)
    ids = 50 + 3 * np.arange(n, dtype=np.int64)
    index = VectorIndex.build(x, ids, spec)
    D, I = index.search(random_unit(5, 32, 99), 100, nprobe=spec.nprobe)
    assert D.shape == I.shape == (5, n)
    assert (I >= 0).all()
    for row, drow in zip(I, D):
        assert sorted(row) == sorted(ids)
        assert (np.diff(drow) <= 1e-6).all()  # best first


def test_ivfpq_short_rows_are_researched(clustered):
    """nprobe=1 over many small lists: rows that come back short are filled by a full search."""
    x, ids = clustered
    index = VectorIndex.build(x[:400], ids[:400], replace(IVFPQ_FAST, nlist=10, rerank_factor=1, nprobe=1))
    assert index.params["nlist"] == 10 and index.params["nprobe"] == 1
    _, raw = index._raw_search(x[:30], 200, 1, None)  # precondition: plain faiss search pads these rows with -1
    assert (raw < 0).any()
    D, I = index.search(x[:30], 200, nprobe=1)
    assert I.shape == (30, 200) and (I >= 0).all()
    assert all(len(set(row)) == 200 for row in I)


def test_save_load_round_trip(tmp_path, clustered, ivfpq_index):
    x, ids = clustered
    flat = VectorIndex.build(x[:300], ids[:300], FLAT)
    for index in (flat, ivfpq_index):
        path = tmp_path / f"{index.kind}.faiss"
        index.save(path)
        index.save(path)  # overwriting an existing file also works
        assert path.is_file()
        loaded = VectorIndex.load(path, index.kind, index.params)
        loaded.attach(x, ids)
        assert (loaded.kind, loaded.params, loaded.d, loaded.ntotal) == (index.kind, index.params, 64, index.ntotal)
        for a, b in zip(index.search(x[:40], 10), loaded.search(x[:40], 10)):
            np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(tmp_path)) == ["flat.faiss", "ivfpq.faiss"]  # no temp files left behind


def test_load_errors(tmp_path):
    missing = tmp_path / "nope.faiss"
    with pytest.raises(IndexNotFoundError, match="mmsearch index"):
        VectorIndex.load(missing, "flat", {})
    with pytest.raises(FileNotFoundError):  # catchable as the builtin too
        VectorIndex.load(missing, "flat", {})
    garbage = tmp_path / "garbage.faiss"
    garbage.write_bytes(b"this is not a faiss index" * 10)
    with pytest.raises(IndexFormatError, match="garbage.faiss") as err:
        VectorIndex.load(garbage, "flat", {})
    assert "\n" not in str(err.value) and "index_read.cpp" not in str(err.value)
    with pytest.raises(IndexFormatError, match="not a regular file"):
        VectorIndex.load(tmp_path, "flat", {})
    flat = tmp_path / "flat.faiss"
    VectorIndex.build(random_unit(10, 8, 0), np.arange(10), FLAT).save(flat)
    with pytest.raises(IndexFormatError, match="expected ivfpq"):
        VectorIndex.load(flat, "ivfpq", {})
    with pytest.raises(IndexFormatError, match="unknown kind"):
        VectorIndex.load(flat, "annoy", {})


def test_empty_index_search_raises():
    import faiss

    index = VectorIndex(faiss.IndexIDMap2(faiss.IndexFlatIP(8)), "flat", {})
    with pytest.raises(EmptyIndexError):
        index.search(random_unit(1, 8, 0), 5)


def test_bad_build_input():
    x = random_unit(10, 8, 0)
    ids = np.arange(10)
    with pytest.raises(ValueError, match="empty"):
        VectorIndex.build(np.zeros((0, 8), np.float32), np.arange(0), FLAT)
    with pytest.raises(ValueError, match="2-D"):
        VectorIndex.build(x[0], ids[:1], FLAT)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        VectorIndex.build(bad, ids, FLAT)
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        VectorIndex.build(bad, ids, IVFPQ)
    with pytest.raises(ValueError, match="duplicate"):
        VectorIndex.build(x, np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 1]), FLAT)
    with pytest.raises(ValueError, match="shape"):
        VectorIndex.build(x, np.arange(9), FLAT)
    with pytest.raises(ValueError, match="integers"):
        VectorIndex.build(x, np.arange(10, dtype=np.float64), FLAT)


def test_bad_search_input():
    index = VectorIndex.build(random_unit(10, 8, 0), np.arange(10), FLAT)
    with pytest.raises(ValueError, match=r"dimension 16 .* dimension 8"):
        index.search(random_unit(2, 16, 1), 3)
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            index.search(random_unit(2, 8, 1), k)
    q = random_unit(2, 8, 1)
    q[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        index.search(q, 3)


def choose_kind(n: int, spec: IndexSpec) -> str:
    return plan_index(n, 256, spec).kind


def test_choose_kind():
    spec = IndexSpec()
    assert choose_kind(1, spec) == "flat"
    assert choose_kind(spec.flat_max, spec) == "flat"
    assert choose_kind(spec.flat_max + 1, spec) == "ivfflat"
    assert choose_kind(spec.ivfflat_max, spec) == "ivfpq"
    assert choose_kind(10**7, FLAT) == "flat"
    assert choose_kind(5, IVFPQ) == "ivfpq"
    with pytest.raises(ValueError, match="unknown index type"):
        choose_kind(5, IndexSpec(index_type="annoy"))


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_add_without_rebuilding_matches_building_at_once(kind):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(600, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(600, dtype=np.int64) * 3 + 5
    spec = IndexSpec(index_type=kind, pq_m=8, nlist=4, nprobe=4)  # every list probed: exact after re-rank
    grown = VectorIndex.build(x[:400], ids[:400], spec)
    grown.add(x[400:], ids[400:])
    assert grown.ntotal == 600 and sorted(grown.ids()) == sorted(ids)
    q = x[::37] + 0.01
    D, I = grown.search(q, 5)
    truth = ids[np.argsort(-(q @ x.T), axis=1)[:, :5]]
    assert (I[:, 0] == truth[:, 0]).all()
    with pytest.raises(ValueError, match="new and unique"):
        grown.add(x[:2], ids[:2])
    with pytest.raises(ValueError, match="dimension"):
        grown.add(x[:2, :16], np.array([1, 2]))


# ---- issue 4: automatic choice, tuning, factory strings, add/remove, mmap, large k ----------------

def recall_at(I: np.ndarray, I_ref: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(I, I_ref)]))


@pytest.fixture(scope="module")
def fresh_queries():
    """Held-out queries: new draws from the distribution of ``clustered``, never stored or used for tuning."""
    centres = np.random.default_rng(0).standard_normal((50, 64))  # the same centres as ``clustered``
    rng = np.random.default_rng(11)
    return normalise(centres[rng.integers(0, 50, 300)] + 0.5 * rng.standard_normal((300, 64)))


def test_parse_size():
    assert parse_size("4G") == 4 * 2**30 and parse_size("512M") == 512 * 2**20
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("1000") == 1000 and parse_size(None) is None
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_auto_plan_follows_memory_budget():
    d = 256
    assert plan_index(10_000, d).kind == "flat"
    p = plan_index(200_000, d)
    assert p.kind == "ivfflat" and p.nlist == 2048 and p.n_train == 64 * 2048
    # the same collection with too little memory for full vectors: IVF-PQ with the largest m that fits
    p = plan_index(200_000, d, IndexSpec(memory="10M"))
    assert p.kind == "ivfpq" and p.m == 32 and 200_000 * (p.m + 8) <= 10 * 2**20
    assert plan_index(200_000, d, IndexSpec(memory="300M")).kind == "ivfflat"  # 200k x 1032 B = 197 MiB
    p = plan_index(10**6, d)
    assert p.kind == "ivfpq" and p.m == 64 and p.nlist == 4096 and "budget" in p.reason
    with pytest.raises(ValueError, match="too small .* raise --memory"):
        plan_index(10**6, d, IndexSpec(memory="1M"))
    assert plan_index(100, d, IndexSpec(factory="IVF4,Flat")).kind == "factory"


@pytest.mark.parametrize("spec", [IndexSpec(index_type="ivfflat"), IVFPQ_FAST, IndexSpec(index_type="hnsw", hnsw_m=16)],
                         ids=["ivfflat", "ivfpq", "hnsw"])
def test_tuned_search_reaches_target_recall_on_held_out_queries(clustered, fresh_queries, spec):
    x, ids = clustered
    index = VectorIndex.build(x, ids, spec)
    t = index.config.tuning
    assert t.reached and t.recall >= 0.95 and t.queries == 500
    knob = "nprobe" if spec.index_type != "hnsw" else "ef_search"
    assert getattr(index.config, knob) == getattr(t.chosen, knob) == index.params[knob]
    if len(t.sweep) > 1:  # the smallest setting that reaches the target: the one before it did not
        assert t.sweep[-2].recall < 0.95
    _, I = index.search(fresh_queries, 10)
    _, I_ref = exact(x, ids, fresh_queries, 10)
    assert recall_at(I, I_ref) >= 0.93  # queries never seen in tuning land near the target too
    # per-query override: the smallest setting gives lower recall than the tuned one
    low = {"nprobe": 1} if knob == "nprobe" else {"ef_search": 1}
    if index.params[knob] > 1 and knob == "nprobe":
        assert recall_at(index.search(fresh_queries, 10, **low)[1], I_ref) < recall_at(I, I_ref)


def test_rerank_recovers_pq_recall(clustered, fresh_queries, ivfpq_index):
    x, ids = clustered
    _, I_ref = exact(x, ids, fresh_queries, 10)
    p = ivfpq_index.params["nprobe"]
    with_rerank = recall_at(ivfpq_index.search(fresh_queries, 10, nprobe=p)[1], I_ref)
    codes_only = recall_at(ivfpq_index.search(fresh_queries, 10, nprobe=p, rerank_factor=1)[1], I_ref)
    assert with_rerank > codes_only + 0.1, (with_rerank, codes_only)
    D, I = ivfpq_index.search(fresh_queries, 10)
    np.testing.assert_allclose(D, np.einsum("qkd,qd->qk", x[(I - 1000) // 7], fresh_queries), atol=1e-5)  # exact scores


@pytest.mark.parametrize("factory,kind_of_codes", [("IVF32,Flat", "exact"), ("HNSW16", "exact"),
                                                   ("IVF32,SQ8", "lossy"), ("PCAR32,IVF32,PQ8", "lossy"),
                                                   ("IVF32,PQ16x4", "lossy")])
def test_forced_factory_strings(clustered, fresh_queries, factory, kind_of_codes):
    x, ids = clustered
    index = VectorIndex.build(x, ids, IndexSpec(factory=factory))
    assert index.kind == "factory" and index.params["factory"] == factory
    assert index.reranks == (kind_of_codes == "lossy")
    D, I = index.search(fresh_queries, 10)
    _, I_ref = exact(x, ids, fresh_queries, 10)
    assert recall_at(I, I_ref) >= 0.9, factory
    assert set(np.ravel(I)) <= set(ids)  # the caller's ids, whatever the layout


def test_hnsw_coarse_quantizer_visits_every_list_asked_for(clustered, fresh_queries):
    """An HNSW coarse quantizer returns at most its efSearch lists: nprobe beyond that must still
    visit nprobe lists (all of them here: IVF-Flat over every list is exact search)."""
    x, ids = clustered
    index = VectorIndex.build(x, ids, IndexSpec(factory="IVF128_HNSW32,Flat"))
    D, I = index.search(fresh_queries, 10, nprobe=128)
    _, I_ref = exact(x, ids, fresh_queries, 10)
    assert recall_at(I, I_ref) == 1.0


@pytest.mark.parametrize("factory", ["IVF64,PQ7", "garbage", "IVF,Flat"])
def test_bad_factory_string_is_one_clear_line(clustered, factory):
    x, ids = clustered
    with pytest.raises(ValueError, match=r"bad index factory string .*IVF1024,PQ32") as err:
        VectorIndex.build(x[:500], ids[:500], IndexSpec(factory=factory))
    assert "\n" not in str(err.value) and ".cpp" not in str(err.value)


@pytest.mark.parametrize("spec", [FLAT, IndexSpec(index_type="ivfflat", nlist=16, nprobe=16),
                                  IndexSpec(index_type="ivfpq", pq_m=8, nlist=16, nprobe=16)],
                         ids=["flat", "ivfflat", "ivfpq"])
def test_add_and_remove_match_a_fresh_build(clustered, spec):
    x, ids = clustered
    x, ids = x[:2000], ids[:2000]
    grown = VectorIndex.build(x[:1500], ids[:1500], spec)
    gone = ids[::3][:400]
    assert grown.remove(gone) == len(np.intersect1d(gone, ids[:1500]))
    assert grown.remove(np.array([10**12])) == 0  # unknown ids are ignored
    grown.add(x[1500:], ids[1500:])
    keep = ~np.isin(ids, gone) | (np.arange(len(ids)) >= 1500)
    np.testing.assert_array_equal(grown.ids(), np.sort(ids[keep]))
    q = x[::50] + 0.05
    D, I = grown.search(q, 10)
    assert not np.isin(I, np.setdiff1d(gone, ids[1500:])).any()  # removed items never come back
    D_ref, I_ref = exact(x[keep], ids[keep], normalise(q), 10)
    _, I_ref_raw = exact(x[keep], ids[keep], q.astype(np.float32), 10)
    # every list probed and exact re-ranking: the same answer as exact search over what is left
    np.testing.assert_array_equal(I, I_ref_raw)
    with pytest.raises(ValueError, match="new and unique"):
        grown.add(x[1500:1502], ids[1500:1502])


def test_hnsw_cannot_remove_in_place(clustered):
    x, ids = clustered
    index = VectorIndex.build(x[:500], ids[:500], IndexSpec(index_type="hnsw", hnsw_m=8))
    assert not index.can_remove
    with pytest.raises(NotImplementedError, match="rebuild"):
        index.remove(ids[:3])


def test_needs_rebuild_when_the_collection_outgrows_its_quantizer(clustered):
    x, ids = clustered
    spec = replace(IVFPQ_FAST, nprobe=4)
    index = VectorIndex.build(x[:1000], ids[:1000], spec)
    assert index.params["n_trained"] == 1000
    assert index.needs_rebuild(4000, spec) is None
    assert "grew from 1000 to 4001" in index.needs_rebuild(4001, spec)
    assert "call for a ivfflat" in VectorIndex.build(x[:1000], ids[:1000], spec).needs_rebuild(60_000, IndexSpec())


@pytest.mark.parametrize("spec", [FLAT, IndexSpec(index_type="ivfflat"), IVFPQ_FAST, IndexSpec(index_type="hnsw", hnsw_m=8)],
                         ids=["flat", "ivfflat", "ivfpq", "hnsw"])
def test_save_load_mmap_round_trip(tmp_path, clustered, spec):
    x, ids = clustered
    index = VectorIndex.build(x, ids, spec)
    path = tmp_path / "index.faiss"
    index.save(path)
    q = x[:64] + 0.02
    want = index.search(q, 10)
    for mmap in (False, True):
        loaded = VectorIndex.load(path, index.kind, index.params, mmap=mmap)
        loaded.attach(x, ids)
        for a, b in zip(want, loaded.search(q, 10)):
            np.testing.assert_array_equal(a, b)


def test_mmap_load_does_not_read_the_index_into_memory(tmp_path):
    """RSS grows by (much) less than the file when the index is memory-mapped; a normal load reads it all."""
    x = random_unit(200_000, 64, 4)  # a 51 MB flat index
    path = tmp_path / "big.faiss"
    VectorIndex.build(x, np.arange(len(x)), FLAT).save(path)
    size = path.stat().st_size
    code = (f"import sys, numpy as np; from mmsearch.index import VectorIndex\n"
            f"def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
            f"VectorIndex.load({str(path)!r}, 'flat', {{}}, mmap=False)  # warm up imports and allocator\n"
            f"r0 = rss(); ix = VectorIndex.load({str(path)!r}, 'flat', {{}}, mmap=sys.argv[1] == '1'); print(rss() - r0)")
    grow = {m: int(subprocess.run([sys.executable, "-c", code, m], capture_output=True, text=True, check=True).stdout)
            for m in ("0", "1")}
    assert grow["0"] > 0.8 * size, grow  # precondition: a normal load really reads the file
    assert grow["1"] < 0.2 * size, grow  # what remains is the id map and its reverse hash (~30 B per item)


@pytest.mark.parametrize("spec", [IVFPQ_FAST, IndexSpec(index_type="ivfflat")], ids=["ivfpq", "ivfflat"])
def test_large_k_is_answered_without_padding(clustered, spec):
    x, ids = clustered
    index = VectorIndex.build(x, ids, spec)
    q = x[:5] + 0.01
    D, I = index.search(q, 3000)
    assert I.shape == (5, 3000) and (I >= 0).all() and all(len(set(r)) == 3000 for r in I)
    assert (np.diff(D, axis=1) <= 1e-6).all()
    _, I_ref = exact(x, ids, normalise(q), 3000)
    assert recall_at(I, I_ref) >= 0.95


def test_format_1_ivfpq_files_still_answer_and_ask_for_a_rebuild(tmp_path, clustered):
    """Version 1 wrote IVF-PQ as IdMap2(IndexRefineFlat(IVFPQ)); such indexes keep working until updated."""
    import faiss

    x, ids = clustered
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(64), 64, 16, 8, 8, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.min_points_per_centroid = ivf.pq.cp.min_points_per_centroid = 1
    old = faiss.IndexIDMap2(faiss.IndexRefineFlat(ivf))
    old.train(x)
    old.add_with_ids(x, ids)
    path = tmp_path / "v1.faiss"
    faiss.write_index(old, str(path))
    index = VectorIndex.load(path, "ivfpq", {"nlist": 16, "nprobe": 2, "rerank_factor": 100}, mmap=True)
    q = x[:20] + 0.01
    _, I = index.search(q, 5, nprobe=16)
    _, I_ref = exact(x, ids, q.astype(np.float32), 5)
    assert recall_at(I, I_ref) >= 0.95
    assert index.needs_rebuild(len(x), IndexSpec()) is not None
