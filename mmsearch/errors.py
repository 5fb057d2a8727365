"""Exceptions raised by mmsearch.

Each one subclasses a builtin, so callers can catch ``FileNotFoundError`` or ``ValueError`` without
knowing about mmsearch; ``MmsearchError`` catches all of them. Messages are one line that names the
thing and says what to do.
"""

from __future__ import annotations


class MmsearchError(Exception):
    """Base class of every error mmsearch raises on purpose."""


class IndexNotFoundError(MmsearchError, FileNotFoundError):
    """The index folder does not exist or holds no index."""


class EmptyIndexError(MmsearchError, ValueError):
    """The index exists but holds no items."""


class IndexFormatError(MmsearchError, ValueError):
    """The index on disk has an unknown format version or is unreadable."""


def repair_hint(index: object) -> str:
    """What to do about a damaged index: the command that checks and repairs it."""
    return f"check and repair it with `mmsearch doctor --index {index} --repair`"


class IndexLockedError(MmsearchError, RuntimeError):
    """Another process is writing to the index."""


class ModelMismatchError(MmsearchError, ValueError):
    """A query or update uses a different model than the one that built the index."""


class ModelLoadError(MmsearchError, RuntimeError):
    """A model could not be loaded (unknown name, missing weights, no network)."""


class MediaError(MmsearchError, ValueError):
    """A media file cannot be used (corrupt, empty, too large, not an image)."""


class MediaReadError(MediaError):
    """A media file could not be read just now (an I/O error, permissions, a network mount that
    went away): not a broken file. Indexing skips it this time and tries again on the next run."""


class BadQueryError(MmsearchError, ValueError):
    """The query is empty or malformed."""


class BadArgumentError(MmsearchError, ValueError):
    """An argument or option has a value mmsearch cannot use (unknown --split or --index-type, a bad
    size or factory string, more layers than the model has)."""


class DataError(MmsearchError, ValueError):
    """A data file the caller named cannot be used (unreadable table, missing column, not UTF-8
    text, no usable rows)."""



class PathError(MmsearchError, OSError):
    """A file or folder the caller named cannot be used (missing, not a folder, unreadable)."""


class PathNotFoundError(PathError, FileNotFoundError):
    """A file or folder the caller named does not exist."""


class NotAFolderError(PathError, NotADirectoryError):
    """A path the caller named is neither a folder nor a file mmsearch can use there."""


class PathAccessError(PathError, PermissionError):
    """A file or folder the caller named cannot be read: permission denied."""
