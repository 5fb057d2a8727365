"""On-disk collection: one folder per index.

    <index>/manifest.json          format version, model, counts, index kind + params, current generation
    <index>/gen-000007/items.parquet   id, path, size, mtime_ns, kind, text, t, hub (one row per vector)
    <index>/gen-000007/embeddings.npy  float32 (n, d), row i <-> items row i
    <index>/gen-000007/index.faiss     faiss index over the embeddings, searched by item id
    <index>/.lock                  flock held by the one process writing

A write builds a complete new generation folder, then atomically replaces manifest.json (the single
commit point), then deletes older generations. A process killed at any moment (even SIGKILL) leaves
the previous manifest pointing at a complete generation; leftovers are swept by the next write. The
lock is an flock, which the kernel releases when its process dies, so it is never stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ._util import atomic_file, atomic_write_bytes, fsync_dir
from .errors import (
    EmptyIndexError,
    IndexFormatError,
    IndexLockedError,
    IndexNotFoundError,
    repair_hint,
)
from .index import VectorIndex, VectorLookup
from .manifest import (  # noqa: F401
    FILES,
    FORMAT,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    FaissInfo,
    FileSum,
    Manifest,
)

MANIFEST = "manifest.json"
ITEMS, EMBEDDINGS, FAISS = FILES["items"], FILES["embeddings"], FILES["faiss"]
COLUMNS = ("id", "path", "size", "mtime_ns", "kind")  # required; "text", "t" and "hub" are optional
GEN_RE = re.compile(r"^gen-\d{6}$")  # committed generation folders
PARTIAL_RE = re.compile(r"^\.gen-\d{6}\.partial$")  # generations being written
SCRATCH_PREFIX = ".ray-embed-"  # + 12 hex digits: parquet shards of an embedding run on Ray (mmsearch.scale)
SCRATCH_RE = re.compile(rf"^{re.escape(SCRATCH_PREFIX)}[0-9a-f]{{12}}$")
MANIFEST_TMP_RE = re.compile(r"^\.manifest\.json\..*\.tmp$")


MARKER = ".mmsearch-generation"  # written first into every generation folder: proof that mmsearch made it
OUR_FILES = {ITEMS, EMBEDDINGS, FAISS, MARKER, MANIFEST}  # MANIFEST: the generation's copy of its manifest


def made_by_us(folder: Path) -> bool:
    """A generation or partial folder mmsearch wrote: it holds the marker, or (generations of
    releases before the marker) nothing but the files a generation holds and their temp files."""
    if not (folder.is_dir() and not folder.is_symlink()
            and (GEN_RE.match(folder.name) or PARTIAL_RE.match(folder.name) or SCRATCH_RE.match(folder.name))):
        return False
    if SCRATCH_RE.match(folder.name):
        return (folder / MARKER).is_file()
    if (folder / MARKER).is_file():
        return True
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError:
        return False
    return all(n in OUR_FILES or _our_temp(n) for n in names)  # an empty one too: removing it loses nothing


def _our_temp(name: str) -> bool:
    """A temp file ``_util.atomic_path`` makes for one of a generation's files: ``.<file>.<random>.tmp``."""
    base = name[1:].removesuffix(".tmp").rsplit(".", 1)[0] if name.startswith(".") and name.endswith(".tmp") else ""
    return base in OUR_FILES or "." + base in OUR_FILES


def _ours(child: Path) -> bool:
    return child.name in (MANIFEST, ".lock") or bool(MANIFEST_TMP_RE.match(child.name)) or made_by_us(child)


def check_index_folder(path: str | Path) -> None:
    """Refuse to turn a folder holding other things into an index (a sweep must never touch them)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise IndexFormatError(f"--index {path} is a file, not a folder: choose a new or empty folder")
    if path.is_dir() and not (path / MANIFEST).is_file():
        foreign = sorted(p.name for p in path.iterdir() if not _ours(p))
        if foreign:
            raise IndexFormatError(
                f"--index {path} is not an mmsearch index and is not empty (holds {foreign[0]!r}): "
                "choose a new or empty folder"
            )


@dataclass
class Items:
    """The item table as columns (row i describes embedding row i)."""

    id: np.ndarray  # int64 stable item ids
    path: list[str]  # absolute paths
    size: np.ndarray  # int64 bytes
    mtime_ns: np.ndarray  # int64
    kind: list[str]  # "image", "video" (one row per sampled frame) or "text"
    text: list[str | None] | None = None  # the text of "text" items; None entries for images
    t: np.ndarray | None = None  # float64 seconds of a video frame; NaN for images and texts
    hub: np.ndarray | None = None  # float32 hubness of the item's vector (mmsearch.hubness); NaN: not measured
    digest: list[str | None] | None = None  # media.fast_digest of the file (None: not known), to spot moves
    shot: np.ndarray | None = None  # int32 shot of a video frame within its video (0-based); -1: not a frame, or not known
    shot_start: np.ndarray | None = None  # float64 seconds where that shot starts (its cut); NaN: none
    shot_end: np.ndarray | None = None  # float64 seconds where that shot ends (the next cut, or the video's end)

    def __post_init__(self) -> None:
        if self.shot is None:
            self.shot = np.full(len(self.path), -1, np.int32)
        if self.shot_start is None:
            self.shot_start = np.full(len(self.path), np.nan)
        if self.shot_end is None:
            self.shot_end = np.full(len(self.path), np.nan)
        if self.digest is None:
            self.digest = [None] * len(self.path)
        if self.text is None:
            self.text = [None] * len(self.path)
        if self.t is None:
            self.t = np.full(len(self.path), np.nan)
        if self.hub is None:
            self.hub = np.full(len(self.path), np.nan, np.float32)

    @classmethod
    def empty(cls) -> "Items":
        return cls(np.zeros(0, np.int64), [], np.zeros(0, np.int64), np.zeros(0, np.int64), [], [], np.zeros(0),
                   np.zeros(0, np.float32), [])

    def __len__(self) -> int:
        return len(self.path)

    def take(self, rows: np.ndarray) -> "Items":
        rows = np.asarray(rows, dtype=np.int64)
        return Items(self.id[rows], [self.path[i] for i in rows], self.size[rows], self.mtime_ns[rows],
                     [self.kind[i] for i in rows], [self.text[i] for i in rows], self.t[rows], self.hub[rows],
                     [self.digest[i] for i in rows], self.shot[rows], self.shot_start[rows], self.shot_end[rows])

    @staticmethod
    def concat(a: "Items", b: "Items") -> "Items":
        return Items(np.concatenate([a.id, b.id]), a.path + b.path, np.concatenate([a.size, b.size]),
                     np.concatenate([a.mtime_ns, b.mtime_ns]), a.kind + b.kind, a.text + b.text,
                     np.concatenate([a.t, b.t]), np.concatenate([a.hub, b.hub]), a.digest + b.digest,
                     np.concatenate([a.shot, b.shot]), np.concatenate([a.shot_start, b.shot_start]),
                     np.concatenate([a.shot_end, b.shot_end]))


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of the index at ``path``; clear errors for a missing or foreign folder."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        if not path.exists():
            raise IndexNotFoundError(f"no index at {path}: build one with `mmsearch index FOLDER`")
        raise IndexNotFoundError(f"{path} holds no mmsearch index (no {MANIFEST}): run `mmsearch index FOLDER`")
    try:
        data = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"{mf} is unreadable ({e}): {repair_hint(path)}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise IndexFormatError(f"{mf} is not an mmsearch index manifest: {repair_hint(path)}")
    version = data.get("format_version")
    if version not in READABLE_VERSIONS:
        raise IndexFormatError(
            f"index {path} has format version {version}, this mmsearch reads version {FORMAT_VERSION}: "
            "rebuild it with `mmsearch index` into a new --index folder"
        )
    return Manifest.from_json(data, str(mf))


def read_items(path: str | Path, manifest: Manifest) -> Items:
    """The items table of the committed generation named by ``manifest`` (nothing else is read)."""
    if not manifest.generation_dir:
        return Items.empty()
    return _read_items(Path(path) / manifest.generation_dir / ITEMS)


class Collection:
    """A loaded index folder: manifest, items, embeddings and (lazily) the faiss index."""

    def __init__(self, path: Path, manifest: Manifest, items: Items, embeddings: np.ndarray) -> None:
        self.path = path
        self.manifest = manifest
        self.items = items
        self.embeddings = embeddings
        self._index = None
        self._lookup = None

    # ---- reading --------------------------------------------------------------------------------
    @classmethod
    def exists(cls, path: str | Path) -> bool:
        return (Path(path) / MANIFEST).is_file()

    @classmethod
    def open(cls, path: str | Path, load_index: bool = False) -> "Collection":
        """Load the committed generation (embeddings memory-mapped; with ``load_index`` also the
        faiss index, so a searcher keeps serving this generation after a writer retires it)."""
        path = Path(path)
        for attempt in range(3):  # a writer may retire the generation between our reads
            manifest = read_manifest(path)
            gen = path / manifest.generation_dir
            try:
                c = cls(path, manifest, _read_items(gen / ITEMS), _read_embeddings(gen / EMBEDDINGS))
                c._check_rows()
                if load_index and c.count:
                    c.index  # noqa: B018 - load it now, while the generation exists
                return c
            except (FileNotFoundError, IndexNotFoundError):
                if attempt == 2 or read_manifest(path).generation_dir == manifest.generation_dir:
                    raise IndexFormatError(
                        f"index {path} is missing files of {manifest.generation_dir}: {repair_hint(path)}"
                    ) from None
        raise AssertionError("unreachable")

    def _check_rows(self) -> None:
        check_rows(self.path, self.manifest, self.items, self.embeddings)

    @property
    def count(self) -> int:
        return len(self.items)

    @property
    def model(self):
        """The model whose vectors the index holds (an ``IndexedModel``)."""
        return self.manifest.model

    @property
    def lookup(self):
        """Embeddings by item id (a VectorLookup over the memory-mapped embeddings)."""
        if self._lookup is None:
            self._lookup = VectorLookup(self.embeddings, self.items.id)
        return self._lookup

    @property
    def index(self):
        """The faiss index of the committed generation, memory-mapped (loaded on first use)."""
        if self._index is None:
            self._index = self.load_index(mmap=True)
        return self._index

    def load_index(self, mmap: bool = False):
        """The faiss index of the committed generation; ``mmap`` maps it read-only instead of reading it."""

        if self.count == 0:
            raise EmptyIndexError(f"index {self.path} is empty: add files with `mmsearch index FOLDER`")
        info = self.manifest.index
        return VectorIndex.load(self.path / self.manifest.generation_dir / FAISS, info.kind, info.params,
                                mmap=mmap, vectors=self.lookup)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Item-table rows of the given item ids (flattened)."""
        try:
            return self.lookup.rows(np.ravel(ids))
        except KeyError as e:
            raise IndexFormatError(f"index {self.path}: its faiss index and items table disagree ({e.args[0]}): "
                                   f"{repair_hint(self.path)}") from None

    def facts(self) -> dict:
        """What `mmsearch info` shows: model, counts, dimension, index kind and parameters, size, dates."""
        m = self.manifest
        return {
            "index": str(self.path.resolve()),
            "model": m.model.key,
            "precision": m.model.precision or "fp32",
            "count": m.count,
            "counts_by_kind": m.counts_by_kind,
            "dim": m.dim,
            "index_type": m.index.kind,
            "index_params": m.index.params,
            **({"index_choice": _choice_line(m.index.params)} if m.index.params.get("choice") else {}),
            "hubness": m.hubness,
            "disk_bytes": self.disk_bytes(),
            "previous_generation": m.previous,  # kept for `mmsearch doctor --repair`
            "format_version": m.format_version,
            "created": m.created,
            "updated": m.updated,
        }

    def disk_bytes(self) -> int:
        gen = self.path / self.manifest.generation_dir
        return sum(f.stat().st_size for f in gen.iterdir() if f.is_file()) + (self.path / MANIFEST).stat().st_size


def _choice_line(params: dict) -> str:
    from .index.choice import Choice

    return Choice.from_json(params["choice"]).summary()


def check_rows(path: Path, m: Manifest, items: Items | None, embeddings: np.ndarray | None) -> None:
    """Items and/or embeddings agree with the manifest on the number of items (a damaged or edited
    table does not): an IndexFormatError naming `mmsearch doctor` otherwise."""
    n_items = len(items) if items is not None else m.count
    rows = (embeddings.shape[0] if embeddings.ndim == 2 else -1) if embeddings is not None else m.count
    if not n_items == rows == m.count:
        raise IndexFormatError(f"index {path}: {m.generation_dir} holds {n_items} items and {rows} embeddings, "
                               f"the manifest says {m.count}: {repair_hint(path)}")


@contextlib.contextmanager
def write_lock(path: str | Path) -> Iterator[None]:
    """Exclusive writer lock on an index folder (flock: released by the kernel if we die)."""
    import fcntl

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexLockedError(
                f"index {path} is being updated by another mmsearch process: wait for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)


def commit(path: str | Path, items: Items, embeddings: np.ndarray, vindex, base: Manifest) -> Manifest:
    """Write a new generation and make it current. Caller holds ``write_lock(path)``.

    ``base`` carries what describes the collection (model, next_id, settings, ...); the counts, the
    index info, the checksums and the generation are filled in here. The generation holds a copy of
    its manifest, and the one committed before it is kept: ``mmsearch doctor --repair`` restores from
    them. Returns the committed manifest.
    """
    path = Path(path)
    if len(items) != embeddings.shape[0]:
        raise AssertionError("items and embeddings disagree")
    old = read_manifest(path) if (path / MANIFEST).is_file() else None
    generation = (old.generation + 1) if old else 1
    name = f"gen-{generation:06d}"
    tmp = _start_generation(path, name)
    try:
        sums = _write_files(tmp, items, embeddings, vindex)
        manifest = _manifest_of(base, old, name, items, embeddings, vindex, sums)
        atomic_write_bytes(tmp / MANIFEST, manifest.dumps())  # the generation's own copy
        os.replace(tmp, path / name)
    except Exception:  # a full disk, an I/O error: leave no partial folder (a kill leaves one: swept later)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path)
    try:
        atomic_write_bytes(path / MANIFEST, manifest.dumps())  # the commit point
    except Exception:  # not committed (a full disk): the old manifest still names the old generation
        shutil.rmtree(path / name, ignore_errors=True)
        raise
    sweep(path, keep=kept(manifest))
    return manifest


def _manifest_of(base: Manifest, old: Manifest | None, name: str, items: Items, embeddings: np.ndarray, vindex,
                 sums: dict[str, FileSum]) -> Manifest:
    """The manifest that commits generation ``name``."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    kinds, counts = np.unique(np.asarray(items.kind, dtype=object), return_counts=True) if len(items) else ((), ())
    return base.copy(
        format=FORMAT, format_version=FORMAT_VERSION, generation=int(name[4:]), generation_dir=name,
        count=int(len(items)), counts_by_kind={k: int(v) for k, v in zip(kinds, counts)},
        dim=int(embeddings.shape[1]),
        index=FaissInfo(vindex.kind, vindex.params) if vindex is not None else FaissInfo(),
        files=dict(FILES), created=(old.created if old else None) or now, updated=now, checksums=sums,
        previous=old.generation_dir if old is not None and old.generation_dir != name else None,
    )


def kept(manifest: Manifest) -> tuple[str, ...]:
    """The generation folders an index keeps: the current one and the one committed before it."""
    return tuple(g for g in (manifest.generation_dir, manifest.previous) if g)


def _start_generation(path: Path, name: str) -> Path:
    """The empty partial folder generation ``name`` is written into, marked as mmsearch's."""
    for stale in (path / name, path / f".{name}.partial"):  # left by a writer killed before its commit
        if made_by_us(stale):
            shutil.rmtree(stale)
        elif os.path.lexists(stale):
            raise IndexFormatError(f"index {path} holds {stale.name}, which mmsearch did not write: move it out of "
                                   "the index folder")
    tmp = path / f".{name}.partial"
    tmp.mkdir(parents=True)
    try:
        atomic_write_bytes(tmp / MARKER, f"mmsearch generation {name}\n".encode())
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _write_files(folder: Path, items: Items, embeddings: np.ndarray, vindex) -> dict[str, FileSum]:
    """The items table, the embeddings and the faiss index of a generation, each written atomically;
    returns their checksums."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shown, raw = _storable_paths(items.path)
    columns = {
        "id": _arrow(items.id, pa.int64()),
        "path": _arrow(shown, pa.string()),
        "size": _arrow(items.size, pa.int64()),
        "mtime_ns": _arrow(items.mtime_ns, pa.int64()),
        "kind": _arrow(items.kind, pa.string()),
        "text": _arrow(items.text, pa.string()),
        "t": _arrow(items.t, pa.float64()),
        "hub": _arrow(items.hub, pa.float32()),
        "digest": _arrow(items.digest, pa.string()),
        "shot": _arrow(items.shot, pa.int32()),
        "shot_start": _arrow(items.shot_start, pa.float64()),
        "shot_end": _arrow(items.shot_end, pa.float64()),
    }
    if raw is not None:  # file names that are not UTF-8: their bytes, so they round-trip exactly
        columns["path_bytes"] = _arrow(raw, pa.binary())
    with atomic_file(folder / ITEMS) as f:
        pq.write_table(pa.table(columns), f)
    with atomic_file(folder / EMBEDDINGS) as f:
        np.save(f, np.ascontiguousarray(embeddings, dtype=np.float32))
    if vindex is not None:
        vindex.save(folder / FAISS)
    return {name: file_sum(folder / name) for name in (ITEMS, EMBEDDINGS, FAISS) if (folder / name).is_file()}


def file_sum(path: Path, chunk: int = 1 << 22) -> FileSum:
    """Size and CRC-32 of a file's bytes (read back right after writing: from the page cache)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc, size = zlib.crc32(block, crc), size + len(block)
    return FileSum(size, f"{crc:08x}")


def _storable_paths(paths: list[str]) -> tuple[list[str], list[bytes | None] | None]:
    """Paths as the items table stores them. Linux file names are bytes; one that is not UTF-8 reaches
    Python with surrogate escapes, which a UTF-8 column cannot hold: its ``path`` shows it with
    U+FFFD, and ``path_bytes`` keeps the exact bytes (None for the rest; no column if none is needed)."""
    shown, raw, odd = list(paths), [None] * len(paths), False
    for i, p in enumerate(paths):
        if p is not None and not p.isascii():
            try:
                p.encode("utf-8")
            except UnicodeEncodeError:
                b = os.fsencode(p)
                shown[i], raw[i], odd = b.decode("utf-8", "replace"), b, True
    return shown, (raw if odd else None)


def write_manifest(path: str | Path, manifest: Manifest) -> Manifest:
    """Atomically replace the manifest (same generation), e.g. to update the failure record."""
    manifest = manifest.copy(updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    atomic_write_bytes(Path(path) / MANIFEST, manifest.dumps())
    return manifest


def sweep(path: Path, keep: tuple[str, ...] = ()) -> list[str]:
    """Delete the generations and partial folders mmsearch made, other than those in ``keep`` (the
    ones the manifest names), and stray manifest temp files. Folders it did not make are never
    touched. Returns the names deleted."""
    gone = []
    for child in path.iterdir():
        if child.name in keep:
            continue
        if made_by_us(child):
            shutil.rmtree(child, ignore_errors=True)
            gone.append(child.name)
        elif MANIFEST_TMP_RE.match(child.name):
            child.unlink(missing_ok=True)
            gone.append(child.name)
    return gone


def _read_items(path: Path) -> Items:
    import pyarrow.parquet as pq

    strings = ("path", "kind", "text", "digest")  # (path_bytes, when present, restores names that are not UTF-8)
    try:
        # strings as dictionaries: a video's path (one row per frame) and the kinds become one Python
        # string each, shared by their rows; one column at a time, so only one is decoded at once
        f = pq.ParquetFile(path, read_dictionary=list(strings))
        names = set(f.schema_arrow.names)
        missing = set(COLUMNS) - names
        if missing:
            raise IndexFormatError(f"{path} lacks columns {sorted(missing)}: {repair_hint(path.parent.parent)}")
        cols = {}
        for name, dtype in (("id", np.int64), ("path", None), ("size", np.int64), ("mtime_ns", np.int64),
                            ("kind", None), ("text", None), ("t", np.float64), ("hub", np.float32),
                            ("digest", None), ("shot", np.int32), ("shot_start", np.float64),
                            ("shot_end", np.float64)):
            if name in names:
                col = f.read(columns=[name], use_threads=False).column(0)
                _check_column(path, name, col)
                cols[name] = _strings(col) if dtype is None else _numbers(col, dtype)
    except (FileNotFoundError, IndexFormatError):
        raise
    except Exception as e:
        raise IndexFormatError(f"{path} is unreadable ({e}): {repair_hint(path.parent.parent)}") from e
    if "path_bytes" in names:
        raw = f.read(columns=["path_bytes"], use_threads=False).column(0).to_pylist()
        if not all(b is None or isinstance(b, bytes) for b in raw):
            raise IndexFormatError(f"{path} has a malformed path_bytes column: {repair_hint(path.parent.parent)}")
        cols["path"] = [os.fsdecode(b) if b is not None else p for p, b in zip(cols["path"], raw)]
    if not _unique(cols["id"]):
        raise IndexFormatError(f"{path} has repeated item ids: {repair_hint(path.parent.parent)}")
    return Items(cols["id"], cols["path"], cols["size"], cols["mtime_ns"], cols["kind"], cols.get("text"),
                 cols.get("t"), cols.get("hub"), cols.get("digest"), cols.get("shot"), cols.get("shot_start"),
                 cols.get("shot_end"))


KINDS = {"image", "video", "text"}
_REQUIRED = {"id", "path", "size", "mtime_ns", "kind", "shot"}  # never null (when present)


def _check_column(path: Path, name: str, col) -> None:
    """The items table's schema: integer ids, sizes and times, string paths and kinds (none null), string
    or null texts and digests, float times and hub values. A table damaged or edited by hand fails here."""
    import pyarrow as pa

    t = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
    kind = ("int" if pa.types.is_integer(t) else "str" if pa.types.is_string(t) or pa.types.is_large_string(t)
            else "float" if pa.types.is_floating(t) else "null" if pa.types.is_null(t) else str(t))
    want = {"id": "int", "size": "int", "mtime_ns": "int", "path": "str", "kind": "str", "text": "str",
            "digest": "str", "t": "float", "hub": "float", "shot": "int", "shot_start": "float",
            "shot_end": "float"}[name]
    if (kind != want and not (kind == "null" and name not in _REQUIRED)) or (name in _REQUIRED and col.null_count):
        raise IndexFormatError(f"{path} has a malformed {name} column ({col.type}, {col.null_count} nulls): "
                               f"{repair_hint(path.parent.parent)}")
    if name == "kind":
        import pyarrow.compute as pc

        unknown = set(pc.unique(col).to_pylist()) - KINDS
        if unknown:
            raise IndexFormatError(f"{path} has items of unknown kind {sorted(unknown)[0]!r}: {repair_hint(path.parent.parent)}")


def _unique(ids: np.ndarray) -> bool:
    """No id repeats (ids are stored ascending, so one pass decides; else a sort)."""
    if len(ids) < 2 or (np.diff(ids) > 0).all():
        return True
    return bool((np.diff(np.sort(ids)) != 0).all())


def _native(typ):
    """The numpy dtype of a fixed-width pyarrow number type (None for others)."""
    import pyarrow as pa

    return {pa.int64(): np.int64, pa.int32(): np.int32, pa.float64(): np.float64, pa.float32(): np.float32}.get(typ)


def _arrow(values, typ):
    """``pa.array(values, typ)`` for numbers (NaN stays NaN) and for str / bytes with None as null, built
    from its buffers: ``pa.array`` imports pandas whenever it is installed (0.8 s of every index run)."""
    import pyarrow as pa

    native = _native(typ)
    if native is not None:
        data = np.ascontiguousarray(values, dtype=native)
        return pa.Array.from_buffers(typ, len(data), [None, pa.py_buffer(data)])
    if typ not in (pa.string(), pa.binary()):
        return pa.array(list(values), typ)
    raw = [v.encode() if isinstance(v, str) else v for v in values]
    valid = np.fromiter((v is not None for v in raw), bool, len(raw))
    offsets = np.zeros(len(raw) + 1, np.int64)
    np.cumsum(np.fromiter((len(v) if v is not None else 0 for v in raw), np.int64, len(raw)), out=offsets[1:])
    if offsets[-1] >= 2**31:  # beyond 32-bit offsets: pyarrow's own way
        return pa.array(list(values), typ)
    nulls = int(len(raw) - valid.sum())
    mask = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    data = pa.py_buffer(b"".join(v for v in raw if v is not None))
    return pa.Array.from_buffers(typ, len(raw), [mask, pa.py_buffer(offsets.astype(np.int32)), data], null_count=nulls)


def _numbers(column, dtype) -> np.ndarray:
    """A numeric column as a numpy array of ``dtype``. Chunks without nulls are read from their data
    buffer: pyarrow's ``to_numpy`` imports pandas when it is installed (0.8 s of a cold query)."""
    import pyarrow as pa

    parts = []
    for col in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        if not len(col):
            continue
        native, floats = _native(col.type), np.issubdtype(dtype, np.floating)
        if native is None or (col.null_count and not floats):
            parts.append(np.asarray(col.to_numpy(zero_copy_only=False), dtype=dtype))
            continue
        span = slice(col.offset, col.offset + len(col))
        values = np.frombuffer(col.buffers()[1], dtype=native)[span].astype(dtype)
        if col.null_count:  # nulls read as NaN, as to_numpy reads them
            valid = np.unpackbits(np.frombuffer(col.buffers()[0], np.uint8), bitorder="little")[span]
            values[valid == 0] = np.nan
        parts.append(values)
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _strings(column) -> list:
    """A (dictionary-encoded) string column as a list, each distinct value one shared str (None: null)."""
    import pyarrow as pa

    out: list = []
    for col in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        if col.null_count == len(col):
            out += [None] * len(col)
        elif not pa.types.is_dictionary(col.type):
            out += col.to_pylist()
        elif col.null_count:
            values = col.dictionary.to_pylist()
            out += [None if i is None else values[i] for i in col.indices.to_pylist()]
        else:
            values = col.dictionary.to_pylist()
            out += map(values.__getitem__, _numbers(col.indices, np.int64).tolist())
    return out


def _read_embeddings(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise
    except Exception as e:
        raise IndexFormatError(f"{path} is unreadable ({e}): {repair_hint(path.parent.parent)}") from e
