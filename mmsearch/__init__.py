"""mmsearch: cross-modal retrieval (text->image, image->image) over faiss, offline by default.

Heavy modules (torch, open_clip, faiss) load only when the names that need them are first used, so
``import mmsearch`` and ``mmsearch --help`` stay instant.
"""

from __future__ import annotations

from importlib import import_module

from .errors import (  # noqa: F401
    BadArgumentError,
    BadQueryError,
    DataError,
    EmptyIndexError,
    IndexFormatError,
    IndexLockedError,
    IndexNotFoundError,
    MediaError,
    MmsearchError,
    ModelLoadError,
    ModelMismatchError,
    NotAFolderError,
    PathAccessError,
    PathError,
    PathNotFoundError,
)

__version__ = "0.1.0"

_LAZY = {
    "Encoder": "encoder",
    "VectorIndex": "index",
    "plan_index": "index",
    "IndexSpec": "config",
    "Collection": "store",
    "Searcher": "search",
    "Hit": "search",
    "index_folder": "indexing",
    "index_texts": "indexing",
    "recall_at_k": "metrics",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mmsearch' has no attribute {name!r}")


__all__ = sorted(list(_LAZY) + [n for n in dir() if n.endswith("Error")] + ["__version__"])
