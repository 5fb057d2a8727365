"""Indexing pipeline: list files -> diff against the index -> decode -> embed -> commit.

Each stage is a plain function over plain data, so it can be driven on its own (and later mapped
over a cluster). ``index_folder`` runs them all: new files are embedded, changed ones (size or mtime)
re-embedded under the same item id, deleted ones dropped, the rest left alone. Work is committed
every ``IndexingConfig.commit_every`` images, so a killed run loses at most one chunk.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ._util import batched, ordered_map, prefetch_iter
from .config import DEFAULT_FRAME_INTERVAL, DEFAULT_MODEL, IndexingConfig, IndexSpec, ModelRef
from .errors import BadArgumentError, DataError, MediaError, ModelMismatchError, PathNotFoundError
from .exported import is_export
from .media import MediaFile, Skipped, load_image, scan
from .store import Collection, Items, check_index_folder, commit, write_lock, write_manifest


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
    index_notes: list[str] = field(default_factory=list)  # rebuilds and why, tuned search settings
    seconds: float = 0.0
    embedded_per_second: float = 0.0  # items (images, video frames, texts) embedded per second

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)


@dataclass
class Plan:
    """The difference between a folder on disk and the index."""

    keep_rows: np.ndarray  # rows of the current items that stay (changed ones too, until re-embedded)
    to_embed: list[MediaFile]  # new or changed files
    reuse_ids: dict[str, int]  # path -> existing item id, for changed images and texts
    removed: int  # files whose items are gone from under the root
    unchanged: int  # kept files under the root
    known_failures: list[Skipped]  # files that failed before and have not changed since: not retried
    resampled: set[str] = field(default_factory=set)  # changed videos: their old frames dropped, re-sampled


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _membership(root) -> Callable[[str, str], bool]:
    if callable(root):
        return root
    return lambda path, kind: kind != "text" and _under(path, root)


def plan_update(
    files: Sequence[MediaFile],
    items: Items,
    root: str | Callable[[str, str], bool],
    unreadable: Sequence[str] = (),
    failures: dict | None = None,
    resample_videos: bool | Callable[[str], bool] = False,
) -> Plan:
    """Compare scanned ``files`` under ``root`` with the index's ``items`` (size + mtime).

    ``root`` is a folder (its media files belong to it; texts read from a file that happens to sit
    below it do not), or a predicate ``(path, kind)`` telling which indexed items belong to the
    source being indexed. Items of other sources are never touched.

    A video is one file but many items (its sampled frames): a changed video (or every video, with
    ``resample_videos``, after the frame interval changed) has all its frames dropped and is sampled
    again; counts are per file. ``resample_videos`` (a bool, or a predicate on the path) also
    re-samples unchanged videos, e.g. those sampled at another frame interval.

    Items at or under an ``unreadable`` path (a folder that could not be listed, a file that could
    not be read) are kept as they are: a permission problem or a network hiccup is not a deletion.
    ``failures`` maps paths that failed to decode before to {"size", "mtime_ns", "reason"}; such a
    file is retried only once it changes.
    """
    failures = failures or {}
    belongs = _membership(root)
    resample = resample_videos if callable(resample_videos) else (lambda path: bool(resample_videos))
    seen = {f.path: f for f in files}
    keep, reuse, unchanged, removed = [], {}, set(), set()
    indexed, resampled = set(), set()
    for row, (path, kind) in enumerate(zip(items.path, items.kind)):
        f = seen.get(path)
        if f is None:
            if belongs(path, kind) and not any(_under(path, u) for u in unreadable):
                removed.add(path)  # deleted below the folder being indexed
            else:
                keep.append(row)  # another folder of the same index, or unreadable for now
            continue
        same = int(items.size[row]) == f.size and int(items.mtime_ns[row]) == f.mtime_ns
        if kind == "video":
            if same and not resample(path):
                keep.append(row)
                indexed.add(path)
                unchanged.add(path)
            else:
                resampled.add(path)  # frames dropped now, the file goes to to_embed as a whole
            continue
        indexed.add(path)
        keep.append(row)
        if same:
            unchanged.add(path)
        else:
            reuse[path] = int(items.id[row])
    to_embed, known = [], []
    for f in files:
        if f.path in indexed and f.path not in reuse:
            continue
        old = failures.get(f.path)
        if f.path not in indexed and f.path not in resampled and old and old["size"] == f.size \
                and old["mtime_ns"] == f.mtime_ns:
            known.append(Skipped(f.path, f"{old['reason']} (unchanged since it failed; not retried)"))
            continue
        to_embed.append(f)
    return Plan(np.asarray(keep, dtype=np.int64), to_embed, reuse, len(removed), len(unchanged), known, resampled)


def _reason(e: Exception, path: str) -> str:
    return str(e).split(": ", 1)[-1] if str(e).startswith(path) else str(e)


def decode_image(f: MediaFile, encoder, max_pixels: int) -> tuple[np.ndarray | None, Skipped | None]:
    """Decode and preprocess one image file: (pixels, None), or (None, why it was skipped)."""
    try:
        image = load_image(f.path, max_pixels=max_pixels, min_side=getattr(encoder, "image_size", None))
        return encoder.preprocess(image), None
    except (MediaError, OSError) as e:
        return None, Skipped(f.path, _reason(e, f.path))


def _video_batches(f: MediaFile, encoder, config: IndexingConfig):
    """The batches of one video's sampled frames (see ``_visual_batches``)."""
    from .video import sample_frames

    pixels, records = [], []
    try:
        for frame in sample_frames(f.path, config.frame_interval, config.skip_similar):
            pixels.append(encoder.preprocess(frame.image))
            records.append(replace(f, t=frame.t))
            if len(pixels) == config.batch_size:
                yield np.stack(pixels), records, [], False, 0
                pixels, records = [], []
    except (MediaError, OSError) as e:  # the frames already sent are dropped by the consumer
        yield None, [], [Skipped(f.path, _reason(e, f.path))], True, 1
        return
    yield (np.stack(pixels) if pixels else None), records, [], True, 1


def _visual_batches(files: Sequence[MediaFile], encoder, config: IndexingConfig):
    """(pixels or None, records, skipped, boundary, files done) per batch of images or video frames.

    Images are decoded in worker threads (Pillow releases the GIL while decoding and resizing), in
    file order, and batched ``batch_size`` at a time; a video streams its sampled frames (one record
    per frame, with its time), so a long video never sits in memory. ``boundary`` is False inside a
    video: committing there would store half a video as if it were complete. A video that fails
    part way is reported in ``skipped`` after some of its frames: the consumer must drop those.
    """
    bs = config.batch_size
    pixels, ok, bad = [], [], []

    def decode(f: MediaFile):
        return None if f.kind == "video" else decode_image(f, encoder, config.max_pixels)

    for f, decoded in zip(files, ordered_map(decode, files, ahead=2 * bs)):
        if f.kind == "video" or len(ok) + len(bad) == bs:
            if ok or bad:
                yield (np.stack(pixels) if pixels else None), ok, bad, True, len(ok) + len(bad)
                pixels, ok, bad = [], [], []
        if f.kind == "video":
            yield from _video_batches(f, encoder, config)
            continue
        px, skipped = decoded
        if skipped is not None:
            bad.append(skipped)
        else:
            pixels.append(px)
            ok.append(f)
    if ok or bad:
        yield (np.stack(pixels) if pixels else None), ok, bad, True, len(ok) + len(bad)


def embed_files(
    files: Sequence[MediaFile],
    encoder,
    config: IndexingConfig = IndexingConfig(),
    on_progress: Callable[[int], None] | None = None,
    on_skip: Callable[[Skipped], None] | None = None,
):
    """Yield (records, embeddings, boundary) per batch; decoding runs ahead of the forward pass in a
    thread. Records are the files (one per video frame, with ``t`` set); ``boundary`` says whether
    committing after this batch is safe (not in the middle of a video). ``on_skip`` is called for
    files that fail, before the batch that follows them (for a video: after its frames so far)."""
    texts = [f for f in files if f.kind == "text"]
    for chunk in batched(texts, 256):
        yield list(chunk), encoder.embed_texts([f.text for f in chunk]), True
        if on_progress:
            on_progress(len(chunk))
    visual = [f for f in files if f.kind != "text"]
    for pixels, ok, bad, boundary, files_done in prefetch_iter(_visual_batches(visual, encoder, config), depth=2):
        for s in bad:
            if on_skip:
                on_skip(s)
        emb = encoder.embed_pixels(pixels) if pixels is not None else np.zeros((0, encoder.dim), np.float32)
        yield ok, emb, boundary
        if on_progress and files_done:
            on_progress(files_done)


def _model_record(ref: ModelRef, encoder=None, precision: str | None = None) -> dict:
    """What the manifest says about the model (dim stays None until the model has been loaded)."""
    from .encoder import model_record

    record = {**vars(model_record(ref)), "dim": None, "precision": precision}
    if encoder is not None:  # an exported folder knows its own weights, wherever it came from
        record.update(weights=getattr(encoder, "weights", record["weights"]), dim=encoder.dim,
                      precision=getattr(encoder, "precision", "fp32"))
    return record


def index_precision(manifest: dict) -> str | None:
    """The precision an index's vectors were embedded at (indexes before int8 existed: fp32); None
    for an index that has never held a vector (its first run picks the model's default)."""
    return manifest["model"].get("precision") or ("fp32" if manifest.get("count") else None)


def check_model(manifest: dict, ref: ModelRef, path, weights: str | None = None, precision: str | None = None) -> None:
    """The index was built with this model, these weights (``weights``, else the reference's
    fingerprint) and this precision, else ModelMismatchError."""
    from .models import check_weights, fingerprint

    built = manifest["model"]["key"]
    if built != ref.key():
        raise ModelMismatchError(
            f"index {path} was built with model {built!r}, not {ref.key()!r}: use --model "
            f"{manifest['model']['name']} or another --index folder"
        )
    check_weights(manifest["model"], weights or fingerprint(ref.name, ref.pretrained), path)
    have = index_precision(manifest)
    if precision is not None and have is not None and precision != have:
        raise ModelMismatchError(
            f"index {path} holds {have} vectors; adding {precision} ones would mix precisions: use "
            f"--precision {have}, or index into another --index folder"
        )


def index_folder(
    root: str | os.PathLike,
    index_path: str | os.PathLike,
    encoder=None,
    model: ModelRef | None = None,
    spec: IndexSpec | dict | None = None,
    config: IndexingConfig = IndexingConfig(),
    on_progress: Callable[[int, int], None] | None = None,
    on_skip: Callable[[Skipped], None] | None = None,
) -> IndexReport:
    """Bring the index at ``index_path`` up to date with the images and videos under ``root``.

    ``encoder`` defaults to the model that built the index (or ``model``, or the default model for a
    new one). ``on_progress(done, total)`` counts files as they are embedded (a video once all its
    sampled frames are); ``on_skip`` is called for each file that cannot be used (the run goes on).
    Videos are sampled every ``config.frame_interval`` seconds, one item per frame. ``spec`` sets
    how the faiss index is built: None keeps the index's settings, a dict changes some of them
    (e.g. ``{"memory": "2G"}``), an IndexSpec replaces them. Returns an IndexReport.
    """
    t0 = time.perf_counter()
    root = os.path.realpath(os.fspath(root))  # one folder reached by two names is one folder
    files, skipped = scan(root, config)
    return _update(files, skipped, root, index_path, encoder, model, spec, config, on_progress, on_skip, t0)


def read_texts(source: str | os.PathLike, column: str | None = None) -> list[MediaFile]:
    """Text records of a .txt file (one text per non-blank line) or a .csv/.tsv/.parquet column.

    Each record's path is ``<absolute file>#<line or row number>``; size and "mtime" are the text's
    length and checksum, so an edited line is re-embedded and an unchanged one is not.
    """
    import zlib

    from .data import TABLE_SUFFIXES, read_table_column

    path = os.path.realpath(os.fspath(source))
    if not os.path.isfile(path):
        raise PathNotFoundError(f"texts file not found: {source}")
    if Path(path).suffix.lower() in TABLE_SUFFIXES:
        values = read_table_column(path, column)
    else:
        if column:
            raise BadArgumentError(f"--text-column applies to .csv/.tsv/.parquet tables, not {source}")
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data[:1 << 20]:
            raise DataError(f"{source} is not a text file (it holds binary data): pass a UTF-8 .txt, one text per line")
        try:
            values = data.decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{source} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    out = []
    for n, text in enumerate(values, start=1):
        text = " ".join(str(text or "").split())
        if text:
            data = text.encode()
            out.append(MediaFile(f"{path}#{n}", len(data), zlib.crc32(data), "text", text))
    return out


def index_texts(
    source: str | os.PathLike,
    index_path: str | os.PathLike,
    column: str | None = None,
    encoder=None,
    model: ModelRef | None = None,
    spec: IndexSpec | dict | None = None,
    config: IndexingConfig = IndexingConfig(),
    on_progress: Callable[[int, int], None] | None = None,
) -> IndexReport:
    """Bring the texts of ``source`` (see ``read_texts``) up to date in the index, as "text" items:
    new and edited lines embedded, deleted ones dropped, items of other sources untouched."""
    t0 = time.perf_counter()
    records = read_texts(source, column)
    prefix = os.path.realpath(os.fspath(source)) + "#"
    if not records:  # an emptied file removes its texts; a file that never had any is a mistake
        items = Collection.open(index_path).items if Collection.exists(index_path) else Items.empty()
        if not any(k == "text" and p.startswith(prefix) for p, k in zip(items.path, items.kind)):
            raise DataError(f"no texts in {source}: it has no non-blank lines (or the column is empty)")
    return _update(records, [], lambda p, kind: kind == "text" and p.startswith(prefix), index_path, encoder, model, spec, config,
                   on_progress, None, t0)


def normalise_spec(spec: IndexSpec) -> IndexSpec:
    """``spec`` with its memory budget in bytes, so "4G" and the default compare equal."""
    from .config import DEFAULT_INDEX_MEMORY
    from .index import parse_size

    return replace(spec, memory=parse_size(spec.memory) or DEFAULT_INDEX_MEMORY)


def spec_to_manifest(spec: IndexSpec) -> dict:
    """The index settings as stored in the manifest, so later updates keep them."""
    from dataclasses import asdict

    return asdict(spec)


def spec_from_manifest(manifest: dict) -> IndexSpec:
    """The index settings an index was built with (format 1 kept only the index type)."""
    from dataclasses import fields

    stored = manifest.get("index_spec")
    if stored is None:
        return normalise_spec(IndexSpec(index_type=manifest.get("index_type", "auto")))
    known = {f.name for f in fields(IndexSpec)}
    return normalise_spec(IndexSpec(**{k: v for k, v in stored.items() if k in known}))


def sync_index(vindex, embeddings: np.ndarray, ids: np.ndarray, spec: IndexSpec, changed: set[int],
               notes: list[str]):
    """Bring ``vindex`` up to date with ``embeddings`` (row i is item ``ids[i]``): remove items that
    are gone or whose vector ``changed``, add the new ones, in place; build afresh when there is no
    index yet or it no longer fits the collection (the reason goes to ``notes``). Returns the index.
    """
    from .index import VectorIndex, VectorLookup

    n = len(ids)
    if n == 0:
        return None
    reason = "no index yet" if vindex is None else vindex.needs_rebuild(n, spec)
    if reason is None:
        have = vindex.ids()
        stale = np.union1d(np.setdiff1d(have, ids), np.intersect1d(have, np.fromiter(changed, np.int64, len(changed))))
        if len(stale) and not vindex.can_remove:
            reason = f"a {vindex.kind} index cannot remove items in place"
    if reason is not None:
        replaced = vindex is not None
        vindex = VectorIndex.build(embeddings, ids, spec)
        if replaced or vindex.kind != "flat":  # a first small exact index is not news
            notes.append(f"built a {vindex.kind} index over {n} vectors ({reason})")
        return vindex
    vindex.remove(stale)
    new = np.setdiff1d(ids, vindex.ids())
    if len(new):
        vindex.add(embeddings[VectorLookup(embeddings, ids).rows(new)], new, keep_vectors=False)
    vindex.attach(embeddings, ids)
    return vindex


def _update(files, skipped, root, index_path, encoder, model, spec, config, on_progress, on_skip, t0) -> IndexReport:
    """Apply scanned ``files`` of one source (``root``: folder or membership predicate) to the index."""

    index_path = Path(index_path)
    belongs = _membership(root)
    report = IndexReport(str(index_path.resolve()))

    def skip(s: Skipped) -> None:
        report.skipped.append(s)
        if on_skip:
            on_skip(s)

    for s in skipped:
        skip(s)

    check_index_folder(index_path)
    existing = Collection.open(index_path) if Collection.exists(index_path) else None
    if encoder is None and model is not None and is_export(model.name):  # an exported folder names its model
        from .encoder import get_encoder

        encoder = get_encoder(model.name, device=model.device, precision=config.precision)
    if encoder is not None:
        ref = encoder.ref
    elif existing is not None and model is None:
        ref = ModelRef(existing.model["name"], existing.model["pretrained"])
    else:
        ref = model or ModelRef(DEFAULT_MODEL)
    precision = getattr(encoder, "precision", "fp32") if encoder is not None else config.precision
    if existing is not None:  # before spending seconds loading the model
        check_model(existing.manifest, ref, index_path, getattr(encoder, "weights", None), precision)
        precision = precision or index_precision(existing.manifest)
    # still None: a new index, at the model's default precision (known once the model loads)

    with write_lock(index_path):
        if Collection.exists(index_path):  # re-read under the lock: another writer may have committed
            existing = Collection.open(index_path)
        items = existing.items if existing else Items.empty()
        base = dict(existing.manifest) if existing else {"model": _model_record(ref, precision=precision), "next_id": 0}
        # keep the index settings the user chose when the index was built; a dict changes some of them
        if spec is None:
            spec = spec_from_manifest(base)
        elif isinstance(spec, dict):
            spec = replace(spec_from_manifest(base), **spec)
        spec = normalise_spec(spec)
        old_failures = base.get("failed", {})
        # video sampling: what the caller says, else what this index used last, else the defaults
        last = base.get("video_sampling") or {}
        sampling = {"frame_interval": float(config.frame_interval if config.frame_interval is not None
                                            else last.get("frame_interval") or DEFAULT_FRAME_INTERVAL),
                    "skip_similar": float(config.skip_similar if config.skip_similar is not None
                                          else last.get("skip_similar") or 0.0)}
        config = replace(config, **sampling)
        sampled = dict(base.get("video_sampled", {}))  # video path -> the sampling its frames came from
        plan = plan_update(files, items, root, [s.path for s in skipped if s.unreadable], old_failures,
                           resample_videos=lambda path: sampled.get(path, sampling) != sampling)
        for s in plan.known_failures:
            skip(s)
        # failures outside this root, or still current below it, stay on record
        failures = {p: v for p, v in old_failures.items()
                    if not belongs(p, "image") or p in {s.path for s in plan.known_failures}}
        report.unchanged = plan.unchanged
        report.removed = plan.removed
        dirty = bool(plan.removed or plan.resampled)  # something not yet committed
        # a text already in the index (a line that only moved, a caption repeated) keeps its vector
        known_text: dict[str, int] = {}
        if existing is not None and any(f.kind == "text" for f in plan.to_embed):
            for r, (k, t) in enumerate(zip(items.kind, items.text)):
                if k == "text" and t:
                    known_text.setdefault(t, r)
        copied = [f for f in plan.to_embed if f.kind == "text" and f.text in known_text]
        to_encode = [f for f in plan.to_embed if not (f.kind == "text" and f.text in known_text)]
        if to_encode and encoder is None:  # the model loads only when there is work for it
            from .encoder import get_encoder

            encoder = get_encoder(ref.name, pretrained=ref.pretrained, device=ref.device, backend=config.backend,
                                  precision=precision)
        if encoder is not None:
            base["model"] = _model_record(ref, encoder)
        dim = encoder.dim if encoder is not None else int(base["model"].get("dim") or 0)
        if dim:  # a bad --index-factory or --memory fails now, not after hours of embedding
            from .index import check_spec

            check_spec(spec, dim, len(plan.keep_rows) + len(plan.to_embed))
        embeddings = (np.array(existing.embeddings, dtype=np.float32) if existing is not None and len(items)
                      else np.zeros((0, dim), np.float32))
        copied_emb = embeddings[[known_text[f.text] for f in copied]] if copied else None
        items, embeddings = items.take(plan.keep_rows), embeddings[plan.keep_rows]
        row_of_id = {int(i): r for r, i in enumerate(items.id)}
        pending_items: list[Items] = []
        pending_emb: list[np.ndarray] = []
        dropped_ids: set[int] = set()  # changed files that no longer decode

        def flush():
            """Fold pending additions and drops into items/embeddings."""
            nonlocal items, embeddings, row_of_id, pending_items, pending_emb, dropped_ids
            for part in pending_items:
                items = Items.concat(items, part)
            if pending_emb:
                embeddings = np.concatenate([embeddings] + pending_emb)
            if dropped_ids:
                rows = np.flatnonzero(~np.isin(items.id, np.fromiter(dropped_ids, np.int64, len(dropped_ids))))
                items, embeddings = items.take(rows), embeddings[rows]
            row_of_id = {int(i): r for r, i in enumerate(items.id)}
            pending_items, pending_emb, dropped_ids = [], [], set()

        from .hubness import QUERY_OF, load_query_bank

        # hubness of items: the encoder's query bank (an encoder without one has none), loaded without the model
        bank = getattr(encoder, "query_bank", None) if encoder is not None else load_query_bank(ref)
        hubness = bank.settings() if bank is not None else None  # what the manifest must say after this run
        digests = lambda h: {m: v.get("digest") for m, v in (h or {}).items()}  # noqa: E731
        if digests(base.get("hubness")) != digests(hubness):
            items.hub[:] = np.nan  # measured with another bank, or none: measure again (if any) at the commit
        vindex = None  # the faiss index, updated in place between commits (rebuilt only when needed)
        if existing is not None and len(existing.items) and existing.manifest["index"].get("kind"):
            if spec_from_manifest(existing.manifest) == spec:
                vindex = existing.load_index(mmap=False)
            else:
                report.index_notes.append("index settings changed: rebuilding the index")
        reembedded: set[int] = set()  # ids whose vector changed since vindex was last synced

        saved = False

        def save():
            nonlocal base, dirty, vindex, saved
            flush()
            dirty, saved = False, True
            base["failed"] = failures
            base["index_spec"] = spec_to_manifest(spec)
            videos = {p for p, k in zip(items.path, items.kind) if k == "video"}
            base["video_sampled"] = {p: v for p, v in sampled.items() if p in videos}
            base["video_sampling"] = sampling
            measure_hubs()
            vindex = sync_index(vindex, embeddings, items.id, spec, reembedded, report.index_notes)
            reembedded.clear()
            base = commit(index_path, items, embeddings, vindex, base)

        def unmeasured() -> np.ndarray:
            """Rows without a hub value that the bank can measure (it has the modality that searches them)."""
            if bank is None:
                return np.zeros(0, np.int64)
            measurable = np.array([QUERY_OF.get(k) in bank.sides for k in items.kind], dtype=bool)
            return np.flatnonzero(np.isnan(items.hub) & measurable)

        def measure_hubs():
            """Hub values of the rows that have none yet (new, re-embedded, or an index built before)."""
            rows = unmeasured()
            if len(rows):
                items.hub[rows] = bank.hubs(embeddings[rows], [items.kind[r] for r in rows])
            base["hubness"] = hubness

        done, since_commit, n_embedded = 0, 0, 0
        t_embed = time.perf_counter()

        def progress(n):
            nonlocal done
            done += n
            if on_progress:
                on_progress(done, len(plan.to_embed))

        def failed(s: Skipped):
            f = by_path[s.path]
            failures[s.path] = {"size": f.size, "mtime_ns": f.mtime_ns, "reason": s.reason}
            if s.path in plan.reuse_ids:  # a changed file that no longer decodes leaves the index
                dropped_ids.add(plan.reuse_ids[s.path])
            if s.path in video_ids:  # a video that broke part way: its frames so far go too
                dropped_ids.update(video_ids.pop(s.path))
                sampled.pop(s.path, None)
                if s.path in plan.resampled:
                    report.updated -= 1
                else:
                    report.added -= 1
            if s.path in plan.reuse_ids or s.path in plan.resampled:
                report.removed += 1
                nonlocal dirty
                dirty = True
            skip(s)

        def batches():
            if copied:
                progress(len(copied))
                yield copied, copied_emb, True
            if to_encode:
                yield from embed_files(to_encode, encoder, config, progress, failed)

        by_path = {f.path: f for f in plan.to_embed}
        video_ids: dict[str, list[int]] = {}  # frame ids of the videos embedded in this run
        for ok, emb, boundary in batches():
            dirty = dirty or bool(ok)
            fresh = []
            for f, vector in zip(ok, emb):
                if f.kind == "video":  # frames: always new items; counted per video file
                    if f.path not in video_ids:
                        video_ids[f.path] = []
                        sampled[f.path] = sampling
                        failures.pop(f.path, None)
                        if f.path in plan.resampled:
                            report.updated += 1
                        else:
                            report.added += 1
                    fresh.append((f, vector))
                    continue
                failures.pop(f.path, None)
                if f.path in plan.reuse_ids:  # re-embedded in place: same id, same row
                    r = row_of_id[plan.reuse_ids[f.path]]
                    embeddings[r] = vector
                    items.hub[r] = np.nan  # measured again at the next commit
                    reembedded.add(plan.reuse_ids[f.path])
                    items.size[r], items.mtime_ns[r], items.text[r] = f.size, f.mtime_ns, f.text
                    report.updated += 1
                else:
                    fresh.append((f, vector))
            if fresh:
                ids = np.arange(base["next_id"], base["next_id"] + len(fresh), dtype=np.int64)
                base["next_id"] += len(fresh)
                for (f, _), i in zip(fresh, ids.tolist()):
                    if f.kind == "video" and f.path in video_ids:
                        video_ids[f.path].append(i)
                report.added += sum(1 for f, _ in fresh if f.kind != "video")
                pending_items.append(Items(ids, [f.path for f, _ in fresh],
                                           np.asarray([f.size for f, _ in fresh], np.int64),
                                           np.asarray([f.mtime_ns for f, _ in fresh], np.int64),
                                           [f.kind for f, _ in fresh], [f.text for f, _ in fresh],
                                           np.asarray([np.nan if f.t is None else f.t for f, _ in fresh], np.float64)))
                pending_emb.append(np.stack([v for _, v in fresh]))
            since_commit += len(ok)
            n_embedded += len(ok)
            # commit every commit_every images, and at least a quarter of the collection apart,
            # so the rewrites of a long first run add up to a bounded multiple of the data
            if boundary and since_commit >= max(config.commit_every, len(items) // 4):
                since_commit = 0
                save()
        if plan.to_embed:
            report.embedded_per_second = n_embedded / max(1e-9, time.perf_counter() - t_embed)

        n_final = len(items) + sum(len(p) for p in pending_items) - len(dropped_ids)
        stale = n_final and (vindex is None or vindex.needs_rebuild(n_final, spec))
        hubs_due = len(unmeasured()) > 0 or base.get("hubness") != hubness  # values, or settings recalibrated
        if (existing is None and not saved) or dirty or stale or hubs_due or spec_from_manifest(base) != spec:
            save()
        elif failures != old_failures:  # only the failure record changed: no new generation needed
            base["failed"] = failures
            write_manifest(index_path, base)
        report.total = len(items)
        report.index_kind = base.get("index", {}).get("kind")
    report.seconds = time.perf_counter() - t0
    return report
