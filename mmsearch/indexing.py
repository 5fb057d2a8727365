"""Indexing pipeline: list files -> diff against the index -> decode -> embed -> commit.

Each stage is a plain function over plain data, so it can be driven on its own (and later mapped
over a cluster). ``index_folder`` runs them all: new files are embedded, changed ones (size or mtime)
re-embedded under the same item id, deleted ones dropped, the rest left alone. Work is committed
every ``IndexingConfig.commit_every`` images, so a killed run loses at most one chunk.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .config import DEFAULT_MODEL, IndexingConfig, IndexSpec, ModelRef
from .data import TABLE_SUFFIXES, read_table_column
from .embedding import embed_files
from .encoder import get_encoder
from .errors import (
    BadArgumentError,
    DataError,
    MediaError,
    ModelMismatchError,
    PathNotFoundError,
)
from .exported import is_export
from .hubness import QUERY_OF
from .index import VectorIndex, VectorLookup, check_spec
from .lang import check_lang
from .manifest import (
    FORMAT_VERSION,
    Failure,
    IndexedModel,
    Manifest,
    Sampling,
    normalise_spec,
)
from .media import MediaFile, Skipped, fast_digest, scan
from .store import (
    EMBEDDINGS,
    Collection,
    Items,
    _read_embeddings,
    check_index_folder,
    check_rows,
    commit,
    kept,
    read_items,
    read_manifest,
    sweep,
    write_lock,
    write_manifest,
)
from .video import Shot, detect_shots
from .weights import check_weights, fingerprint, load_query_bank, model_record


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
    moved: int = 0  # files found under a new path (same size and content): item, id and vector kept
    embedded: int = 0  # items the model embedded in this run (not those whose vectors were copied)
    copied: int = 0  # new files (and texts) with the content of one already embedded: added, vectors copied
    duplicates: int = 0  # new paths to a file indexed under another path (a symlink, a hard link): not stored

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed or self.moved)


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
    removed_paths: set[str] = field(default_factory=set)  # the files behind ``removed``


def _inode(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path`` (following links); None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _same_bytes(a: str, b: str) -> bool:
    """Whether two files hold the same bytes (read until the first difference): a copy takes another
    file's vector only when it is one, not merely because its size and sampled digest match."""
    import filecmp

    try:
        return filecmp.cmp(a, b, shallow=False)
    except (OSError, ValueError):
        return False


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
    failures: dict[str, Failure] | None = None,
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
    ``failures`` maps paths that failed to decode before to their ``Failure``; such a file is
    retried only once it changes.
    """
    failures = failures or {}
    rows = _RowFacts(items, {f.path: f for f in files}, _membership(root), unreadable, resample_videos)
    removed = {rows.paths[c] for c in np.unique(rows.codes[rows.gone[rows.codes]])}
    keep = ~rows.present[rows.codes] & ~rows.gone[rows.codes]  # another source's, or unreadable for now
    keep |= rows.present[rows.codes] & ~rows.is_video  # images and texts stay (changed ones until re-embedded)
    keep |= rows.video_ok  # unchanged videos keep their frames; the others are sampled again
    present_other = rows.present[rows.codes] & ~rows.is_video
    unchanged = {rows.paths[c] for c in np.unique(rows.codes[(present_other & rows.same) | rows.video_ok])}
    indexed = {rows.paths[c] for c in np.unique(rows.codes[present_other | rows.video_ok])}
    resampled = {rows.paths[c] for c in np.unique(rows.codes[rows.is_video & rows.present[rows.codes] & ~rows.video_ok])}
    changed = np.flatnonzero(present_other & ~rows.same)
    reuse = {items.path[r]: int(items.id[r]) for r in changed.tolist()}
    to_embed, known = [], []
    for f in files:
        if f.path in indexed and f.path not in reuse:
            continue
        old = failures.get(f.path)
        if f.path not in indexed and f.path not in resampled and old and old.same_file(f.size, f.mtime_ns):
            known.append(Skipped(f.path, f"{old.reason} (unchanged since it failed; not retried)"))
            continue
        to_embed.append(f)
    return Plan(np.flatnonzero(keep).astype(np.int64), to_embed, reuse, len(removed), len(unchanged), known, resampled,
                removed)


def _codes(values: Sequence) -> tuple[np.ndarray, list]:
    """Integer codes of ``values`` (in order of first appearance) and the distinct values."""
    distinct = list(dict.fromkeys(values))
    index = {v: i for i, v in enumerate(distinct)}
    return np.fromiter(map(index.__getitem__, values), np.int64, len(values)), distinct


class _RowFacts:
    """What ``plan_update`` needs to know about each item row, as arrays: per distinct path (a video
    has one row per frame) the Python work is done once, then spread over its rows."""

    def __init__(self, items: Items, seen: dict[str, MediaFile], belongs, unreadable: Sequence[str],
                 resample_videos) -> None:
        resample = resample_videos if callable(resample_videos) else (lambda path: bool(resample_videos))
        self.codes, self.paths = _codes(items.path)
        kind_codes, kinds = _codes(items.kind)
        path_kind = np.zeros(len(self.paths), np.int64)
        path_kind[self.codes] = kind_codes
        now = [seen.get(p) for p in self.paths]  # the file on disk now, None when it is gone
        self.present = np.array([f is not None for f in now], bool)
        # gone from the source being indexed (not just from another folder, or unreadable for now)
        self.gone = np.array([f is None and belongs(p, kinds[k]) and not any(_under(p, u) for u in unreadable)
                              for p, f, k in zip(self.paths, now, path_kind.tolist())], bool)
        size = np.array([f.size if f is not None else -1 for f in now], np.int64)
        mtime = np.array([f.mtime_ns if f is not None else -1 for f in now], np.int64)
        self.same = (items.size == size[self.codes]) & (items.mtime_ns == mtime[self.codes])
        self.is_video = kind_codes == (kinds.index("video") if "video" in kinds else -1)
        again = np.array([f is not None and kinds[k] == "video" and bool(resample(p))
                          for p, f, k in zip(self.paths, now, path_kind.tolist())], bool)
        # a video keeps its frames only if all of them are unchanged and its sampling is the same
        bad = np.unique(self.codes[self.is_video & self.present[self.codes] & ~(self.same & ~again[self.codes])])
        self.video_ok = self.is_video & self.present[self.codes] & ~np.isin(self.codes, bad)


def _model_record(ref: ModelRef, encoder=None, precision: str | None = None) -> IndexedModel:
    """What the manifest says about the model (dim stays None until the model has been loaded)."""

    record = model_record(ref)
    if encoder is None:
        return IndexedModel.from_record(record, None, precision)
    # an exported folder knows its own weights, wherever it came from
    return IndexedModel(record.name, record.pretrained, record.key, getattr(encoder, "weights", record.weights),
                        encoder.dim, getattr(encoder, "precision", "fp32"))


def check_model(manifest: Manifest, ref: ModelRef, path, weights: str | None = None, precision: str | None = None) -> None:
    """The index was built with this model, these weights (``weights``, else the reference's
    fingerprint) and this precision, else ModelMismatchError."""

    built = manifest.model.key
    if built != ref.key():
        raise ModelMismatchError(
            f"index {path} was built with model {built!r}, not {ref.key()!r}: use --model "
            f"{manifest.model.name} or another --index folder"
        )
    check_weights(manifest.model, weights or fingerprint(ref.name, ref.pretrained), path)
    have = manifest.precision
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
    writer = IndexWriter(index_path, root, encoder, model, spec, config, on_progress, on_skip)
    return writer.run(files, skipped, t0)


def remove_paths(index_path: str | os.PathLike, paths: Sequence[str | os.PathLike]) -> IndexReport:
    """Drop from the index every item at or under ``paths`` (folders, files, or texts files), whether
    or not they still exist on disk; nothing is embedded and the model is not loaded. An error when
    none of the paths has items in the index."""
    t0 = time.perf_counter()
    roots = [os.path.realpath(os.fspath(p)) for p in paths]
    if not roots:
        raise BadArgumentError("nothing to remove: give the folders or files whose items should go")

    def belongs(path: str, kind: str) -> bool:
        return any(_under_one(path, r) for r in roots)

    items = read_items(index_path, read_manifest(index_path))
    missing = [p for p, r in zip(paths, roots) if not any(_under_one(x, r) for x in set(items.path))]
    if missing:
        raise PathNotFoundError(f"the index {index_path} holds no items at or under {missing[0]}")
    return IndexWriter(index_path, belongs).run([], [], t0)


def _under_one(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep) or path.startswith(root + "#")


def read_texts(source: str | os.PathLike, column: str | None = None) -> list[MediaFile]:
    """Text records of a .txt file (one text per non-blank line) or a .csv/.tsv/.parquet column.

    Each record's path is ``<absolute file>#<line or row number>``; size and "mtime" are the text's
    length and checksum, so an edited line is re-embedded and an unchanged one is not.
    """
    import zlib


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


def texts_records(source: str | os.PathLike, column: str | None, index_path: str | os.PathLike) -> list[MediaFile]:
    """The records of a texts source (``read_texts``); an error for an empty source the index holds no
    texts of (an emptied file removes its texts; a file that never had any is a mistake)."""
    records = read_texts(source, column)
    if not records:
        prefix = os.path.realpath(os.fspath(source)) + "#"
        items = read_items(index_path, read_manifest(index_path)) if Collection.exists(index_path) else Items.empty()
        if not any(k == "text" and p.startswith(prefix) for p, k in zip(items.path, items.kind)):
            raise DataError(f"no texts in {source}: it has no non-blank lines (or the column is empty)")
    return records


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
    records = texts_records(source, column, index_path)
    prefix = os.path.realpath(os.fspath(source)) + "#"
    belongs = lambda p, kind: kind == "text" and p.startswith(prefix)  # noqa: E731
    return IndexWriter(index_path, belongs, encoder, model, spec, config, on_progress).run(records, [], t0)


def sync_index(vindex, embeddings: np.ndarray, ids: np.ndarray, spec: IndexSpec, changed: set[int],
               notes: list[str]):
    """Bring ``vindex`` up to date with ``embeddings`` (row i is item ``ids[i]``): remove items that
    are gone or whose vector ``changed``, add the new ones, in place; build afresh when there is no
    index yet or it no longer fits the collection (the reason goes to ``notes``). Returns the index.
    """

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


def _shots_of(items: Items, rows: list[int]) -> list[Shot]:
    """The shots of one video's frames as the items table holds them (for a copy of that video)."""
    bounds = {int(items.shot[r]): (float(items.shot_start[r]), float(items.shot_end[r])) for r in rows}
    return [Shot(*bounds[i]) for i in sorted(bounds)] if all(i >= 0 for i in bounds) else []


SEMANTIC_CUT = 0.5  # consecutive sampled frames whose vectors are less similar than this start a new shot


def _with_semantic_cuts(shots: list[Shot], t: np.ndarray, emb: np.ndarray) -> list[Shot]:
    """``shots`` (the detector's, from pixels) plus a cut where two consecutive sampled frames show
    different things by the model's own vectors (cosine below SEMANTIC_CUT) and the detector found no
    cut between them: dissolves and fades, which a pixel detector misses. Such a cut is placed at the
    later frame (within one sampling interval of the real one). On the shared clips consecutive
    frames of one shot score 0.63 or more; the airliner dissolving into a field, 0.30."""
    if len(t) < 2:
        return shots
    starts = [s.start for s in shots] or [0.0]
    end = shots[-1].end if shots else float("inf")
    cos = np.einsum("ij,ij->i", np.asarray(emb[1:], np.float32), np.asarray(emb[:-1], np.float32))
    for i in np.flatnonzero(cos < SEMANTIC_CUT).tolist():
        if not any(t[i] < s <= t[i + 1] for s in starts):
            starts.append(float(t[i + 1]))
    starts = sorted(set(starts))
    return [Shot(a, b) for a, b in zip(starts, starts[1:] + [end])]


def _assign_shots(items: Items, rows: np.ndarray, shots: list[Shot]) -> None:
    """Put each frame (row) in the shot its time falls in, with that shot's bounds (in place)."""
    if not shots:
        return
    starts = np.asarray([s.start for s in shots])
    shot = np.clip(np.searchsorted(starts, items.t[rows] + 1e-6, side="right") - 1, 0, len(shots) - 1)
    items.shot[rows] = shot
    items.shot_start[rows] = starts[shot]
    items.shot_end[rows] = np.asarray([s.end for s in shots])[shot]


class _Pending:
    """Items added and ids dropped since the writer's arrays were last folded (at each commit)."""

    def __init__(self) -> None:
        self.items: list[Items] = []
        self.vectors: list[np.ndarray] = []
        self.dropped: set[int] = set()  # changed files that no longer decode, videos that broke part way

    def add(self, items: Items, vectors: np.ndarray) -> None:
        self.items.append(items)
        self.vectors.append(vectors)

    def count(self) -> int:
        """How many items the index gains when this is folded in."""
        return sum(len(p) for p in self.items) - len(self.dropped)

    def fold(self, items: Items, embeddings: np.ndarray) -> tuple[Items, np.ndarray]:
        for part in self.items:
            items = Items.concat(items, part)
        if self.vectors:
            embeddings = np.concatenate([embeddings] + self.vectors)
        if self.dropped:
            rows = np.flatnonzero(~np.isin(items.id, np.fromiter(self.dropped, np.int64, len(self.dropped))))
            items, embeddings = items.take(rows), embeddings[rows]
        self.__init__()
        return items, embeddings


class IndexWriter:
    """One run that brings one source (a folder, or the texts of one file) up to date in an index.

    ``run`` diffs the source against the index (``plan_update``), embeds what is new or changed in
    batches, records the files that fail, commits every ``commit_every`` items and at the end. A run
    with nothing to do reads the manifest and the items table only: no embeddings, no faiss index.
    ``root`` is the source's folder, or a predicate ``(path, kind)`` telling which items are its own.
    """

    def __init__(self, path, root: str | Callable[[str, str], bool], encoder=None, model: ModelRef | None = None,
                 spec: IndexSpec | dict | None = None, config: IndexingConfig = IndexingConfig(),
                 on_progress: Callable[[int, int], None] | None = None,
                 on_skip: Callable[[Skipped], None] | None = None) -> None:
        self.path, self.root, self.belongs = Path(path), root, _membership(root)
        check_lang(config.lang)  # before any work
        self.encoder, self.model, self.spec_arg, self.config = encoder, model, spec, config
        self.on_progress, self.on_skip = on_progress, on_skip
        self.report = IndexReport(str(self.path.resolve()))
        self.pending = _Pending()
        self.embeddings: np.ndarray | None = None  # loaded only when there is work to do
        self.vindex = None  # the faiss index, updated in place between commits
        self.reembedded: set[int] = set()  # ids whose vector changed since vindex was last synced
        self.video_ids: dict[str, list[int]] = {}  # frame ids of the videos embedded in this run
        self.video_shots: dict[str, tuple[list[Shot], str]] = {}  # video path -> (its shots, how it was sampled)
        self.saved = False
        self.done = 0  # files embedded (a video once all its frames are)
        self._digests: dict[str, str | None] = {}

    # ---- the steps ---------------------------------------------------------------------------------
    def run(self, files: Sequence[MediaFile], skipped: Sequence[Skipped] = (), t0: float | None = None) -> IndexReport:
        t0 = time.perf_counter() if t0 is None else t0
        for s in skipped:
            self._skip(s)
        self._resolve_model()
        with write_lock(self.path):
            self._read()
            self._plan(files, [s.path for s in skipped if s.unreadable])
            if self._nothing_to_do():
                self._record_failures()
                sweep(self.path, keep=kept(self.manifest))  # what a killed run left behind
            else:
                self._prepare()
                self._embed_all()
                self._finish()
        self.report.total = self.manifest.count
        self.report.index_kind = self.manifest.index.kind
        self.report.seconds = time.perf_counter() - t0
        return self.report

    def _resolve_model(self) -> None:
        """Which model and precision this run embeds with; refuse a mismatch before loading the model."""
        check_index_folder(self.path)
        existing = read_manifest(self.path) if Collection.exists(self.path) else None
        if self.encoder is None and self.model is not None and is_export(self.model.name):  # it names its model
            self.encoder = get_encoder(self.model.name, device=self.model.device, precision=self.config.precision)
        if self.encoder is not None:
            ref = self.encoder.ref
        elif existing is not None and self.model is None:
            ref = ModelRef(existing.model.name, existing.model.pretrained)
        else:
            ref = self.model or ModelRef(DEFAULT_MODEL)
        precision = getattr(self.encoder, "precision", "fp32") if self.encoder is not None else self.config.precision
        if existing is not None:  # before spending seconds loading the model
            check_model(existing, ref, self.path, getattr(self.encoder, "weights", None), precision)
            precision = precision or existing.precision
        # still None: a new index, at the model's default precision (known once the model loads)
        self.ref, self.precision = ref, precision

    def _read(self) -> None:
        """The manifest and items table, read again under the lock (another writer may have committed)."""
        self.new = not Collection.exists(self.path)
        if self.new:
            self.manifest, self.items = Manifest(model=_model_record(self.ref, precision=self.precision)), Items.empty()
        else:
            self.manifest = read_manifest(self.path)
            self.items = read_items(self.path, self.manifest)
            check_rows(self.path, self.manifest, self.items, None)
        # keep the index settings the user chose when the index was built; a dict changes some of them
        spec = self.spec_arg
        if spec is None:
            spec = self.manifest.spec
        elif isinstance(spec, dict):
            spec = replace(self.manifest.spec, **spec)
        self.spec = normalise_spec(spec)
        # video sampling: what the caller says, else what this index used last, else the defaults
        last, cfg = self.manifest.video_sampling or Sampling(), self.config
        self.sampling = Sampling(
            float(cfg.frame_interval if cfg.frame_interval is not None else last.frame_interval),
            float(cfg.skip_similar if cfg.skip_similar is not None else last.skip_similar))
        self.config = replace(cfg, frame_interval=self.sampling.frame_interval, skip_similar=self.sampling.skip_similar)
        self.sampled = dict(self.manifest.video_sampled)  # video path -> the sampling its frames came from
        self.modes = dict(self.manifest.video_modes)  # video path -> "seek" or "decode": how it was sampled

    def _plan(self, files: Sequence[MediaFile], unreadable: Sequence[str]) -> None:
        old = self.manifest.failed
        self.plan = plan = plan_update(files, self.items, self.root, unreadable, old,
                                       resample_videos=lambda path: self.sampled.get(path, self.sampling) != self.sampling)
        for s in plan.known_failures:
            self._skip(s)
        known = {s.path for s in plan.known_failures}
        # failures outside this source, or still current in it, stay on record
        self.failures = {p: f for p, f in old.items() if not self.belongs(p, "image") or p in known}
        self.report.unchanged, self.report.removed = plan.unchanged, plan.removed
        self.moves = self._find_moves()
        self.report.duplicates = self._find_duplicates()
        kept_t, kept_start = self.items.t[plan.keep_rows], self.items.shot_start[plan.keep_rows]
        shots_due = bool(np.any(~np.isnan(kept_t) & np.isnan(kept_start)))  # video frames of an index before shots
        self.dirty = bool(plan.removed or plan.resampled or self.moves or shots_due)  # something not yet committed
        self._use_bank(getattr(self.encoder, "query_bank", None) if self.encoder is not None else None)

    def _find_moves(self) -> dict[str, MediaFile]:
        """Files that vanished and reappear under a new path in this run (same size, same content): old
        path -> the file now. They keep their items, ids and vectors; nothing is embedded. A vanished
        file may have been under this source (a renamed subfolder) or elsewhere in the index (the
        source itself renamed)."""
        plan, items = self.plan, self.items
        new = self._new_files()
        gone = self._vanished({f.size for f in new}) if new else {}
        moves: dict[str, MediaFile] = {}
        sizes = {size for size, _ in gone}
        for f in new:
            if f.size not in sizes:
                continue
            olds = gone.get((f.size, self._digest(f)))  # None when unreadable now: the embedding step reports it
            if olds:  # identical files (copies) vanished together: one each
                moves[olds.pop()] = f
                plan.to_embed.remove(f)
        returning = [r for r, p in enumerate(items.path) if p in moves and p in plan.removed_paths] if moves else []
        if returning:  # rows the plan had dropped come back, under their new path
            plan.keep_rows = np.sort(np.concatenate([plan.keep_rows, np.asarray(returning, np.int64)]))
            plan.removed -= sum(1 for old in moves if old in plan.removed_paths)
        for old, f in moves.items():
            if old in self.sampled:
                self.sampled[f.path] = self.sampled.pop(old)
            if old in self.failures:
                del self.failures[old]
        self.report.removed, self.report.moved = plan.removed, len(moves)
        return moves

    def _new_files(self) -> list[MediaFile]:
        """The images and videos of this run that are not in the index yet (not changed or re-sampled ones)."""
        plan = self.plan
        return [f for f in plan.to_embed if f.kind != "text" and f.path not in plan.reuse_ids
                and f.path not in plan.resampled]

    def _find_duplicates(self) -> int:
        """Drop from the work the new files that are a file already indexed under another path and still
        there (the same device and inode: a symlink to it, a hard link), e.g. a folder linking to one
        indexed before: they are not stored twice. Only indexed files of a new file's size are stat'ed.
        Returns how many."""
        plan, items = self.plan, self.items
        new = self._new_files()
        if not new or not len(items):
            return 0
        inode_of: dict[tuple[int, int], str] = {}  # indexed files of the new files' sizes, on disk now
        seen: set[str] = set()
        sizes: set[int] = set()  # the sizes of those
        for r in np.flatnonzero(np.isin(items.size, list({f.size for f in new}))).tolist():
            path, kind = items.path[r], items.kind[r]
            # this source's own files were scanned (a scan lists each file once); moved-away ones are gone
            if kind == "text" or path in seen or self.belongs(path, kind) or path in self.moves:
                continue
            seen.add(path)
            key = _inode(path)
            if key is not None:
                inode_of.setdefault(key, path)
                sizes.add(int(items.size[r]))
        dups = {f.path for f in new if f.size in sizes and _inode(f.path) in inode_of}
        if dups:
            plan.to_embed = [f for f in plan.to_embed if f.path not in dups]
        return len(dups)

    def _vanished(self, sizes: set[int]) -> dict[tuple[int, str], list[str]]:
        """(size, digest) -> paths of indexed files of these sizes that are no longer on disk."""
        items, out = self.items, {}
        seen: set[str] = set()
        for r, (path, kind) in enumerate(zip(items.path, items.kind)):
            if kind == "text" or path in seen or items.digest[r] is None or int(items.size[r]) not in sizes:
                continue
            seen.add(path)
            if path in self.plan.removed_paths or (not self.belongs(path, kind) and not os.path.lexists(path)):
                out.setdefault((int(items.size[r]), items.digest[r]), []).append(path)
        return out

    def _use_bank(self, bank) -> None:
        """The query bank that measures items' hubness: the encoder's (one without a bank has none),
        else the model's, loaded without the model."""
        if self.encoder is None:
            bank = load_query_bank(self.ref)
        self.bank = bank
        self.hubness = bank.settings() if bank is not None else None  # what the manifest must say after this run

    def _nothing_to_do(self) -> bool:
        """The index already is what this run would commit: decided without embeddings or faiss."""
        m = self.manifest
        return (not self.new and not self.dirty and not self.plan.to_embed
                and m.format_version == FORMAT_VERSION and m.index_spec is not None and m.spec == self.spec
                and m.hubness == self.hubness and not len(self._unmeasured())
                and (m.count == 0 or m.index.kind is not None))

    def _record_failures(self) -> None:
        """Only the failure record (or the list of folders) may have changed: no new generation needed."""
        if self.failures != self.manifest.failed or self._roots() != self.manifest.roots:
            self.manifest = write_manifest(self.path, self.manifest.copy(failed=self.failures, roots=self._roots()))

    def _roots(self) -> list[str]:
        """The folders indexed into this index, this run's included (a texts file is not one)."""
        if not isinstance(self.root, str):
            return self.manifest.roots
        return sorted(set(self.manifest.roots) | {os.path.realpath(self.root)})

    def _prepare(self) -> None:
        """Load what the work needs: the model (if anything must be encoded), the vectors, the faiss index."""
        plan = self.plan
        self.by_path = {f.path: f for f in plan.to_embed}
        copied_rows = self._plan_copies()
        self._digests = {p: d for p, d in self._digests.items() if d is not None}  # failed reads: tried again
        if self.to_encode and self.encoder is None:  # the model loads only when there is work for it

            self.encoder = get_encoder(self.ref.name, pretrained=self.ref.pretrained, device=self.ref.device,
                                       backend=self.config.backend, precision=self.precision)
            self._use_bank(self.encoder.query_bank)
        if self.encoder is not None:
            self.manifest = self.manifest.copy(model=_model_record(self.ref, self.encoder))
        dim = self.encoder.dim if self.encoder is not None else int(self.manifest.model.dim or 0)
        if dim:  # a bad --index-factory or --memory fails now, not after hours of embedding

            check_spec(self.spec, dim, len(plan.keep_rows) + len(plan.to_embed))
        self._load_vectors(dim, copied_rows)

    def _plan_copies(self) -> list[int]:
        """Split the work into what the model must embed (``to_encode``) and what takes vectors already
        computed: a text the index holds, or a new file with the kind, size and fast_digest of an indexed
        file (``copied``: records whose vectors are the index rows returned; a video's frames keep their
        times), or of another new file of this run (``followers`` of that file: copied once it is
        embedded). Only new files whose size another file has are read for their digest."""
        known_text = self._known_texts()
        new = self._new_files()
        counts = Counter(f.size for f in new)
        indexed = self._indexed_content(set(counts))
        indexed_sizes = {size for _, size, _ in indexed}
        candidates = {f.path for f in new if counts[f.size] > 1 or f.size in indexed_sizes}
        first: dict[tuple[str, int, str], str] = {}  # content -> the file of this run embedded for it
        self.copied, self.followers, self.originals, self.to_encode, rows = [], {}, {}, [], []
        for f in self.plan.to_embed:
            key = (f.kind, f.size, self._digest(f)) if f.path in candidates else None
            if f.kind == "text" and f.text in known_text:
                self.copied.append(f)
                rows.append(known_text[f.text])
            elif key is not None and key in indexed and _same_bytes(f.path, self._now(indexed[key][0])):
                self.copied += [replace(f, t=float(self.items.t[r]), shot=int(self.items.shot[r])) if f.kind == "video"
                                else replace(f, t=None) for r in indexed[key]]
                if f.kind == "video":
                    self.video_shots[f.path] = (_shots_of(self.items, indexed[key]), "copied")
                rows += indexed[key]
            elif key is not None and key in first and _same_bytes(f.path, first[key]):
                self.followers.setdefault(first[key], []).append(f)
            else:
                if key is not None and key[2] is not None:
                    first[key] = f.path
                self.to_encode.append(f)
        self.report.copied = len({f.path for f in self.copied})
        return rows

    def _now(self, row: int) -> str:
        """Where the file of an indexed row is now (moved files: their new path)."""
        path = self.items.path[row]
        return self.moves[path].path if path in self.moves else path

    def _known_texts(self) -> dict[str, int]:
        """text -> its row in the index, when this run has texts (a line that only moved keeps its vector)."""
        known: dict[str, int] = {}
        if not self.new and any(f.kind == "text" for f in self.plan.to_embed):
            for r, (k, t) in enumerate(zip(self.items.kind, self.items.text)):
                if k == "text" and t:
                    known.setdefault(t, r)
        return known

    def _indexed_content(self, sizes: set[int]) -> dict[tuple[str, int, str], list[int]]:
        """(kind, size, digest) -> the rows of one indexed file of these sizes that the index keeps as it
        is (a video: all its frames, sampled as this run samples), whose vectors a copy of it can take."""
        items, plan, out = self.items, self.plan, {}
        owner: dict[tuple[str, int, str], str] = {}
        rows = plan.keep_rows[np.isin(items.size[plan.keep_rows], list(sizes))] if sizes else plan.keep_rows[:0]
        for r in rows.tolist():
            path, kind, digest = items.path[r], items.kind[r], items.digest[r]
            if kind == "text" or digest is None or path in plan.reuse_ids:  # unknown content, or about to change
                continue
            now = self.moves[path].path if path in self.moves else path
            if kind == "video" and self.sampled.get(now, self.sampling) != self.sampling:
                continue
            key = (kind, int(items.size[r]), digest)
            if owner.setdefault(key, path) == path:
                out.setdefault(key, []).append(r)
        return out

    def _load_vectors(self, dim: int, copied_rows: list[int]) -> None:
        """The index's vectors in RAM (they are edited in place), the faiss index when it can be updated."""
        m = self.manifest
        stored = _read_embeddings(self.path / m.generation_dir / EMBEDDINGS) if m.count else None
        if stored is not None:
            check_rows(self.path, m, None, stored)
        embeddings = np.array(stored, dtype=np.float32) if stored is not None else np.zeros((0, dim), np.float32)
        self.copied_emb = embeddings[copied_rows] if copied_rows else None
        if m.count and m.index.kind:
            if m.spec == self.spec:
                self.vindex = Collection(self.path, m, self.items, stored).load_index(mmap=False)
            else:
                self.report.index_notes.append("index settings changed: rebuilding the index")
        self.items, self.embeddings = self.items.take(self.plan.keep_rows), embeddings[self.plan.keep_rows]
        for r, path in enumerate(self.items.path):  # moved files: same item, new path
            if path in self.moves:
                f = self.moves[path]
                self.items.path[r], self.items.mtime_ns[r] = f.path, f.mtime_ns
        self.row_of_id = {int(i): r for r, i in enumerate(self.items.id)}
        digests = lambda h: {k: v.get("digest") for k, v in (h or {}).items()}  # noqa: E731
        if digests(m.hubness) != digests(self.hubness):
            self.items.hub[:] = np.nan  # measured with another bank, or none: measure again (if any) at the commit

    def _embed_all(self) -> None:
        def batches():  # (records, vectors, boundary, whether the model embedded them)
            if self.copied:
                self._progress(len({f.path for f in self.copied}))
                yield self.copied, self.copied_emb, True, False
            yield from self._model_batches(self.to_encode)
            yield from self._follower_batches()

        since_commit, t_embed = 0, time.perf_counter()
        for ok, emb, boundary, by_model in batches():
            self._apply(ok, emb)
            self.report.embedded += len(ok) if by_model else 0
            since_commit += len(ok)
            # commit every commit_every items, and at least a quarter of the collection apart,
            # so the rewrites of a long first run add up to a bounded multiple of the data
            if boundary and since_commit >= max(self.config.commit_every, len(self.items) // 4):
                since_commit = 0
                self._save()
        if self.report.embedded:
            self.report.embedded_per_second = self.report.embedded / max(1e-9, time.perf_counter() - t_embed)

    def _model_batches(self, files: list[MediaFile]):
        if not files:
            return
        if self.config.ray is not None:
            from .scale.embed import embed_on_ray

            batches = embed_on_ray(files, self.encoder, self.path, self.config, self._progress, self._failed,
                                   self.video_shots)
        else:
            batches = embed_files(files, self.encoder, self.config, self._progress, self._failed, self.video_shots)
        for ok, emb, boundary in batches:
            yield ok, emb, boundary, True

    def _follower_batches(self):
        """The files of this run with the content of another one embedded in this run take its vectors (a
        video's frames with their times); those whose original failed are run through the model themselves."""
        records, vectors, orphans = [], [], []
        for source, files in self.followers.items():
            if source not in self.originals:
                orphans += files
                continue
            done, done_vectors = self.originals[source]
            for f in files:
                records += [replace(f, t=r.t) for r in done]
                vectors += done_vectors
        if records:
            n = sum(len(files) for source, files in self.followers.items() if source in self.originals)
            self.report.copied += n
            self._progress(n)
            yield records, np.stack(vectors), True, False
        yield from self._model_batches(orphans)

    def _apply(self, ok: list[MediaFile], emb: np.ndarray) -> None:
        """Take one batch of embedded records: replace changed files' vectors in place, queue new items."""
        self.dirty = self.dirty or bool(ok)
        fresh = []
        for f, vector in zip(ok, emb):
            if f.path in self.followers:  # files of this run with the same content take this vector
                done, vectors = self.originals.setdefault(f.path, ([], []))
                done.append(f)
                vectors.append(vector)
            if f.kind == "video":  # frames: always new items; counted per video file
                self._video_started(f)
                fresh.append((f, vector))
            elif f.path in self.plan.reuse_ids:  # re-embedded in place: same id, same row
                self.failures.pop(f.path, None)
                item_id = self.plan.reuse_ids[f.path]
                r = self.row_of_id[item_id]
                self.embeddings[r] = vector
                self.items.hub[r] = np.nan  # measured again at the next commit
                self.items.size[r], self.items.mtime_ns[r], self.items.text[r] = f.size, f.mtime_ns, f.text
                self.items.digest[r] = self._digest(f)
                self.reembedded.add(item_id)
                self.report.updated += 1
            else:
                self.failures.pop(f.path, None)
                fresh.append((f, vector))
        if fresh:
            self._add(fresh)

    def _video_started(self, f: MediaFile) -> None:
        if f.path in self.video_ids:
            return
        self.video_ids[f.path] = []
        self.sampled[f.path] = self.sampling
        self.failures.pop(f.path, None)
        if f.path in self.plan.resampled:
            self.report.updated += 1
        else:
            self.report.added += 1

    def _add(self, fresh: list[tuple[MediaFile, np.ndarray]]) -> None:
        """New items, with new ids."""
        start = self.manifest.next_id
        ids = np.arange(start, start + len(fresh), dtype=np.int64)
        self.manifest.next_id = start + len(fresh)
        for (f, _), i in zip(fresh, ids.tolist()):
            if f.kind == "video" and f.path in self.video_ids:
                self.video_ids[f.path].append(i)
        self.report.added += sum(1 for f, _ in fresh if f.kind != "video")
        files = [f for f, _ in fresh]
        self.pending.add(Items(ids, [f.path for f in files], np.asarray([f.size for f in files], np.int64),
                               np.asarray([f.mtime_ns for f in files], np.int64), [f.kind for f in files],
                               [f.text for f in files],
                               np.asarray([np.nan if f.t is None else f.t for f in files], np.float64),
                               digest=[self._digest(f) for f in files],
                               shot=np.asarray([-1 if f.shot is None else f.shot for f in files], np.int32)),
                         np.stack([v for _, v in fresh]))

    def _digest(self, f: MediaFile) -> str | None:
        """The file's fast_digest (once per file: a video's frames share it); None for texts."""
        if f.kind == "text":
            return None
        if f.path not in self._digests:
            try:
                self._digests[f.path] = fast_digest(f.path, f.size)
            except OSError:
                self._digests[f.path] = None
        return self._digests[f.path]

    def _failed(self, s: Skipped) -> None:
        """A file of this run that could not be used. A broken file is remembered (not retried until it
        changes) and its old vector dropped; one that could not be read now (I/O, permissions) is not:
        the index keeps what it had and the next run tries again."""
        f = self.by_path[s.path]
        self.originals.pop(s.path, None)  # its copies are embedded themselves
        if not s.unreadable:
            self.failures[s.path] = Failure(f.size, f.mtime_ns, s.reason)
        if s.path in self.video_ids:  # a video that broke part way: its frames so far go too
            self.pending.dropped.update(self.video_ids.pop(s.path))
            self.sampled.pop(s.path, None)
            if s.path in self.plan.resampled:
                self.report.updated -= 1
            else:
                self.report.added -= 1
        if s.path in self.plan.reuse_ids and not s.unreadable:  # a changed file that no longer decodes leaves
            self.pending.dropped.add(self.plan.reuse_ids[s.path])
            self.report.removed += 1
            self.dirty = True
        elif s.path in self.plan.resampled:  # its old frames were dropped by the plan
            self.report.removed += 1
            self.dirty = True
        self._skip(s)

    def _save(self) -> None:
        """Commit: fold pending changes in, measure new items' hubness, sync the faiss index, write a generation."""
        self.items, self.embeddings = self.pending.fold(self.items, self.embeddings)
        self.row_of_id = {int(i): r for r, i in enumerate(self.items.id)}
        self.dirty, self.saved = False, True
        rows = self._unmeasured()
        if len(rows):
            self.items.hub[rows] = self.bank.hubs(self.embeddings[rows], [self.items.kind[r] for r in rows])
        self.vindex = sync_index(self.vindex, self.embeddings, self.items.id, self.spec, self.reembedded,
                                 self.report.index_notes)
        self.reembedded.clear()
        self._fill_shots()
        videos = {p for p, k in zip(self.items.path, self.items.kind) if k == "video"}
        base = self.manifest.copy(failed=dict(self.failures), index_spec=self.spec, hubness=self.hubness, roots=self._roots(),
                                  video_sampled={p: v for p, v in self.sampled.items() if p in videos},
                                  video_modes={p: v for p, v in self.modes.items() if p in videos},
                                  video_sampling=self.sampling)
        self.manifest = commit(self.path, self.items, self.embeddings, self.vindex, base)

    def _finish(self) -> None:
        n_final = len(self.items) + self.pending.count()
        stale = n_final and (self.vindex is None or self.vindex.needs_rebuild(n_final, self.spec))
        hubs_due = len(self._unmeasured()) > 0 or self.manifest.hubness != self.hubness
        if (self.new and not self.saved) or self.dirty or stale or hubs_due or self.manifest.spec != self.spec:
            self._save()
        else:
            self._record_failures()

    def _fill_shots(self) -> None:
        """Each video frame's shot bounds: from the sampling of the videos embedded in this run, and, for
        videos indexed before shots existed, from a pass of the shot detector (their frames keep their
        vectors: each is put in the shot its time falls in)."""
        items = self.items
        due = np.flatnonzero(~np.isnan(items.t) & np.isnan(items.shot_start))  # video frames (only they have a t)
        by_path: dict[str, list[int]] = {}
        for r in due.tolist():
            by_path.setdefault(items.path[r], []).append(r)
        for path, rows in by_path.items():
            if path in self.video_shots:
                shots, mode = self.video_shots[path]
                if mode != "copied":
                    self.modes[path] = mode
            else:
                try:
                    shots = detect_shots(path)
                except (MediaError, OSError):  # cuts unknown: the whole video is one shot
                    shots = [Shot(0.0, float("inf"))]
            rows = sorted(rows, key=lambda r: items.t[r])
            _assign_shots(items, np.asarray(rows), _with_semantic_cuts(shots, items.t[rows], self.embeddings[rows]))

    # ---- small helpers -----------------------------------------------------------------------------
    def _unmeasured(self) -> np.ndarray:
        """Rows without a hub value that the bank can measure (it has the modality that searches them)."""
        rows = np.flatnonzero(np.isnan(self.items.hub))
        if self.bank is None or not len(rows):
            return np.zeros(0, np.int64)

        measurable = {k: QUERY_OF.get(k) in self.bank.sides for k in set(self.items.kind)}
        return rows[np.fromiter((measurable[self.items.kind[r]] for r in rows.tolist()), bool, len(rows))]

    def _skip(self, s: Skipped) -> None:
        self.report.skipped.append(s)
        if self.on_skip:
            self.on_skip(s)

    def _progress(self, n: int) -> None:
        self.done += n
        if self.on_progress:
            self.on_progress(self.done, len(self.plan.to_embed))
