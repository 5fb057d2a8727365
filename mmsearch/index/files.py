"""Index files: written atomically through ``mmsearch._util.atomic_file``, read back (or memory-mapped)
with checks that the file holds the kind of index its manifest says."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

from mmsearch._util import atomic_file
from mmsearch.errors import IndexFormatError, IndexNotFoundError, repair_hint

from . import legacy
from ._faiss import faiss_message, faiss_module
from .plan import KINDS

#: faiss hands the serialised index to Python in pieces of this many bytes (memory stays flat)
WRITE_CHUNK = 1 << 22


def write_index(index: Any, path: str | os.PathLike[str]) -> None:
    """Write ``index`` to ``path`` atomically: streamed into a temp file beside it, fsync, rename, fsync
    the folder (readers see the old file or the new one, never a partial one)."""
    faiss = faiss_module()

    with atomic_file(path) as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write, WRITE_CHUNK))


def _holds(kind: str) -> Callable[[Any], bool]:
    """Whether a faiss index read from a file is of the layout ``kind`` is written as."""
    faiss = faiss_module()

    def in_idmap(cls):
        return lambda ix: isinstance(ix, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(ix.index), cls)

    return {
        "flat": in_idmap(faiss.IndexFlat),
        "hnsw": in_idmap(faiss.IndexHNSW),
        "ivfflat": lambda ix: isinstance(ix, faiss.IndexIVFFlat),
        "ivfpq": lambda ix: isinstance(ix, (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan)) or legacy.is_format1(ix),
        "factory": lambda ix: True,
    }[kind]


def read_index(path: str | os.PathLike[str], kind: str, mmap: bool = False) -> Any:
    """The faiss index in ``path``, which its manifest says is a ``kind`` index; ``mmap`` maps the
    file instead of reading it. IndexNotFoundError / IndexFormatError say what is wrong and what to do."""
    faiss = faiss_module()

    path = Path(path)
    in_index = re.match(r"^gen-\d{6}$", path.parent.name)  # a generation of an index folder
    hint = repair_hint(path.parent.parent) if in_index else "re-run `mmsearch index` to rebuild it"
    if not path.exists():
        raise IndexNotFoundError(f"index file {path} does not exist: {hint}")
    if not path.is_file():
        raise IndexFormatError(f"index file {path} is not a regular file: {hint}")
    if kind not in KINDS:
        raise IndexFormatError(f"index file {path} has unknown kind {kind!r}: {hint}")
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
    except (RuntimeError, OSError, MemoryError) as e:
        raise IndexFormatError(f"index file {path} is unreadable ({faiss_message(e)}): {hint}") from None
    if not _holds(kind)(index):
        raise IndexFormatError(f"index file {path} holds {type(index).__name__}, expected {kind}: {hint}")
    return index
