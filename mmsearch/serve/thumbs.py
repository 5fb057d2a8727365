"""Thumbnails for the server: JPEGs cached on disk by the content of the file they show.

A thumbnail's name (and ETag) is a hash of the source file's bytes, the size and, for a video, the
time of its frame: an edited file gets a new name, a renamed one keeps its cached thumbnail. The
file's hash is remembered in memory per (path, file size, mtime), so a hot path is not re-read.
Several threads may ask at once: each file is written atomically, and one thread makes a given
thumbnail while the others asking for the same one wait for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from ..config import MAX_IMAGE_PIXELS
from ..errors import BadArgumentError, MediaError, MediaReadError, PathNotFoundError

MIN_SIZE, MAX_SIZE = 32, 1024
JPEG_QUALITY = 85
_VERSION = b"thumb-v1"  # change it when the way thumbnails look changes: old cache entries go unused
_MEMO_ENTRIES = 100_000  # remembered file hashes (about 200 bytes each)


def stat_file(path: str) -> os.stat_result:
    """``os.stat`` of a file to serve, its errors as ours: gone (PathNotFoundError) or unreadable now
    (MediaReadError)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise PathNotFoundError(f"{path}: file not found") from None
    except OSError as e:
        raise MediaReadError(f"{path}: cannot read: {e.strerror or e}") from None


class FileHashes:
    """sha1 of files' bytes, remembered per (path, size, mtime_ns) in a bounded LRU. Thread-safe."""

    def __init__(self, max_entries: int = _MEMO_ENTRIES) -> None:
        self._memo: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_entries

    def get(self, path: str) -> str:
        st = stat_file(path)
        key = (path, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                return self._memo[key]
        digest = _sha1_file(path)
        with self._lock:
            self._memo[key] = digest
            while len(self._memo) > self._max:
                self._memo.popitem(last=False)
        return digest


def _sha1_file(path: str) -> str:
    h = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise MediaReadError(f"{path}: cannot read: {e.strerror or e}") from None
    return h.hexdigest()


class KeyLocks:
    """One lock per key, so that concurrent requests for the same cache entry make it once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[str, list] = {}  # key -> [lock, number of holders and waiters]

    @contextlib.contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        with self._lock:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]


def check_size(size) -> int:
    """``size`` as an int in MIN_SIZE..MAX_SIZE, or BadArgumentError."""
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise BadArgumentError(f"thumbnail size must be an integer from {MIN_SIZE} to {MAX_SIZE}, got {size!r}")
    return size


class Thumbnails:
    """JPEG thumbnails (longest side <= size, upright per EXIF) cached under ``cache_dir``."""

    def __init__(self, cache_dir: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.cache_dir = Path(cache_dir)
        self.max_pixels = max_pixels
        self._hashes = FileHashes()
        self._locks = KeyLocks()

    def key(self, path: str, size: int, t: float | None = None) -> str:
        """The cache key (and ETag) of the thumbnail of ``path`` at ``size`` (and time ``t``)."""
        size = check_size(size)
        if t is not None and not (math.isfinite(t) and t >= 0):
            raise BadArgumentError(f"time must be >= 0 seconds, got {t}")
        when = b"image" if t is None else f"t={round(float(t), 3)!r}".encode()
        parts = [_VERSION, self._hashes.get(os.fspath(path)).encode(), str(size).encode(), when]
        return hashlib.sha1(b"\0".join(parts)).hexdigest()

    def get(self, path: str, size: int, t: float | None = None) -> tuple[Path, str]:
        """(the cached JPEG, its ETag) for the image at ``path``, or the frame at ``t`` seconds of the
        video at ``path``. BadArgumentError for a size outside 32..1024, MediaError for a file that
        cannot be decoded, PathNotFoundError for a missing one."""
        path = os.fspath(path)
        key = self.key(path, size, t)
        out = self.cache_dir / key[:2] / f"{key}.jpg"
        if out.is_file():
            return out, key
        with self._locks(key):
            if not out.is_file():  # another thread may have made it while this one waited
                data = make_thumbnail(path, size, t, self.max_pixels)
                from .._util import atomic_write_bytes

                out.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(out, data)
        return out, key


def make_thumbnail(path: str, size: int, t: float | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    """The JPEG bytes of the thumbnail (longest side <= ``size``) of an image or a video frame."""
    if t is None:
        from ..media import load_image

        im = load_image(path, max_pixels, min_side=size)  # JPEG draft decoding, EXIF rotation, RGB
    else:
        im = _video_frame(path, t)
    from PIL import Image

    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    try:
        im.save(buf, "JPEG", quality=JPEG_QUALITY, optimize=True)
    except (OSError, ValueError) as e:
        raise MediaError(f"{path}: cannot make a thumbnail: {e}") from None
    return buf.getvalue()


def _video_frame(path: str, t: float):
    """The RGB frame at ``t`` seconds; MediaError also for FFmpeg failures frame_at lets through
    (a seek in a file FFmpeg opened but cannot seek in raises a bare av error)."""
    import av

    from ..errors import MmsearchError
    from ..video import _reason, frame_at

    try:
        return frame_at(path, t).convert("RGB")
    except MmsearchError:
        raise
    except (av.error.FFmpegError, ValueError) as e:
        raise MediaError(f"{path}: cannot decode video ({_reason(e)})") from None
