"""Indexing pipeline: list files -> diff against the index -> decode -> embed -> commit.

Each stage is a plain function over plain data, so it can be driven on its own (and later mapped
over a cluster). ``index_folder`` runs them all: new files are embedded, changed ones (size or mtime)
re-embedded under the same item id, deleted ones dropped, the rest left alone. Work is committed
every ``IndexingConfig.commit_every`` images, so a killed run loses at most one chunk.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ._util import batched, prefetch_map
from .config import DEFAULT_MODEL, IndexingConfig, IndexSpec, ModelRef
from .errors import MediaError, ModelMismatchError
from .media import MediaFile, Skipped, load_image, scan
from .store import Collection, Items, commit, write_lock


@dataclass
class IndexReport:
    """What one ``index_folder`` run did."""

    index_path: str
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    total: int = 0  # items in the index afterwards
    index_kind: str | None = None
    seconds: float = 0.0
    embedded_per_second: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)


@dataclass
class Plan:
    """The difference between a folder on disk and the index."""

    keep_rows: np.ndarray  # rows of the current items that stay as they are
    to_embed: list[MediaFile]  # new or changed files
    reuse_ids: dict[str, int]  # path -> existing item id, for changed files
    removed: int  # items whose file is gone from under the root
    unchanged: int  # kept items under the root


def plan_update(files: Sequence[MediaFile], items: Items, root: str) -> Plan:
    """Compare scanned ``files`` under ``root`` with the index's ``items`` (size + mtime)."""
    prefix = root.rstrip(os.sep) + os.sep
    seen = {f.path: f for f in files}
    keep, reuse, removed, unchanged = [], {}, 0, 0
    current = set()
    for row, path in enumerate(items.path):
        under_root = path == root or path.startswith(prefix)
        f = seen.get(path)
        if f is None:
            if under_root:
                removed += 1  # deleted (or now unreadable) below the folder being indexed
            else:
                keep.append(row)  # another folder of the same index: untouched
            continue
        current.add(path)
        if int(items.size[row]) == f.size and int(items.mtime_ns[row]) == f.mtime_ns:
            keep.append(row)
            unchanged += 1
        else:
            reuse[path] = int(items.id[row])
    to_embed = [f for f in files if f.path not in current or f.path in reuse]
    return Plan(np.asarray(keep, dtype=np.int64), to_embed, reuse, removed, unchanged)


def decode_batch(files: Sequence[MediaFile], encoder, max_pixels: int):
    """Decode and preprocess a batch; returns (tensor or None, files that worked, skipped)."""
    import torch

    tensors, ok, bad = [], [], []
    for f in files:
        try:
            image = load_image(f.path, max_pixels=max_pixels, min_side=getattr(encoder, "image_size", None))
            tensors.append(encoder.preprocess(image))
            ok.append(f)
        except (MediaError, OSError) as e:
            bad.append(Skipped(f.path, str(e).split(": ", 1)[-1] if str(e).startswith(f.path) else str(e)))
    return (torch.stack(tensors) if tensors else None), ok, bad


def embed_files(
    files: Sequence[MediaFile],
    encoder,
    config: IndexingConfig = IndexingConfig(),
    on_progress: Callable[[int], None] | None = None,
    on_skip: Callable[[Skipped], None] | None = None,
):
    """Yield (files, embeddings) per batch; decoding of the next batches overlaps the forward pass."""
    work = lambda chunk: decode_batch(chunk, encoder, config.max_pixels)  # noqa: E731
    for pixels, ok, bad in prefetch_map(work, batched(list(files), config.batch_size), depth=2):
        for s in bad:
            if on_skip:
                on_skip(s)
        if pixels is not None:
            yield ok, encoder.embed_pixels(pixels)
        if on_progress:
            on_progress(len(ok) + len(bad))


def _model_record(ref: ModelRef, dim: int | None = None) -> dict:
    """What the manifest says about the model (dim stays None until the model has been loaded)."""
    name = os.path.abspath(ref.name) if os.path.isdir(ref.name) else ref.name  # usable from any cwd
    return {"name": name, "pretrained": ref.pretrained, "key": ref.key(), "dim": dim}


def check_model(manifest: dict, model_key: str, path) -> None:
    built = manifest["model"]["key"]
    if built != model_key:
        raise ModelMismatchError(
            f"index {path} was built with model {built!r}, not {model_key!r}: use --model "
            f"{manifest['model']['name']} or another --index folder"
        )


def index_folder(
    root: str | os.PathLike,
    index_path: str | os.PathLike,
    encoder=None,
    model: ModelRef | None = None,
    spec: IndexSpec = IndexSpec(),
    config: IndexingConfig = IndexingConfig(),
    on_progress: Callable[[int, int], None] | None = None,
    on_skip: Callable[[Skipped], None] | None = None,
) -> IndexReport:
    """Bring the index at ``index_path`` up to date with the images under ``root``.

    ``encoder`` defaults to the model that built the index (or ``model``, or mmsearch-lite for a new
    one). ``on_progress(done, total)`` is called as images are embedded; ``on_skip`` for each file
    that cannot be used (the run goes on). Returns an IndexReport.
    """
    from .index import VectorIndex

    t0 = time.perf_counter()
    root = os.path.abspath(os.fspath(root))
    index_path = Path(index_path)
    files, skipped = scan(root, config)
    for s in skipped:
        if on_skip:
            on_skip(s)
    report = IndexReport(str(index_path.resolve()), skipped=list(skipped))

    existing = Collection.open(index_path) if Collection.exists(index_path) else None
    if encoder is not None:
        ref = encoder.ref
    elif existing is not None and model is None:
        ref = ModelRef(existing.model["name"], existing.model["pretrained"])
    else:
        ref = model or ModelRef(DEFAULT_MODEL)
    if existing is not None:
        check_model(existing.manifest, ref.key(), index_path)  # before spending seconds loading it

    with write_lock(index_path):
        if Collection.exists(index_path):  # re-read under the lock: another writer may have committed
            existing = Collection.open(index_path)
        items = existing.items if existing else Items.empty()
        base = dict(existing.manifest) if existing else {"model": _model_record(ref), "next_id": 0}
        plan = plan_update(files, items, root)
        report.unchanged = plan.unchanged
        if plan.to_embed and encoder is None:  # the model loads only when there is work for it
            from .encoder import get_encoder

            encoder = get_encoder(ref.name, pretrained=ref.pretrained, device=ref.device)
        if encoder is not None:
            base["model"] = _model_record(ref, encoder.dim)
        dim = encoder.dim if encoder is not None else int(base["model"].get("dim") or 0)
        embeddings = np.asarray(existing.embeddings) if existing is not None and len(items) else np.zeros((0, dim), np.float32)
        items, embeddings = items.take(plan.keep_rows), embeddings[plan.keep_rows]

        def save(items, embeddings):
            vindex = VectorIndex.build(embeddings, items.id, spec) if len(items) else None
            return commit(index_path, items, embeddings, vindex, base)

        if not plan.to_embed:
            if plan.removed or existing is None:
                base = save(items, embeddings)
        else:
            done, total = 0, len(plan.to_embed)
            new_items, new_emb, since_commit = [], [], 0
            t_embed = time.perf_counter()

            def progress(n):
                nonlocal done
                done += n
                if on_progress:
                    on_progress(done, total)

            def skip(s):
                report.skipped.append(s)
                if on_skip:
                    on_skip(s)

            for ok, emb in embed_files(plan.to_embed, encoder, config, progress, skip):
                ids = []
                for f in ok:
                    if f.path in plan.reuse_ids:
                        ids.append(plan.reuse_ids[f.path])
                        report.updated += 1
                    else:
                        ids.append(base["next_id"])
                        base["next_id"] += 1
                        report.added += 1
                new_items.append(Items(np.asarray(ids, np.int64), [f.path for f in ok],
                                       np.asarray([f.size for f in ok], np.int64),
                                       np.asarray([f.mtime_ns for f in ok], np.int64), [f.kind for f in ok]))
                new_emb.append(emb)
                since_commit += len(ok)
                if since_commit >= config.commit_every:
                    for part in new_items:
                        items = Items.concat(items, part)
                    embeddings = np.concatenate([embeddings] + new_emb)
                    new_items, new_emb, since_commit = [], [], 0
                    base = save(items, embeddings)
            for part in new_items:
                items = Items.concat(items, part)
            embeddings = np.concatenate([embeddings] + new_emb) if new_emb else embeddings
            base = save(items, embeddings)
            report.embedded_per_second = done / max(1e-9, time.perf_counter() - t_embed)
        # a changed file that no longer decodes leaves the index: it counts as removed
        report.removed = plan.removed + len(plan.reuse_ids) - report.updated
        report.total = len(items)
        report.index_kind = base.get("index", {}).get("kind")
    report.seconds = time.perf_counter() - t0
    return report
