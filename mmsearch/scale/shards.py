"""An IVF-PQ index built and searched as shards, the autofaiss way.

Build (:meth:`ShardedIndex.build`): the driver plans the index as a single build would
(:func:`mmsearch.index.plan_index`, codes chosen on a sample), trains the coarse quantizer and the
codes once on a bounded sample, and writes that trained, empty index (``template.faiss``). Each
shard then adds a consecutive range of the vectors under their global 64-bit ids, in parallel Ray
tasks (or in this process without Ray), and writes ``shard-NNNN.faiss``. The manifest
(``shards.json``, :class:`ShardsManifest`) is written last, atomically: a killed build leaves no
index that could be opened half-made.

Search (:meth:`ShardedIndex.search`): the same search as :class:`mmsearch.index.VectorIndex` (the
same nprobe, depth and exact re-ranking of the candidates from the stored vectors), with the
candidate step scattered to one searcher per shard (a Ray actor holding its shard memory-mapped,
or the shard mapped here) and gathered with ``faiss.merge_knn_results``. The shards share one
quantizer and their codes are the codes a single build writes, so the answers are the single
build's. Tuning runs through the same path.

Merge (:meth:`ShardedIndex.merge`): into one in-memory index (``merge_from``, for a moderate N),
or with ``on_disk=True`` into one ``.ivfdata`` file that is memory-mapped when searched
(``faiss.contrib.ondisk.merge_ondisk``; plain 8-bit PQ codes only, fast-scan lists are not laid
out for it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from mmsearch._util import atomic_write_text
from mmsearch.config import IndexSpec
from mmsearch.errors import BadArgumentError, IndexFormatError, IndexNotFoundError
from mmsearch.index import (
    IndexParams,
    IndexPlan,
    VectorIndex,
    VectorLookup,
    _faiss,
    gpu,
    plan_index,
)
from mmsearch.index._checks import as_matrix, check_ids
from mmsearch.index.choice import choose_codes
from mmsearch.index.files import read_index, write_index
from mmsearch.index.vector_index import _training_sample

SHARDS_FORMAT = 1
MANIFEST = "shards.json"
TEMPLATE = "template.faiss"


@dataclass(frozen=True)
class ShardFile:
    name: str  # file in the shards folder
    first_row: int  # the shard holds rows [first_row, first_row + count) of the vectors it was built from
    count: int


@dataclass(frozen=True)
class ShardsManifest:
    """What ``shards.json`` records: the format, the index's kind and parameters (as a single
    build's manifest holds them, tuning included) and the shard files."""

    format: int
    d: int
    kind: str
    params: dict
    shards: tuple[ShardFile, ...]
    source: str | None = None  # what the vectors were: an index's folder and generation (build_for_index)

    @property
    def ntotal(self) -> int:
        return sum(s.count for s in self.shards)

    def write(self, folder: Path) -> None:
        atomic_write_text(folder / MANIFEST, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path) -> ShardsManifest:
        path = folder / MANIFEST
        if not path.is_file():
            raise IndexNotFoundError(f"{folder} holds no sharded index (no {MANIFEST}): build one with "
                                     "ShardedIndex.build")
        try:
            d = json.loads(path.read_text())
            if d.get("format") != SHARDS_FORMAT:
                raise IndexFormatError(f"{path} has format {d.get('format')!r}, this mmsearch reads {SHARDS_FORMAT}: "
                                       "upgrade mmsearch or rebuild the shards")
            return cls(d["format"], int(d["d"]), d["kind"], d["params"], tuple(ShardFile(**s) for s in d["shards"]),
                       d.get("source"))
        except (ValueError, KeyError, TypeError) as e:
            raise IndexFormatError(f"{path} is malformed ({e!r}): rebuild the shards") from None


def _add_shard(template: bytes, vectors: Any, ids: np.ndarray, first: int, stop: int, out: str) -> int:
    """One shard: the trained template, plus rows [first, stop) under their global ids, written to
    ``out``. ``vectors`` is an array or the path of a .npy file (memory-mapped here)."""
    faiss = _faiss.faiss_module()

    x = np.load(vectors, mmap_mode="r") if isinstance(vectors, (str, os.PathLike)) else vectors
    index = faiss.deserialize_index(np.frombuffer(template, np.uint8))
    for s in range(first, stop, 65536):
        e = min(stop, s + 65536)
        index.add_with_ids(np.ascontiguousarray(x[s:e], np.float32), np.ascontiguousarray(ids[s:e], np.int64))
    write_index(index, out)
    return int(index.ntotal)


def _add_shards(template: bytes, vectors, x: np.ndarray, ids: np.ndarray, folder: Path, files: Sequence[ShardFile],
                ray: bool) -> None:
    """Every shard's codes, in parallel Ray tasks or one after another here."""
    if not ray:
        for f in files:
            _add_shard(template, x, ids, f.first_row, f.first_row + f.count, str(folder / f.name))
        return
    from . import connect

    r = connect()
    task = r.remote(_add_shard)
    # the arrays go to the object store once, not once per task (a .npy path is read by each task)
    shared = (r.put(template), vectors if isinstance(vectors, (str, os.PathLike)) else r.put(x), r.put(ids))
    r.get([task.remote(*shared, f.first_row, f.first_row + f.count, str(folder / f.name)) for f in files])


class _LocalShard:
    """A shard searched in this process, memory-mapped."""

    def __init__(self, path: str, kind: str, params: dict) -> None:
        self.index = VectorIndex.load(path, kind, params, mmap=True)

    def raw_search(self, q: np.ndarray, k: int, nprobe: int | None):
        return self.index._raw_search(q, k, nprobe, None)

    def ids(self) -> np.ndarray:
        return self.index.ids()

    def node(self) -> str | None:
        """The Ray node this shard is searched on (None: not in a Ray actor)."""
        try:
            import ray
        except ImportError:
            return None
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _spread(ray, n: int) -> list:
    """The node each of ``n`` actors is sent to, round robin over the cluster's live nodes (None:
    none known): Ray's own "SPREAD" is best effort and can put every actor on one node."""
    nodes = sorted(node["NodeID"] for node in ray.nodes() if node.get("Alive"))
    return [nodes[i % len(nodes)] if nodes else None for i in range(n)]


class _Placement:
    """Shard actors started on the nodes ``_spread`` picks. Node affinity is soft, so that an actor
    whose node is gone starts again on another; but then a node's raylet may also pass a new actor on
    to another node while it is briefly busy. An actor found elsewhere than sent is started again,
    up to ``tries`` times, then left where it is (searching works on any node)."""

    def __init__(self, ray, actor, kind: str, params: dict, tries: int = 10, pause: float = 0.3) -> None:
        self.ray, self.actor, self.kind, self.params, self.tries, self.pause = ray, actor, kind, params, tries, pause

    def _start(self, path: str, node: str | None) -> _RayShard:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        where = NodeAffinitySchedulingStrategy(node, soft=True) if node else "SPREAD"
        return _RayShard(self.ray, self.actor.options(scheduling_strategy=where).remote(path, self.kind, self.params))

    def shards(self, paths: Sequence[str]) -> list[_RayShard]:
        wants = _spread(self.ray, len(paths))
        shards: list[_RayShard | None] = [None] * len(paths)
        for attempt in range(self.tries):
            shards = [s or self._start(p, node) for s, p, node in zip(shards, paths, wants)]
            landed = self.ray.get([s.actor.node.remote() for s in shards])
            wrong = [i for i, node in enumerate(wants) if node is not None and landed[i] != node]
            if not wrong or attempt == self.tries - 1:
                break
            for i in wrong:
                self.ray.kill(shards[i].actor)
                shards[i] = None
            time.sleep(self.pause)
        return shards


class ShardedIndex(VectorIndex):
    """A sharded IVF-PQ index: searched like a :class:`VectorIndex` (same settings, same answers)."""

    def __init__(self, folder: Path, manifest: ShardsManifest, template: Any, searchers: Sequence[Any],
                 vectors: VectorLookup | None, ray=None) -> None:
        super().__init__(template, manifest.kind, manifest.params, vectors)
        self.folder, self.manifest, self.searchers, self._ray = folder, manifest, list(searchers), ray
        self.read_only = True

    # ---- building ----------------------------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray | str | os.PathLike, ids: np.ndarray, folder: str | os.PathLike,
              shards: int = 2, spec: IndexSpec = IndexSpec(), ray: bool = False,
              plan: IndexPlan | None = None, source: str | None = None) -> ShardedIndex:
        """Build an IVF-PQ index over ``vectors`` (an (n, d) array, or a .npy file every Ray worker
        can read) under ``ids`` into ``folder`` as ``shards`` shards; ``ray`` adds the shards in Ray
        tasks (a connected cluster: :func:`mmsearch.scale.connect`) and searches them with Ray actors.
        ``plan`` forces the layout (default: what ``spec`` gives a single build)."""
        folder = Path(folder).resolve()  # absolute: Ray tasks and actors may run elsewhere
        if isinstance(vectors, (str, os.PathLike)):
            vectors = Path(vectors).resolve()
        x = np.load(vectors, mmap_mode="r") if isinstance(vectors, Path) else as_matrix(vectors, "vectors")
        n, d = x.shape
        ids = np.ascontiguousarray(check_ids(ids, n), np.int64)  # unique, non-negative: -1 means "none" to faiss
        if not 1 <= shards <= n:
            raise BadArgumentError(f"shards must be between 1 and the {n} vectors, got {shards}")
        template, params = cls._trained_template(x, spec, plan)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)  # the folder holds no index until the new manifest
        write_index(template, folder / TEMPLATE)
        bounds = np.linspace(0, n, shards + 1).astype(int)
        files = [ShardFile(f"shard-{i:04d}.faiss", int(a), int(b - a)) for i, (a, b) in enumerate(pairwise(bounds))]
        _add_shards(bytes(_faiss.faiss_module().serialize_index(template)), vectors, x, ids, folder, files, ray)
        manifest = ShardsManifest(SHARDS_FORMAT, d, "ivfpq", params.to_json(), tuple(files), source)
        self = cls.open(folder, x, ids, ray=ray, manifest=manifest)
        if self.nlist:
            self.tune(spec)  # through the sharded search, as queries will run
        manifest = replace(manifest, params=self.config.to_json())
        manifest.write(folder)
        self.manifest = manifest
        return self

    @staticmethod
    def _trained_template(x: np.ndarray, spec: IndexSpec, plan: IndexPlan | None) -> tuple[Any, IndexParams]:
        """The empty index a single build would make, trained once on its bounded sample."""
        n, d = x.shape
        forced = plan is not None
        plan = plan or plan_index(n, d, replace(spec, index_type="ivfpq") if spec.index_type == "auto" else spec)
        if plan.kind != "ivfpq":
            raise BadArgumentError(f"sharded indexes are IVF-PQ; --index-type {spec.index_type} is not")
        choice = None
        if not forced and spec.index_type == "auto" and spec.choose_sample > 0:
            plan, choice = choose_codes(VectorIndex, x, plan, spec)
        template = _faiss.new_index(plan, d)
        _faiss.seed(template, spec.seed)
        train, plan = _training_sample(template, x, plan, spec)
        gpu.train(template, np.ascontiguousarray(train, np.float32), gpu.use_gpu(spec))  # on a GPU when there is one
        return template, replace(IndexParams.of_plan(plan), choice=choice)

    # ---- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike, vectors: np.ndarray | None = None, ids: np.ndarray | None = None,
             ray: bool = False, manifest: ShardsManifest | None = None) -> ShardedIndex:
        """The sharded index in ``folder``; ``vectors``/``ids`` (the stored vectors, e.g. an index's
        memory-mapped embeddings) turn on exact re-ranking; ``ray`` searches each shard in a Ray actor."""
        folder = Path(folder)
        manifest = manifest or ShardsManifest.read(folder)
        template = read_index(folder / TEMPLATE, manifest.kind)
        paths = [str(folder / s.name) for s in manifest.shards]
        if ray:
            from . import connect

            r = connect()
            # no CPU slot (mostly waiting on memory); an actor lost with its node is started again elsewhere
            actor = r.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_LocalShard)
            searchers = _Placement(r, actor, manifest.kind, manifest.params).shards(paths)
        else:
            searchers = [_LocalShard(p, manifest.kind, manifest.params) for p in paths]
        lookup = VectorLookup(vectors, ids) if vectors is not None else None
        return cls(folder, manifest, template, searchers, lookup, ray=ray)

    # ---- what VectorIndex asks of its faiss index ------------------------------------------------
    @property
    def ntotal(self) -> int:
        return self.manifest.ntotal

    def ids(self) -> np.ndarray:
        if self._ids is None:
            self._ids = np.sort(np.concatenate([s.ids() for s in self.searchers]))
        return self._ids

    def _raw_search(self, q: np.ndarray, k: int, nprobe: int | None, ef: int | None):
        """Each shard's best ``k`` from its codes, merged: the single index's best ``k``."""
        faiss = _faiss.faiss_module()

        parts = [s.raw_search(q, k, nprobe) for s in self.searchers]
        if self._ray:
            parts = self._ray_get(parts)
        D = np.ascontiguousarray(np.stack([p[0] for p in parts]), np.float32)
        I = np.ascontiguousarray(np.stack([p[1] for p in parts]), np.int64)
        return faiss.merge_knn_results(D, I, keep_max=True)

    def _ray_get(self, refs: list) -> list:
        from . import connect

        return connect().get(refs)

    def to_gpu(self) -> bool:
        return False  # shards are searched where they live

    # ---- merging -----------------------------------------------------------------------------------
    def merge(self, on_disk: bool = False) -> VectorIndex:
        """One index holding every shard's codes: in memory (``merge_from``), or ``on_disk`` into
        ``merged.faiss`` + ``merged.ivfdata`` in the shards folder, memory-mapped. Same answers."""
        faiss = _faiss.faiss_module()

        index = read_index(self.folder / TEMPLATE, self.kind)
        paths = [str(self.folder / s.name) for s in self.manifest.shards]
        if on_disk:
            index = self._merge_on_disk(faiss, index, paths)
        else:
            for p in paths:
                index.merge_from(read_index(p, self.kind), 0)
        merged = VectorIndex(index, self.kind, self.config, self._lookup)
        merged.read_only = on_disk
        return merged

    def _merge_on_disk(self, faiss, index, paths: list[str]):
        if isinstance(faiss.downcast_index(faiss.extract_index_ivf(index)), faiss.IndexIVFFastScan):
            raise BadArgumentError(f"fast-scan codes ({self.config.plan.codes}) cannot be merged on disk: "
                                   "merge in memory, or build with --index-type ivfpq")
        ivfdata, out = self.folder / "merged.ivfdata", self.folder / "merged.faiss"
        ivfdata.unlink(missing_ok=True)
        _faiss.merge_on_disk(index, paths, str(ivfdata))
        write_index(index, out)
        return _faiss.read_on_disk(str(out))


class _RayShard:
    """A shard searched by a Ray actor: ``raw_search`` returns an object ref."""

    def __init__(self, ray, actor) -> None:
        self.ray, self.actor = ray, actor

    def raw_search(self, q: np.ndarray, k: int, nprobe: int | None):
        return self.actor.raw_search.remote(q, k, nprobe)

    def ids(self) -> np.ndarray:
        return self.ray.get(self.actor.ids.remote())

    def node(self) -> str:
        return self.ray.get(self.actor.node.remote())


def build_for_index(index_path: str | os.PathLike, folder: str | os.PathLike, shards: int = 2,
                    spec: IndexSpec = IndexSpec(), ray: bool = False) -> ShardedIndex:
    """Shards of the vectors of the index at ``index_path`` (its memory-mapped embeddings, its item
    ids), for ``Searcher(index_path, shards=folder)``."""
    from mmsearch.store import EMBEDDINGS, Collection

    c = Collection.open(index_path, load_index=False)
    return ShardedIndex.build(c.path / c.manifest.generation_dir / EMBEDDINGS, c.items.id, folder, shards, spec, ray,
                              source=_source(c))


def _source(collection) -> str:
    """The index folder and generation the vectors come from (a re-embedded file keeps its id, so ids
    alone cannot tell shards of an older generation)."""
    return f"{Path(collection.path).resolve()}:{collection.manifest.generation_dir}"


def use_shards(collection, shards: str | os.PathLike | ShardedIndex) -> ShardedIndex:
    """Make ``collection`` answer its nearest-neighbour searches from ``shards`` (built from its vectors)."""
    sharded = shards if isinstance(shards, ShardedIndex) else ShardedIndex.open(shards)
    ids = np.asarray(collection.items.id, np.int64)
    if sharded.manifest.source not in (None, _source(collection)):
        raise IndexFormatError(f"shards {sharded.folder} were built from {sharded.manifest.source}, not from the "
                               f"current generation of index {collection.path}: build them again from it "
                               "(mmsearch.scale.shards.build_for_index)")
    if sharded.ntotal != len(ids) or not np.array_equal(sharded.ids(), np.sort(ids)):
        raise IndexFormatError(f"shards {sharded.folder} hold {sharded.ntotal} items, not the {len(ids)} of index "
                               f"{collection.path}: build them again from it (mmsearch.scale.shards.build_for_index)")
    sharded.attach(collection.embeddings, ids)
    collection._index = sharded
    return sharded
