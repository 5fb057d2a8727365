"""Embedding on a Ray cluster: ``mmsearch index DIR --ray``.

The files a run must embed (the diff against the index is made on the driver, as without Ray)
become a Ray Data dataset of paths. :class:`EmbedWorker` actors, each loading the model once,
decode, preprocess and embed them in ``map_batches`` with the same code as the single-process path
(:func:`mmsearch.embedding.embed_files`), and Ray Data writes what they return as parquet shards
(:data:`SHARD_SCHEMA`: plain pyarrow reads them). The driver reads the shards back in file order
and hands them to the index writer, which commits them in the same atomic generations as ever:
same rows, same ids, same skipped files and reasons.

A worker that dies costs its batch only: Ray Data's actor pools restart the actor and run the
batch again (``max_restarts=-1, max_task_retries=-1``, their defaults). A driver
killed before the commit leaves the scratch folder, which the next run of mmsearch on that index
deletes; the index itself is untouched until the commit.

Pool size: actors that take every CPU starve Ray Data's read tasks and the run hangs
(ray-project/ray#44687), so by default the actors share the cluster's CPUs less half a CPU, and
each sets ONNX Runtime's threads from its share (actors see OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mmsearch.config import IndexingConfig, RayOptions
from mmsearch.media import MediaFile, Skipped
from mmsearch.store import MARKER, SCRATCH_PREFIX
from mmsearch.video import Shot

from . import ScaleError, connect

#: CPUs left to Ray Data's own tasks when the pool is sized automatically
READ_RESERVE = 0.5


def shard_schema(dim: int):
    """One row per embedded item (``role`` "item"), file that failed ("skip") or sampled video
    ("video": its shots and sampling mode), keyed by the file's position in the run; ``path`` as
    the file system's bytes (``os.fsdecode`` gives the name back)."""
    import pyarrow as pa

    return pa.schema([("file", pa.int64()), ("seq", pa.int32()), ("role", pa.string()), ("path", pa.binary()),
                      ("kind", pa.string()), ("t", pa.float64()), ("shot", pa.int32()),
                      ("embedding", pa.list_(pa.float32(), dim)), ("reason", pa.string()),
                      ("unreadable", pa.bool_()), ("shots", pa.string()), ("mode", pa.string())])


@dataclass(frozen=True)
class EncoderArgs:
    """What a worker needs to load the driver's model (picklable)."""

    model: str
    pretrained: str | None
    device: str | None
    backend: str
    precision: str
    threads: int

    @classmethod
    def of(cls, encoder, backend: str, threads: int, gpu: bool) -> EncoderArgs:
        from mmsearch import models

        folder = encoder.export_folder
        # a built-in model by name (each node has or makes its own export); another model by its export folder
        model = encoder.ref.name if folder is None or encoder.ref.name in models.BUILTINS else str(folder)
        return cls(model, None if model == str(folder) else encoder.ref.pretrained,
                   "cuda" if gpu else encoder.ref.device, backend, encoder.precision, threads)


class EmbedWorker:
    """A Ray Data actor: loads the model once, then embeds one batch of files per call."""

    def __init__(self, args: EncoderArgs, config: IndexingConfig) -> None:
        from mmsearch.encoder import get_encoder

        self.encoder = get_encoder(args.model, pretrained=args.pretrained, device=args.device, backend=args.backend,
                                   precision=args.precision, threads=args.threads)
        self.config = replace(config, ray=None, decode_threads=args.threads)  # the actor's share of the cores

    def __call__(self, batch: dict) -> pa.Table:  # noqa: F821
        from mmsearch.embedding import embed_files

        files = [MediaFile(os.fsdecode(bytes(p)), int(s), int(m), str(k))  # bytes: names need not be UTF-8
                 for p, s, m, k in zip(batch["path"], batch["size"], batch["mtime_ns"], batch["kind"])]
        rows = _Rows({f.path: int(i) for f, i in zip(files, batch["file"])})
        videos: dict = {}
        for ok, emb, _ in embed_files(files, self.encoder, self.config, on_skip=rows.skip, videos=videos):
            rows.items += zip(ok, emb)
        return rows.table(self.encoder.dim, videos)


class _Rows:
    """What one worker call returns (see :func:`shard_schema`)."""

    def __init__(self, position: dict[str, int]) -> None:
        self.position = position  # path -> the file's place in the run
        self.items: list[tuple[MediaFile, np.ndarray]] = []
        self.skips: list[Skipped] = []

    def skip(self, s: Skipped) -> None:
        """A file that failed; a video that broke part way loses the frames it had."""
        self.skips.append(s)
        self.items = [(f, v) for f, v in self.items if f.path != s.path]

    def table(self, dim: int, videos: dict[str, tuple[list[Shot], str]]):
        import pyarrow as pa

        cols: dict[str, list] = {name: [] for name in shard_schema(dim).names if name != "embedding"}

        def row(path: str, role: str, kind: str, seq: int = 0, t=None, shot=None, reason=None, unreadable=None,
                shots=None, mode=None) -> None:
            values = {"file": self.position[path], "seq": seq, "role": role, "path": os.fsencode(path), "kind": kind, "t": t,
                      "shot": shot, "reason": reason, "unreadable": unreadable, "shots": shots, "mode": mode}
            for name, v in values.items():
                cols[name].append(v)

        for seq, (f, _) in enumerate(self.items):
            row(f.path, "item", f.kind, seq=seq, t=f.t, shot=f.shot)
        for s in self.skips:
            row(s.path, "skip", "", reason=s.reason, unreadable=s.unreadable)
        for path, (shots, mode) in videos.items():
            if path in self.position and not any(s.path == path for s in self.skips):
                row(path, "video", "video", shots=json.dumps([[x.start, x.end] for x in shots]), mode=mode)
        # item rows first, with their vectors; skip and video rows carry a null embedding
        n = len(cols["file"])
        vectors = np.zeros((n, dim), np.float32)
        if self.items:
            vectors[:len(self.items)] = np.stack([v for _, v in self.items])
        schema = shard_schema(dim)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), dim,
                                                mask=pa.array(np.arange(n) >= len(self.items)))
        return pa.Table.from_arrays([emb if name == "embedding" else pa.array(cols[name], schema.field(name).type)
                                     for name in schema.names], schema=schema)


@dataclass(frozen=True)
class Pool:
    """How many actors embed, and what each asks of Ray."""

    workers: int
    cpus: float
    gpus: float
    threads: int  # ONNX Runtime threads per actor

    @classmethod
    def fit(cls, options: RayOptions, cluster_cpus: float, cluster_gpus: float = 0.0) -> Pool:
        """The pool ``options`` ask for, sized to the cluster where they leave it open: every actor
        together takes at most the cluster's CPUs less READ_RESERVE, so reads are never starved;
        actors on GPUs are as many as the GPUs hold."""
        budget = max(0.25, cluster_cpus - READ_RESERVE)
        workers = options.workers or max(1, int(cluster_cpus))
        if options.gpus_per_worker and not options.workers:
            workers = max(1, min(workers, int(cluster_gpus // options.gpus_per_worker)))
        cpus = options.cpus_per_worker if options.cpus_per_worker is not None else min(1.0, budget / workers)
        cpus = math.floor(cpus * 1000) / 1000  # rounded down: the pool never takes the reads' share
        return cls(workers, cpus, options.gpus_per_worker, max(1, math.floor(cpus + 0.5)))


def _scratch(index_path: Path, options: RayOptions) -> Path:
    """A new folder for this run's shards (every node must be able to write it)."""
    base = Path(options.scratch).resolve() if options.scratch else index_path
    folder = base / f"{SCRATCH_PREFIX}{secrets.token_hex(6)}"
    folder.mkdir(parents=True)
    (folder / MARKER).touch()  # so that the next run's sweep may delete it if this one is killed
    return folder


def embed_on_ray(
    files: Sequence[MediaFile],
    encoder,
    index_path: str | os.PathLike,
    config: IndexingConfig,
    on_progress: Callable[[int], None] | None = None,
    on_skip: Callable[[Skipped], None] | None = None,
    videos: dict | None = None,
) -> Iterator[tuple[list[MediaFile], np.ndarray, bool]]:
    """What :func:`mmsearch.embedding.embed_files` yields, embedded by actors on a Ray cluster:
    (records, embeddings, boundary) in file order. Texts are embedded here, as without Ray."""
    from mmsearch.embedding import embed_files

    texts = [f for f in files if f.kind == "text"]
    if texts:
        yield from embed_files(texts, encoder, config, on_progress)
    visual = [f for f in files if f.kind != "text"]
    if not visual:
        return
    options = config.ray or RayOptions()
    ray = connect(options.address)
    resources = ray.cluster_resources()
    pool = Pool.fit(options, float(resources.get("CPU", 1)), float(resources.get("GPU", 0)))
    scratch = _scratch(Path(index_path).resolve(), options)  # an absolute path: workers run elsewhere
    try:
        _run(ray, visual, EncoderArgs.of(encoder, config.backend, pool.threads, pool.gpus > 0), config, pool, scratch)
        yield from _read_back(scratch, visual, encoder.dim, config.batch_size, on_progress, on_skip, videos)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(ray, files: Sequence[MediaFile], args: EncoderArgs, config: IndexingConfig, pool: Pool, scratch: Path) -> None:
    """The Ray Data pipeline: paths -> actors -> parquet shards in ``scratch``."""
    rows = [{"file": i, "path": os.fsencode(f.path), "kind": f.kind, "size": f.size, "mtime_ns": f.mtime_ns}
            for i, f in enumerate(files)]
    blocks = max(1, min(len(rows), 4 * pool.workers, math.ceil(len(rows) / config.batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    out = ds.map_batches(EmbedWorker, fn_constructor_args=(args, config), batch_size=config.batch_size,
                         batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=pool.workers),
                         num_cpus=pool.cpus, **({"num_gpus": pool.gpus} if pool.gpus else {}))
    # Ray Data's actor pools default to max_restarts=-1, max_task_retries=-1: a dead actor is started
    # again and its batch run again
    out.write_parquet(str(scratch))


def _read_back(scratch: Path, files: Sequence[MediaFile], dim: int, batch_size: int,
               on_progress, on_skip, videos: dict | None) -> Iterator[tuple[list[MediaFile], np.ndarray, bool]]:
    """The shards in file order, ``batch_size`` files at a time (a video whole). Every shard is read
    before the first batch goes out: the writer's commits sweep the scratch folder away."""
    import pyarrow.parquet as pq

    shards = sorted(scratch.glob("*.parquet"))
    pending: dict[int, list] = {}
    for shard in shards:
        t = pq.read_table(shard).sort_by([("file", "ascending"), ("seq", "ascending")])
        cols = {name: t.column(name).to_pylist() for name in ("file", "role", "t", "shot", "reason", "unreadable",
                                                             "shots", "mode", "path")}
        is_item = np.array([r == "item" for r in cols["role"]], bool)
        vectors = _item_vectors(t.filter(is_item), dim)  # the item rows' vectors, in row order
        slot = np.cumsum(is_item) - 1  # row -> its vector (item rows only)
        for r in range(t.num_rows):
            pending.setdefault(cols["file"][r], []).append((r, vectors[slot[r]] if is_item[r] else None, cols))
    lost = len(files) - len(pending)
    if lost:
        raise ScaleError(f"{lost} of {len(files)} files came back from no Ray worker (shards in {scratch.parent}): "
                         "on a cluster of several machines, pass a scratch folder every node shares (RayOptions.scratch)")
    for start in range(0, len(files), batch_size):
        ok, vecs = [], []
        for i in range(start, min(len(files), start + batch_size)):
            for r, vector, cols in pending.pop(i, []):
                role = cols["role"][r]
                if role == "item":
                    t, shot = cols["t"][r], cols["shot"][r]
                    ok.append(replace(files[i], t=t, shot=shot) if files[i].kind == "video" else files[i])
                    vecs.append(vector)
                elif role == "skip" and on_skip:
                    on_skip(Skipped(files[i].path, cols["reason"][r], unreadable=bool(cols["unreadable"][r])))
                elif role == "video" and videos is not None:
                    videos[files[i].path] = ([Shot(a, b) for a, b in json.loads(cols["shots"][r])], cols["mode"][r])
        yield ok, (np.stack(vecs) if vecs else np.zeros((0, dim), np.float32)), True
        if on_progress:
            on_progress(min(len(files), start + batch_size) - start)


def _item_vectors(items, dim: int) -> np.ndarray:
    """(n, dim) float32 from the ``embedding`` column of rows that all have one (no nulls)."""
    emb = items.column("embedding").combine_chunks()
    if not len(emb):
        return np.zeros((0, dim), np.float32)
    return np.asarray(emb.values.to_numpy(zero_copy_only=False), np.float32).reshape(len(emb), dim)

