"""The index's parameters as manifests store them (``index.params``): manifests written by earlier
releases read back into IndexPlan / IndexParams / Tuning and are written out again byte for byte;
indexes built now write the same keys in the same order; exact_knn ranks as a stable sort does."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmsearch.config import IndexSpec
from mmsearch.index import IndexParams, IndexPlan, Tuning, VectorIndex, exact_knn, plan_index

_TUNED = {"target_recall": 0.95, "k": 10, "queries": 500, "queries_from": "stored vectors, own entry left out"}
_SECONDS = {"train": 1.391, "add": 0.014, "tune": 0.801}

#: ``index.params`` as the release before IndexPlan wrote them (copied from real manifests)
TODAY = {
    "flat": {"memory_budget": 4294967296, "n_trained": 300, "kind": "flat",
             "reason": "300 <= flat_max 50000 vectors: exact search", "gpu_build": False,
             "build_seconds": {"train": 0.0, "add": 0.0, "tune": 0.0}},
    "hnsw": {"memory_budget": 4294967296, "n_trained": 3000, "kind": "hnsw", "reason": "forced index type hnsw",
             "hnsw_m": 8, "ram_bytes_estimate": 1008000, "gpu_build": False, "ef_search": 16,
             "tuning": {**_TUNED, "sweep": [{"ef_search": 16, "recall": 0.994}], "recall": 0.994, "reached": True},
             "build_seconds": _SECONDS},
    "ivfflat": {"memory_budget": 4294967296, "n_trained": 3000, "kind": "ivfflat",
                "reason": "forced index type ivfflat", "nlist": 76, "n_train": 3000, "ram_bytes_estimate": 792000,
                "gpu_build": False, "nprobe": 2,
                "tuning": {**_TUNED, "sweep": [{"nprobe": 1, "recall": 0.9092}, {"nprobe": 2, "recall": 0.983}],
                           "recall": 0.983, "reached": True},
                "build_seconds": _SECONDS},
    # tuning re-ranked deeper: rerank_factor 8 in the plan's place, the sweep over both factors
    "ivfpq": {"memory_budget": 4294967296, "n_trained": 5000, "kind": "ivfpq", "reason": "forced index type ivfpq",
              "nlist": 128, "n_train": 5000, "m": 8, "nbits": 8, "rerank_factor": 8, "ram_bytes_estimate": 80000,
              "gpu_build": False, "nprobe": 4,
              "tuning": {**_TUNED, "sweep": [{"nprobe": 64, "recall": 0.8704, "rerank_factor": 4},
                                             {"nprobe": 128, "recall": 0.8704, "rerank_factor": 4},
                                             {"nprobe": 1, "recall": 0.6758, "rerank_factor": 8},
                                             {"nprobe": 4, "recall": 0.9924, "rerank_factor": 8}],
                         "recall": 0.9924, "reached": True},
              "build_seconds": _SECONDS},
    "factory_ivf": {"memory_budget": 4294967296, "n_trained": 3000, "kind": "factory", "factory": "IVF16,SQ8",
                    "reason": "forced factory string", "rerank_factor": 4, "n_train": 3000, "gpu_build": False,
                    "nprobe": 1,
                    "tuning": {**_TUNED, "sweep": [{"nprobe": 1, "recall": 0.9952, "rerank_factor": 4}],
                               "recall": 0.9952, "reached": True},
                    "build_seconds": _SECONDS},
    "factory_pq": {"memory_budget": 4294967296, "n_trained": 3000, "kind": "factory", "factory": "PQ8",
                   "reason": "forced factory string", "rerank_factor": 4, "n_train": 3000, "gpu_build": False,
                   "tuning": {**_TUNED, "sweep": [{"recall": 0.9186}], "recall": 0.9186, "reached": False},
                   "build_seconds": _SECONDS},
    "tiny_ivf": {"memory_budget": 4294967296, "n_trained": 1, "kind": "ivfflat", "reason": "forced index type ivfflat",
                 "nlist": 1, "n_train": 1, "ram_bytes_estimate": 264, "gpu_build": False,
                 "build_seconds": {"train": 0.001, "add": 0.0, "tune": 0.0}},
    # format 1: no plan, no tuning record
    "format1_ivfpq": {"nlist": 16, "m": 8, "nbits": 8, "nprobe": 2, "rerank_factor": 10, "n_train": 1600},
    "format1_flat": {},
}


@pytest.mark.parametrize("name", list(TODAY))
def test_manifest_params_of_the_last_release_round_trip_byte_for_byte(name):
    stored = TODAY[name]
    params = IndexParams.from_json(json.loads(json.dumps(stored)))
    assert json.dumps(params.to_json(), indent=2) == json.dumps(stored, indent=2)
    assert params.plan.kind == stored.get("kind") and params.nprobe == stored.get("nprobe")
    if "tuning" in stored:
        assert isinstance(params.tuning, Tuning) and params.tuning.recall == stored["tuning"]["recall"]
        knob = "nprobe" if "nprobe" in stored else "ef_search" if "ef_search" in stored else None
        if knob:
            assert getattr(params.tuning.chosen, knob) == stored[knob]


def test_typed_fields_of_a_tuned_ivfpq_manifest():
    p = IndexParams.from_json(TODAY["ivfpq"])
    assert (p.plan.nlist, p.plan.m, p.plan.nbits, p.plan.n_train) == (128, 8, 8, 5000)
    assert p.rerank_factor == 8 and p.tuning.chosen.rerank_factor == 8 and p.tuning.sweep[0].rerank_factor == 4
    assert p.build_seconds.tune == 0.801 and p.gpu_build is False and not p.legacy_refine


def test_unknown_keys_are_kept():
    stored = dict(TODAY["flat"], some_future_key={"a": 1})
    assert IndexParams.from_json(stored).to_json() == stored


def test_plan_json_is_what_manifests_hold():
    plan = plan_index(3000, 32, IndexSpec(index_type="ivfpq", pq_m=8))
    assert isinstance(plan, IndexPlan)
    assert list(plan.to_json()) == ["memory_budget", "n_trained", "kind", "reason", "nlist", "n_train", "m", "nbits",
                                    "rerank_factor", "ram_bytes_estimate"]
    assert IndexPlan.from_json(plan.to_json()) == plan
    factory = plan_index(3000, 32, IndexSpec(factory=" IVF16,SQ8 "))
    assert factory.to_json() == {"memory_budget": 4294967296, "n_trained": 3000, "kind": "factory",
                                 "factory": "IVF16,SQ8", "reason": "forced factory string", "rerank_factor": 4}


def _clustered(n: int, d: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, d))[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.arange(n) * 3


@pytest.mark.parametrize("spec, like", [(IndexSpec(index_type="flat"), "flat"),
                                        (IndexSpec(index_type="hnsw", hnsw_m=8), "hnsw"),
                                        (IndexSpec(index_type="ivfflat"), "ivfflat"),
                                        (IndexSpec(index_type="ivfpq", pq_m=8), "ivfpq"),
                                        (IndexSpec(factory="IVF16,SQ8"), "factory_ivf"),
                                        (IndexSpec(factory="PQ8"), "factory_pq")],
                         ids=["flat", "hnsw", "ivfflat", "ivfpq", "factory_ivf", "factory_pq"])
def test_indexes_built_now_write_the_keys_of_the_last_release_in_its_order(spec, like):
    import faiss

    faiss.omp_set_num_threads(1)
    x, ids = _clustered(3000)
    index = VectorIndex.build(x, ids, spec)
    assert list(index.params) == list(TODAY[like])
    if "tuning" in TODAY[like]:
        assert list(index.params["tuning"]) == list(TODAY[like]["tuning"])
    changed = index.params
    changed["kind"] = "something else"
    assert index.params["kind"] == index.config.plan.kind == index.kind  # params is a copy, not the state


@pytest.mark.parametrize("block", [64, 1000, 65536])
def test_exact_knn_ranks_as_a_stable_sort_of_all_scores(block):
    """Small integer vectors: every score is exact whatever the blocking, and ties abound."""
    rng = np.random.default_rng(1)
    x = rng.integers(-2, 3, (2500, 8)).astype(np.float32)
    ids = 10 + 3 * np.arange(2500)
    q = rng.integers(-2, 3, (5, 8)).astype(np.float32)
    bias = rng.choice(np.float32([0, -0.5, -1]), len(x))
    for b in (None, bias):
        scores = q @ x.T + (0 if b is None else b)
        order = np.argsort(-scores, axis=1, kind="stable")
        for k in (1, 4, 50, 2500, 4000):
            D, I = exact_knn(q, x, k, ids, bias=b, block=block)
            assert I.dtype == np.int64 and D.dtype == np.float32 and I.shape == (5, min(k, 2500))
            np.testing.assert_array_equal(I, ids[order[:, :k]])
            np.testing.assert_array_equal(D, np.take_along_axis(scores, order[:, :k], 1))
    _, rows = exact_knn(q, x, 10)  # without ids: row numbers
    np.testing.assert_array_equal(rows, np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10])
