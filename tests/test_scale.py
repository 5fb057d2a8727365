"""Scale-out on Ray (issue 18): embedding on a local Ray cluster gives the single-process index
(same rows, ids, skipped files, embeddings to float tolerance); a sharded IVF-PQ build answers
exactly as the single build on the same trained quantizer, merged or not; without Ray, --ray is one
line. One local Ray runtime (2 CPUs) serves the whole module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray
from conftest import VIDEOS, copy_photos

from mmsearch.config import IndexingConfig, IndexSpec, RayOptions
from mmsearch.index import VectorIndex
from mmsearch.indexing import index_folder
from mmsearch.store import Collection


@pytest.fixture(scope="module")
def ray_session(model_cache):
    """A local Ray runtime started after MMSEARCH_CACHE is set, so its workers share the session's cache."""
    from mmsearch.scale import connect

    connect("local", num_cpus=2)  # a runtime of its own, even where another cluster runs
    yield ray
    ray.shutdown()


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, d))
    x = centres[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ---- embedding ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def media(tmp_path_factory, pairs):
    """Real photos, a broken "photo", one real video clip and an empty one."""
    folder = tmp_path_factory.mktemp("ray-media") / "media"
    copy_photos(pairs, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    shutil.copy2(VIDEOS / "airplane_then_field.mp4", folder / "clip.mp4")
    (folder / "empty.mp4").write_bytes(b"")
    shutil.copy2(pairs.images[0], os.path.join(os.fsencode(folder), b"caf\xe9 (latin-1).jpg"))  # not UTF-8
    return folder


def _index(folder: Path, out: Path, encoder, config: IndexingConfig):
    skipped = []
    report = index_folder(folder, out, encoder=encoder, config=config, on_skip=skipped.append)
    return report, sorted((s.path, s.reason) for s in skipped), Collection.open(out)


def test_ray_embedding_matches_the_single_process_index(tmp_path, media, encoder, ray_session):
    one = _index(media, tmp_path / "single", encoder, IndexingConfig(batch_size=4))
    many = _index(media, tmp_path / "ray", encoder,
                  IndexingConfig(batch_size=4, ray=RayOptions(workers=2, cpus_per_worker=0.5)))
    (r1, skipped1, c1), (r2, skipped2, c2) = one, many
    assert skipped2 == skipped1 and len(skipped1) == 2  # the broken photo and the empty clip, same reasons
    assert (r2.added, r2.embedded, r2.total) == (r1.added, r1.embedded, r1.total)
    assert list(c2.items.path) == list(c1.items.path)
    assert np.array_equal(c2.items.id, c1.items.id)
    assert list(c2.items.kind) == list(c1.items.kind)
    np.testing.assert_array_equal(c2.items.t, c1.items.t)  # NaN for photos, frame times for the clip
    np.testing.assert_array_equal(c2.items.shot, c1.items.shot)
    assert "video" in set(c1.items.kind) and "image" in set(c1.items.kind)
    np.testing.assert_allclose(np.asarray(c2.embeddings), np.asarray(c1.embeddings), atol=2e-3)
    assert not any(p.name.startswith(".ray-embed-") for p in (tmp_path / "ray").iterdir())  # scratch gone


def test_ray_run_on_an_index_only_embeds_what_changed(tmp_path, media, encoder, ray_session):
    folder = tmp_path / "media"
    shutil.copytree(media, folder)
    config = IndexingConfig(batch_size=4, ray=RayOptions(workers=1))
    _index(folder, tmp_path / "idx", encoder, config)
    (folder / "clip.mp4").unlink()
    report, _, c = _index(folder, tmp_path / "idx", encoder, config)
    assert report.embedded == 0 and report.removed == 1
    assert "video" not in set(c.items.kind)


def test_pool_leaves_cpus_for_the_reads():
    from mmsearch.scale.embed import READ_RESERVE, Pool

    for cpus in (1, 2, 3, 16):
        pool = Pool.fit(RayOptions(), cpus)
        assert pool.workers * pool.cpus <= cpus - READ_RESERVE + 1e-9, (cpus, pool)
        assert pool.threads >= 1
    assert Pool.fit(RayOptions(workers=1), 2).cpus == 1.0
    assert Pool.fit(RayOptions(gpus_per_worker=1), 16, cluster_gpus=2).workers == 2  # as many as the GPUs hold
    assert Pool.fit(RayOptions(workers=3, cpus_per_worker=0.25), 2) == Pool(3, 0.25, 0.0, 1)


def test_without_ray_the_flag_is_one_line(tmp_path, photo_dir):
    """Ray missing (an import that fails, as on a machine without the extra): one line, exit 1, nothing written."""
    folder, _ = photo_dir
    code = ("import sys; sys.modules['ray'] = None\n"
            "from mmsearch.cli import main\n"
            f"sys.argv = ['mmsearch', 'index', {str(folder)!r}, '--index', {str(tmp_path / 'idx')!r}, '--ray']\n"
            "main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'mmsearch[ray]'" in lines[0], out.stderr
    assert not (tmp_path / "idx").exists()


def test_a_killed_runs_scratch_is_swept(tmp_path, media, encoder):
    """Shards a killed driver left in the index folder go with the next run; other folders stay."""
    from mmsearch.store import MARKER

    out = tmp_path / "idx"
    _index(media, out, encoder, IndexingConfig())
    left = out / ".ray-embed-0123456789ab"
    left.mkdir()
    (left / MARKER).touch()
    (left / "part-0.parquet").write_bytes(b"x")
    mine = out / ".ray-embed-notours"
    mine.mkdir()
    _index(media, out, encoder, IndexingConfig())
    assert not left.exists() and mine.exists()


# ---- sharded IVF-PQ ------------------------------------------------------------------------------------
SHARD_SPEC = IndexSpec(index_type="ivfpq", pq_m=8, nlist=32, choose_sample=0)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, ray_session):
    x = clustered(6000, 32, seed=1)
    ids = 10_000 + 3 * np.arange(len(x), dtype=np.int64)
    folder = tmp_path_factory.mktemp("shards")
    from mmsearch.scale.shards import ShardedIndex

    index = ShardedIndex.build(x, ids, folder, shards=3, spec=SHARD_SPEC, ray=True)
    return x, ids, folder, index


def _single_on_same_quantizer(folder: Path, x: np.ndarray, ids: np.ndarray, params: dict) -> VectorIndex:
    """The single-machine index: the shards' trained template, every vector added in one go."""
    from mmsearch.index.files import read_index
    from mmsearch.scale.shards import TEMPLATE

    faiss_index = read_index(folder / TEMPLATE, "ivfpq")
    faiss_index.add_with_ids(x, ids)
    single = VectorIndex(faiss_index, "ivfpq", params)
    single.attach(x, ids)
    return single


@pytest.mark.parametrize("settings", [{}, {"nprobe": 1}, {"nprobe": 4, "rerank_factor": 1}, {"nprobe": 32}])
def test_sharded_search_equals_the_single_build(sharded, settings):
    x, ids, folder, index = sharded
    single = _single_on_same_quantizer(folder, x, ids, index.params)
    q = clustered(300, 32, seed=2)
    D1, I1 = single.search(q, 10, **settings)
    D2, I2 = index.search(q, 10, **settings)
    assert np.array_equal(I1, I2)  # 100 % of the top-10
    np.testing.assert_allclose(D1, D2, rtol=1e-6, atol=1e-6)


def test_sharded_build_is_tuned_and_recorded(sharded):
    x, ids, folder, index = sharded
    from mmsearch.scale.shards import ShardsManifest

    m = ShardsManifest.read(folder)
    assert m.format == 1 and len(m.shards) == 3 and m.ntotal == len(x)
    assert [s.first_row for s in m.shards] == [0, 2000, 4000]
    assert m.params["tuning"]["reached"] and m.params["nprobe"] == index.config.nprobe
    assert np.array_equal(index.ids(), ids)


@pytest.mark.parametrize("on_disk", [False, True], ids=["in-memory", "on-disk"])
def test_merged_index_equals_the_shards(sharded, on_disk):
    x, _, _, index = sharded
    merged = index.merge(on_disk=on_disk)
    assert merged.ntotal == len(x)
    q = clustered(200, 32, seed=3)
    assert np.array_equal(merged.search(q, 10)[1], index.search(q, 10)[1])
    assert np.array_equal(merged.search(q, 10, nprobe=2, rerank_factor=1)[1],
                          index.search(q, 10, nprobe=2, rerank_factor=1)[1])


def test_fast_scan_shards_merge_in_memory_not_on_disk(tmp_path):
    from mmsearch.errors import BadArgumentError
    from mmsearch.scale.shards import ShardedIndex

    x = clustered(3000, 32, seed=4)
    ids = np.arange(len(x), dtype=np.int64)
    spec = IndexSpec(index_type="ivfpq", pq_m=8, nlist=16, choose_sample=0)
    from mmsearch.index.plan import plan_index

    plan = replace(plan_index(len(x), 32, spec), codes="PQ16x4fsr")
    index = ShardedIndex.build(x, ids, tmp_path, 2, spec, plan=plan)
    assert index.config.plan.codes == "PQ16x4fsr"
    q = clustered(300, 32, seed=5)
    merged, sharded = index.merge().search(q, 10, rerank_factor=1)[1], index.search(q, 10, rerank_factor=1)[1]
    # 4-bit codes give coarse distances that tie often; ties at the cut-off may fall either way
    overlap = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(merged, sharded)])
    assert overlap >= 0.99, overlap
    raw_m, raw_s = index.merge()._raw_search(q, 40, 4, None), index._raw_search(q, 40, 4, None)
    np.testing.assert_allclose(raw_m[0], raw_s[0], rtol=1e-6)  # the same distances, position by position
    with pytest.raises(BadArgumentError, match="cannot be merged on disk"):
        index.merge(on_disk=True)


def test_searcher_answers_from_shards_of_its_index(tmp_path, built_index, encoder, ray_session):
    from mmsearch.scale.shards import build_for_index
    from mmsearch.search import Searcher

    idx, _ = built_index
    spec = IndexSpec(index_type="ivfpq", pq_m=8, nlist=2, choose_sample=0)
    build_for_index(idx, tmp_path / "shards", shards=2, spec=spec)
    plain = Searcher(idx, encoder=encoder)
    from_shards = Searcher(idx, encoder=encoder, shards=tmp_path / "shards", rerank_factor=100)
    a = [h.path for h in plain.search_text("a dog running on grass", k=5)]
    b = [h.path for h in from_shards.search_text("a dog running on grass", k=5)]
    assert a == b  # a re-rank deep enough to hold every photo: the exact answer, like the flat index's


def test_shards_of_another_index_are_refused(tmp_path, built_index, encoder):
    from mmsearch.errors import IndexFormatError
    from mmsearch.scale.shards import ShardedIndex
    from mmsearch.search import Searcher

    idx, _ = built_index
    x = clustered(500, encoder.dim, seed=6)
    ShardedIndex.build(x, np.arange(500), tmp_path / "other", shards=2,
                       spec=IndexSpec(index_type="ivfpq", pq_m=8, nlist=4, choose_sample=0))
    with pytest.raises(IndexFormatError, match="build them again"):
        Searcher(idx, encoder=encoder, shards=tmp_path / "other")


def test_a_folder_without_shards_is_a_clear_error(tmp_path):
    from mmsearch.errors import IndexNotFoundError
    from mmsearch.scale.shards import ShardedIndex

    with pytest.raises(IndexNotFoundError, match="no shards.json"):
        ShardedIndex.open(tmp_path)


def test_an_actor_killed_mid_run_costs_only_its_batch(tmp_path, encoder, ray_session):
    """SIGKILL to an embedding actor while the run goes on: Ray starts it again and runs its batch
    again; the index is the one a single process makes."""
    import signal
    import time

    from ray_runs import BackgroundIndex, actor_pids, assert_same_index, dev_photos

    folder = dev_photos(tmp_path / "photos", 300)
    index_folder(folder, tmp_path / "single", encoder=encoder)
    run = BackgroundIndex(folder, tmp_path / "ray", encoder, IndexingConfig(batch_size=2, ray=RayOptions(workers=2)))
    deadline, seen = time.monotonic() + 120, None
    while seen is None or time.monotonic() < seen + 3:  # actors up for 3 s: batches done, others under way
        assert run.running() and time.monotonic() < deadline, f"the run ended before an actor could be killed: {run.error}"
        if seen is None and actor_pids():
            seen = time.monotonic()
        time.sleep(0.05)
    os.kill(actor_pids()[0], signal.SIGKILL)
    killed_while_running = run.running()
    run.finish()
    assert killed_while_running
    assert run.report.added == 300 and run.report.skipped == []
    assert_same_index(tmp_path / "single", tmp_path / "ray", 300)

def test_cli_index_on_ray_then_query(tmp_path, photo_dir, built_index):
    """`mmsearch index DIR --ray` as a user runs it (its own Ray runtime, in a fresh process), then
    `mmsearch query`: the same photos and the same top hits as the index built without Ray."""
    import json

    folder, _ = photo_dir
    idx = tmp_path / "idx"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mmsearch.cli", *map(str, args)], capture_output=True,
                              text=True, check=False)

    out = cli("index", folder, "--index", idx, "--ray", "--ray-address", "local", "--ray-workers", "1", "-q")
    assert out.returncode == 0, out.stderr
    info = json.loads(cli("info", "--index", idx, "--json").stdout)
    assert info["count"] == len(list(folder.rglob("*.jpg")))
    mine = json.loads(cli("query", "a dog running on the grass", "--index", idx, "--json", "-k", "3").stdout)
    ref = json.loads(cli("query", "a dog running on the grass", "--index", built_index[0], "--json", "-k", "3").stdout)
    assert [Path(h["path"]).name for h in mine] == [Path(h["path"]).name for h in ref]


def test_files_that_come_back_from_no_worker_are_an_error(tmp_path):
    """Shards written where the driver cannot see them (a scratch folder not shared by the nodes):
    one clear error before anything is committed, not files silently left out."""
    from mmsearch.media import MediaFile
    from mmsearch.scale import ScaleError
    from mmsearch.scale.embed import _read_back

    files = [MediaFile(str(tmp_path / "a.jpg"), 1, 1, "image"), MediaFile(str(tmp_path / "b.jpg"), 1, 1, "image")]
    with pytest.raises(ScaleError, match="2 of 2 files came back from no Ray worker"):
        next(_read_back(tmp_path, files, 8, 4, None, None, None))


def test_sharded_build_refuses_ids_faiss_cannot_hold(tmp_path):
    from mmsearch.scale.shards import ShardedIndex

    x = clustered(600, 16, seed=7)
    with pytest.raises(ValueError, match="negative"):
        ShardedIndex.build(x, np.arange(600) - 1, tmp_path, 2, SHARD_SPEC)
    with pytest.raises(ValueError, match="unique|duplicate"):
        ShardedIndex.build(x, np.zeros(600, np.int64), tmp_path, 2, SHARD_SPEC)


def test_shards_of_an_older_generation_are_refused(tmp_path, photo_dir, encoder):
    """A photo changed in place keeps its id: the shards' ids still match, their codes do not."""
    from mmsearch.errors import IndexFormatError
    from mmsearch.scale.shards import build_for_index
    from mmsearch.search import Searcher

    folder, mapping = photo_dir
    index_folder(folder, tmp_path / "idx", encoder=encoder)
    spec = IndexSpec(index_type="ivfpq", pq_m=8, nlist=2, choose_sample=0)
    build_for_index(tmp_path / "idx", tmp_path / "shards", shards=2, spec=spec)
    Searcher(tmp_path / "idx", encoder=encoder, shards=tmp_path / "shards")  # current: accepted
    a, b = sorted(mapping.values())[:2]
    shutil.copyfile(b, a)  # new content under the same name
    index_folder(folder, tmp_path / "idx", encoder=encoder)
    with pytest.raises(IndexFormatError, match="not from the current generation"):
        Searcher(tmp_path / "idx", encoder=encoder, shards=tmp_path / "shards")


A, B, C = ("aa" * 28, "bb" * 28, "cc" * 28)  # node ids as Ray writes them (28 bytes, hex)


class _FakeRay:
    """Enough of Ray for shards._Placement: nodes, actors that land where a script says, kill."""

    def __init__(self, nodes, landings):
        self._nodes, self.landings, self.killed, self.started = nodes, list(landings), [], []

    def nodes(self):
        return [{"NodeID": n, "Alive": True} for n in self._nodes]

    def get(self, refs):
        return list(refs)

    def kill(self, actor):
        self.killed.append(actor)

    def actor_class(self):
        fake = self

        class Actor:
            def __init__(self, wanted):
                self.wanted, self.landed = wanted, fake.landings.pop(0) or wanted
                self.node = type("M", (), {"remote": lambda _: self.landed})()

        class Options:
            def options(self, scheduling_strategy):
                wanted = scheduling_strategy.node_id if hasattr(scheduling_strategy, "node_id") else None
                return type("R", (), {"remote": lambda _, path, kind, params: fake.started.append(path)
                                      or Actor(wanted)})()
        return Options()


def test_a_shard_actor_passed_to_another_node_is_started_again_where_it_was_sent():
    from mmsearch.scale.shards import _Placement

    # the 2nd actor first lands on node A instead of B (a raylet passed it on), then where sent
    ray = _FakeRay([A, B, C], [None, A, None, None])
    shards = _Placement(ray, ray.actor_class(), "ivfpq", {}, pause=0).shards(["s0", "s1", "s2"])
    assert [s.actor.landed for s in shards] == [A, B, C]
    assert ray.started == ["s0", "s1", "s2", "s1"] and len(ray.killed) == 1


def test_an_actor_that_never_reaches_its_node_is_kept_where_it_runs():
    from mmsearch.scale.shards import _Placement

    ray = _FakeRay([A, B], [A, A, A, A])
    shards = _Placement(ray, ray.actor_class(), "ivfpq", {}, tries=3, pause=0).shards(["s0", "s1"])
    assert [s.actor.landed for s in shards] == [A, A]  # searching works on any node
    assert ray.started == ["s0", "s1", "s1", "s1"] and len(ray.killed) == 2
