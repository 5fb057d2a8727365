"""A fake 3-node Ray cluster (``ray.cluster_utils.Cluster``, one process tree per node on this
machine), one per test: shard actors spread over the nodes, and a node removed between queries costs
nothing but a restart of its actors elsewhere (issue 18)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from mmsearch.config import IndexSpec


def _start(head_cpus: int, workers: int):
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus})
    nodes = [c.add_node(num_cpus=1) for _ in range(workers)]
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    # the scheduler's view lags the nodes' start: until it knows a node, an actor placed there with
    # soft node affinity (as shard actors are) lands on another one instead
    deadline = time.monotonic() + 60
    for node in [c.head_node, *nodes]:
        _wait_until_placeable(node.node_id, deadline)
    driver = ray.get_runtime_context().get_node_id()
    return c, [w for w in nodes if w.node_id != driver]  # the nodes a test may remove


@ray.remote(num_cpus=0)
class _Probe:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def _wait_until_placeable(node_id: str, deadline: float) -> None:
    """Place probe actors on ``node_id`` as ``mmsearch.scale.shards`` places shard actors, until one lands there."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    while True:
        probe = _Probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=True)).remote()
        landed = ray.get(probe.node.remote(), timeout=60)
        ray.kill(probe)
        if landed == node_id:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Ray scheduler still places no actor on node {node_id}")
        time.sleep(0.5)


@pytest.fixture
def cluster(model_cache):
    c, removable = _start(head_cpus=1, workers=2)
    yield c, removable
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def cluster_of_workers(model_cache):
    """A head that runs nothing (no CPU) and three 1-CPU workers: every actor lands on a worker, and
    at most one worker is the node the driver is attached to."""
    c, removable = _start(head_cpus=0, workers=3)
    yield c, removable
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




def test_embedding_survives_a_node_removed_mid_run(cluster_of_workers, tmp_path, encoder):
    """A node that goes away while its actor embeds: Ray starts the actor again on a node left and
    runs the lost batches again; the index is the one a single process makes."""
    import time

    from mmsearch.config import IndexingConfig, RayOptions
    from mmsearch.indexing import index_folder
    from ray_runs import BackgroundIndex, actor_pids, assert_same_index, dev_photos

    c, removable = cluster_of_workers
    folder = dev_photos(tmp_path / "photos", 600)
    index_folder(folder, tmp_path / "single", encoder=encoder)
    config = IndexingConfig(batch_size=1, ray=RayOptions(workers=3, cpus_per_worker=0.5))
    run = BackgroundIndex(folder, tmp_path / "ray", encoder, config)
    raylets = {n.all_processes["raylet"][0].process.pid: n for n in removable}
    deadline, victim, seen = time.monotonic() + 120, None, None
    while victim is None:
        assert run.running() and time.monotonic() < deadline, f"the run ended before a node could be removed: {run.error}"
        busy = [n for pid, n in raylets.items() if actor_pids(parent=pid)]
        seen = seen or (time.monotonic() if busy else None)
        if busy and time.monotonic() > seen + 1:  # actors up for 1 s: batches done, others under way
            victim = busy[0]
        time.sleep(0.05)
    c.remove_node(victim)
    removed_while_running = run.running()
    run.finish()
    assert removed_while_running
    assert_same_index(tmp_path / "single", tmp_path / "ray", 600)
