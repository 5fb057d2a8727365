"""A fake 3-node Ray cluster (``ray.cluster_utils.Cluster``, one process tree per node on this
machine), one per test: shard actors spread over the nodes, and a node removed between queries costs
nothing but a restart of its actors elsewhere (issue 18)."""

from __future__ import annotations

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from mmsearch.config import IndexSpec


@pytest.fixture
def cluster(model_cache):
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    driver = ray.get_runtime_context().get_node_id()
    yield c, [w for w in workers if w.node_id != driver]  # the nodes a test may remove
    ray.shutdown()
    c.shutdown()


def unit(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, d))
    x = rng.standard_normal((n, d)) + 2 * centres[rng.integers(0, 20, n)]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_sharded_search_survives_a_node_removed(cluster, tmp_path):
    from mmsearch.scale.shards import ShardedIndex

    c, workers = cluster
    x = unit(4000, 32, seed=1)
    ids = np.arange(len(x), dtype=np.int64) * 5
    spec = IndexSpec(index_type="ivfpq", pq_m=8, nlist=16, choose_sample=0)
    index = ShardedIndex.build(x, ids, tmp_path / "shards", shards=3, spec=spec, ray=True)
    nodes = [s.node() for s in index.searchers]
    assert len(set(nodes)) >= 2  # spread over the cluster
    q = unit(200, 32, seed=2)
    before = index.search(q, 10)
    victim = next(w for w in workers if w.node_id in nodes)
    c.remove_node(victim)
    after = index.search(q, 10)  # the lost shards' actors start again on the nodes left
    assert np.array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0])
    assert victim.node_id not in {s.node() for s in index.searchers}

