"""Issue 19: an automatic IVF-PQ index chooses its codes by measurement (plain 8-bit PQ, 4-bit
fast-scan PQ), records the trials, and meets the target recall on seeded clustered data (tight
Gaussian clusters of mixed spreads, as video frames and near-duplicate photos make); tuning walks
to the target instead of sweeping every nprobe at every re-rank depth."""

from __future__ import annotations

import numpy as np
import pytest

from mmsearch.config import IndexSpec
from mmsearch.index import VectorIndex
from mmsearch.index.choice import Choice, candidates
from mmsearch.index.exact import exact_knn
from mmsearch.index.params import IndexParams
from mmsearch.index.plan import plan_index
from mmsearch.index.tuning import MAX_RERANK_FACTOR, PLATEAU

AUTO = IndexSpec(flat_max=1000, ivfflat_max=1000, choose_sample=8000)  # IVF-PQ from 1,000 vectors on


def clustered(n: int, clusters: int, d: int, seed: int) -> np.ndarray:
    """Unit vectors around random centres, each cluster with its own spread (0.05-0.5, log-uniform)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    spread = np.exp(rng.uniform(np.log(0.05), np.log(0.5), clusters)).astype(np.float32)
    label = rng.integers(0, clusters, n)
    x = centres[label] / np.linalg.norm(centres[label], axis=1, keepdims=True)
    x = x + spread[label, None] / np.sqrt(d) * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = clustered(30_000 + 300, 40, 64, 7)
    return x[300:], x[:300]  # stored, held-out queries from the same clusters


@pytest.fixture(scope="module")
def auto_index(data):
    x, _ = data
    return VectorIndex.build(x, np.arange(len(x), dtype=np.int64) * 7, AUTO)


def recall10(index: VectorIndex, x: np.ndarray, q: np.ndarray) -> float:
    _, truth = exact_knn(q, x, 10, np.arange(len(x), dtype=np.int64) * 7)
    _, got = index.search(q, 10)
    return float(np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(got, truth)]))


def test_the_codes_are_chosen_by_measurement_and_recorded(auto_index):
    c = auto_index.config.choice
    assert c is not None and c.sample == 8000
    assert [t.codes for t in c.trials] == [codes for codes, _, _ in candidates(64, 64)] == ["PQ64", "PQ64x4fsr"]
    reached = [t for t in c.trials if t.reached]
    best = min(reached, key=lambda t: t.ms_per_query) if reached else max(c.trials, key=lambda t: t.recall)
    assert c.chosen == best.codes  # the cheapest that reached the target
    plan = auto_index.config.plan
    assert (plan.m, plan.nbits) == {"PQ64": (64, 8), "PQ64x4fsr": (64, 4)}[c.chosen]
    assert c.chosen in plan.reason and auto_index.params["choice"]["chosen"] == c.chosen
    assert IndexParams.from_json(auto_index.params).choice == c  # the manifest's JSON round-trips
    assert c.chosen in c.summary() and "by measurement on 8000 vectors" in c.summary()


def test_the_chosen_index_meets_the_target_on_held_out_queries(auto_index, data):
    x, q = data
    assert auto_index.config.tuning.reached
    assert recall10(auto_index, x, q) >= 0.93  # tuned to 0.95 on stored vectors; fresh queries land near it


def test_a_fast_scan_index_builds_searches_saves_and_removes(data, tmp_path):
    x, q = data
    ids = np.arange(len(x), dtype=np.int64) * 7
    plan = plan_index(len(x), 64, IndexSpec(index_type="ivfpq", pq_m=32))
    from dataclasses import replace

    plan = replace(plan, nbits=4, codes="PQ32x4fsr")
    index = VectorIndex._from_plan(x, ids, plan, IndexSpec(index_type="ivfpq", pq_m=32))
    assert type(index._index).__name__ == "IndexIVFPQFastScan"
    assert index.config.tuning.reached and recall10(index, x, q) >= 0.93
    index.save(tmp_path / "index.faiss")
    loaded = VectorIndex.load(tmp_path / "index.faiss", "ivfpq", index.params, vectors=index.lookup)
    np.testing.assert_array_equal(loaded.search(q, 10)[1], index.search(q, 10)[1])
    assert index.remove(ids[:100]) == 100 and not np.isin(ids[:100], index.search(x[:100], 10)[1]).any()
    assert index.params["codes"] == "PQ32x4fsr" and index.params["nbits"] == 4


def test_smaller_codes_chosen_on_purpose_do_not_force_a_rebuild(auto_index, data):
    x, _ = data
    assert auto_index.needs_rebuild(len(x), AUTO) is None


def test_a_forced_ivfpq_index_keeps_plain_pq_without_trials(data):
    x, _ = data
    index = VectorIndex.build(x[:5000], np.arange(5000), IndexSpec(index_type="ivfpq"))
    assert index.config.choice is None and index.config.plan.codes is None and "choice" not in index.params


def test_tuning_deepens_re_ranking_once_more_lists_stop_paying(auto_index):
    sweep = auto_index.config.tuning.sweep
    for a, b in zip(sweep, sweep[1:]):
        if a.rerank_factor == b.rerank_factor:
            assert b.nprobe == 2 * a.nprobe or b.nprobe == auto_index.nlist  # more lists...
    for a, b, c in zip(sweep, sweep[1:], sweep[2:]):
        if a.rerank_factor == b.rerank_factor and b.recall - a.recall < PLATEAU and b.nprobe < auto_index.nlist:
            assert c.rerank_factor == 2 * b.rerank_factor and c.nprobe == b.nprobe  # ...until they stop paying
    assert sweep[-1].recall >= 0.95 and all(p.recall < 0.95 for p in sweep[:-1])


def test_coarse_codes_walk_to_deeper_re_ranking_without_sweeping_every_list(data):
    x, q = data
    spec = IndexSpec(index_type="ivfpq", pq_m=8)  # 8 bytes for 64 dimensions: codes cannot order tight clusters
    index = VectorIndex.build(x[:10_000], np.arange(10_000), spec)
    sweep = index.config.tuning.sweep
    factors = [p.rerank_factor for p in sweep]
    assert factors[0] == 4 and factors[-1] > 4 and factors == sorted(factors)  # it re-ranked deeper
    assert index.config.tuning.reached
    probes = sorted({p.nprobe for p in sweep})
    assert probes[-1] < index.nlist  # lists stopped paying long before all of them were visited
    assert len(sweep) <= len(probes) + len(set(factors))  # a walk: each step grows one knob
    deeper = [p for p in sweep if 4 < p.rerank_factor < MAX_RERANK_FACTOR]
    assert len({p.nprobe for p in deeper}) == 1  # once lists stopped paying, only re-ranking grows (to its cap)


def test_mmsearch_info_shows_the_choice_in_one_line(auto_index):
    from mmsearch.store import _choice_line

    line = _choice_line(auto_index.params)
    assert line.startswith(auto_index.config.choice.chosen + ", by measurement on 8000 vectors")
    assert all(t.codes in line for t in auto_index.config.choice.trials) and "\n" not in line
