"""Finding media files under a folder and decoding images safely.

``scan`` only lists and stats files (it never opens them), so it is cheap enough to run on every
``mmsearch index`` to detect changes by size + mtime. ``load_image`` does the decoding, with a
pixel-count guard checked from the header before any pixel data is read.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import MAX_IMAGE_PIXELS, IndexingConfig
from .errors import (
    MediaError,
    MediaReadError,
    NotAFolderError,
    PathAccessError,
    PathError,
    PathNotFoundError,
)


@dataclass(frozen=True)
class MediaFile:
    path: str  # absolute path as found under the root (symlinks not resolved)
    size: int  # bytes (st_size, following links)
    mtime_ns: int  # st_mtime_ns
    kind: str  # "image", "video" or "text"
    text: str | None = None  # the text itself, for kind "text"
    t: float | None = None  # seconds into the video, for one sampled frame of a "video"
    shot: int | None = None  # the shot of that frame within its video (0-based)


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str  # short human reason, e.g. "zero-byte file"
    unreadable: bool = False  # could not be read now (permissions, I/O): keep what the index has for it


# errno values that say "could not read it now", not "it is broken": worth trying again next run
TRANSIENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EIO", "EACCES", "EPERM", "EAGAIN", "EBUSY", "EINTR", "ETIMEDOUT", "ESTALE", "ENOTCONN", "ECONNRESET",
    "ECONNABORTED", "EHOSTDOWN", "EHOSTUNREACH", "ENETDOWN", "ENETUNREACH", "ENETRESET", "ENOLINK",
    "EREMOTEIO", "ENOMEM", "EMFILE", "ENFILE") if hasattr(errno, name))


def is_transient(e: BaseException) -> bool:
    """Whether ``e`` is an OS error about reading a file now rather than about its contents."""
    return isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS


def _os_reason(e: OSError) -> str:
    if isinstance(e, PermissionError):
        return "permission denied"
    if e.errno == errno.ELOOP:
        return "symlink loop"
    return (e.strerror or str(e)).lower()


def scan(root, config: IndexingConfig = IndexingConfig()) -> tuple[list[MediaFile], list[Skipped]]:
    """All image and video files under ``root`` (sorted by path) and the candidates skipped, with reasons.

    Files with other extensions are ignored silently. Folders reached through symlinks are walked
    after all real folders and never twice, so a real path always wins over a linked one, and a
    link to an ancestor folder is reported as a "symlink loop" instead of recursing.
    """
    root = os.path.abspath(os.fspath(root))
    walk = _Walk(config)
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise PathNotFoundError(f"folder not found: {root}") from None
    except OSError as e:
        error = {PermissionError: PathAccessError, NotADirectoryError: NotAFolderError}.get(type(e), PathError)
        raise error(f"cannot read {root}: {_os_reason(e)}") from None
    if not stat.S_ISDIR(st.st_mode):
        if stat.S_ISREG(st.st_mode) and os.path.splitext(root)[1].lower() in walk.exts:
            if st.st_size == 0:
                return [], [Skipped(root, "zero-byte file")]
            return [MediaFile(root, st.st_size, st.st_mtime_ns, walk.kind_of(root))], []
        raise NotAFolderError(f"not a folder, an image or a video file: {root}")
    walk.run(root, st)
    return walk.files(), sorted(walk.skipped, key=lambda s: s.path)


class _Walk:
    """The folder walk of ``scan``: real folders first, then symlinked ones, each real folder once."""

    def __init__(self, config: IndexingConfig) -> None:
        self.videos = {e.lower() for e in config.video_extensions}
        self.exts = {e.lower() for e in config.extensions} | self.videos
        self.follow_symlinks = config.follow_symlinks
        self.found: list[tuple[bool, str, os.stat_result]] = []  # (reached via a link, path, stat)
        self.skipped: list[Skipped] = []
        self.visited: dict[tuple[int, int], str] = {}  # real folder identity -> first path
        self.real_dirs: list[tuple[str, bool]] = []  # (folder, reached via a link)
        self.linked_dirs: list[tuple[str, tuple[int, int]]] = []  # symlinked folders, walked last

    def kind_of(self, path: str) -> str:
        return "video" if os.path.splitext(path)[1].lower() in self.videos else "image"

    def run(self, root: str, st: os.stat_result) -> None:
        self.visited[(st.st_dev, st.st_ino)] = root
        self.real_dirs.append((root, False))
        while self.real_dirs or self.linked_dirs:
            folder, via_link = self.real_dirs.pop() if self.real_dirs else self._next_linked()
            if folder is None:
                continue
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                self.skipped.append(Skipped(folder, f"cannot list folder: {_os_reason(e)}", unreadable=True))
                continue
            for entry in entries:
                self._entry(entry, via_link)

    def _next_linked(self) -> tuple[str | None, bool]:
        """The next symlinked folder to walk, or (None, _) when it loops or was walked already."""
        folder, key = self.linked_dirs.pop(0)
        target, parent = os.path.realpath(folder), os.path.realpath(os.path.dirname(folder))
        if os.path.commonpath([target, parent]) == target:  # points at one of its own ancestors
            self.skipped.append(Skipped(folder, "symlink loop"))
            return None, True
        if key in self.visited:
            self.skipped.append(Skipped(folder, f"duplicate of folder {self.visited[key]}"))
            return None, True
        self.visited[key] = folder
        return folder, True

    def _entry(self, entry: os.DirEntry, via_link: bool) -> None:
        path, ext = entry.path, os.path.splitext(entry.name)[1].lower()
        is_link = False
        try:
            is_link = entry.is_symlink()
            if is_link and not self.follow_symlinks:
                if ext in self.exts:
                    self.skipped.append(Skipped(path, "symlink not followed"))
                return
            est = entry.stat() if (is_link or entry.is_dir() or ext in self.exts) else None
        except OSError as e:
            if ext in self.exts or not ext:  # a broken "notes.txt" link is as uninteresting as notes.txt
                broken = is_link and isinstance(e, FileNotFoundError)
                self.skipped.append(Skipped(path, "broken symlink" if broken else _os_reason(e), unreadable=not broken))
            return
        if est is None:
            return
        if stat.S_ISDIR(est.st_mode):
            key = (est.st_dev, est.st_ino)
            if is_link:
                self.linked_dirs.append((path, key))
            elif key in self.visited:  # e.g. a bind mount of a folder already walked
                self.skipped.append(Skipped(path, f"duplicate of folder {self.visited[key]}"))
            else:
                self.visited[key] = path
                self.real_dirs.append((path, via_link))
        elif ext in self.exts:
            self._file(entry.name, path, est, via_link or is_link)

    def _file(self, name: str, path: str, est: os.stat_result, via_link: bool) -> None:
        if name.startswith("._"):
            self.skipped.append(Skipped(path, "AppleDouble metadata file"))
        elif not stat.S_ISREG(est.st_mode):
            self.skipped.append(Skipped(path, "not a regular file"))
        elif est.st_size == 0:
            self.skipped.append(Skipped(path, "zero-byte file"))
        elif not os.access(path, os.R_OK):
            self.skipped.append(Skipped(path, "permission denied", unreadable=True))
        else:
            self.found.append((via_link, path, est))

    def files(self) -> list[MediaFile]:
        """The files found, each real file once: real paths before linked ones, then sorted by path."""
        files: list[MediaFile] = []
        first_path: dict[tuple[int, int], str] = {}
        for via_link, path, est in sorted(self.found, key=lambda t: (t[0], t[1])):
            key = (est.st_dev, est.st_ino)
            if key in first_path:
                self.skipped.append(Skipped(path, f"duplicate of {first_path[key]}"))
                continue
            first_path[key] = path
            files.append(MediaFile(path, est.st_size, est.st_mtime_ns, self.kind_of(path)))
        return sorted(files, key=lambda f: f.path)


def fast_digest(path: str, size: int | None = None) -> str:
    """A content digest that reads at most 192 KB: blake2b of the size and the first, middle and last
    64 KB. Enough, with the size, to recognise a moved or copied file; not a security measure."""
    import hashlib

    chunk = 1 << 16
    size = os.path.getsize(path) if size is None else size
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
            f.seek(offset)
            h.update(f.read(chunk))
    return h.hexdigest()


def _megapixels(n: float) -> str:
    return f"{n / 1e6:.1f}"


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB version of ``im``: transparency composited on white, 16/32-bit grey scaled to 8 bits."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float64)
        if im.mode == "F":  # float data has no natural range: stretch it
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        else:  # 16-bit samples (also what 16-bit PNGs decode to in mode "I")
            a = np.clip(a, 0, 65535) / 257.0
        return Image.fromarray(np.round(a).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


class _QuietWarnings:
    """``warnings.catch_warnings()`` + ignore, shared by the threads decoding at the same time.

    catch_warnings swaps the process-wide filter list on entry and restores it on exit, so two
    threads entering and leaving it in turn could leave "ignore" installed for good (before Python
    3.14). Here the first thread in installs it and the last one out restores the filters."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._depth = 0
        self._saved: warnings.catch_warnings | None = None

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._saved = warnings.catch_warnings()
                self._saved.__enter__()
                warnings.simplefilter("ignore")
            self._depth += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._saved.__exit__(None, None, None)
                self._saved = None


_QUIET = _QuietWarnings()


def load_image(path, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int | None = None) -> Image.Image:
    """Decode the image at ``path`` into a fully loaded RGB image, upright per its EXIF orientation.

    ``min_side``: the caller will downscale to this shortest side anyway, so JPEGs may be decoded
    at a reduced scale (1/2, 1/4, 1/8) as long as both sides stay >= ``min_side``: several times
    faster for camera photos, and the same pixels after the caller's resize up to resampling noise.

    Raises ``FileNotFoundError`` when the file is missing and ``MediaError`` ("<path>: <reason>")
    when it cannot be used: zero-byte, not an image, more than ``max_pixels`` pixels (checked from the
    header, before decoding), truncated or corrupt. Animated images give their first frame.
    Pillow's own decompression-bomb limit also applies (about 179 MP with its default setting).
    """
    name = os.fspath(path)
    try:
        f = open(name, "rb")
    except FileNotFoundError:
        raise PathNotFoundError(f"{name}: file not found") from None
    except OSError as e:
        raise (MediaReadError if is_transient(e) else MediaError)(f"{name}: {_os_reason(e)}") from None
    with f, _QUIET:
        # Pillow warns (not raises) for images between its own limit and twice that, and warns about
        # odd EXIF/TIFF tags etc.; none of that must reach the user's terminal
        try:
            if os.fstat(f.fileno()).st_size == 0:
                raise MediaError(f"{name}: zero-byte file")
            im = Image.open(f)
            width, height = im.size
            if width * height > max_pixels:
                raise MediaError(
                    f"{name}: too large: {width}x{height} = {_megapixels(width * height)} MP"
                    f" > {max_pixels / 1e6:g} MP limit"
                )
            if min_side and min(width, height) > 0:
                # resizing the short side to min_side blows thin strips up: 4000x1 -> 896000x224
                scale = max(1.0, min_side / min(width, height))
                if width * height * scale * scale > max_pixels:
                    raise MediaError(
                        f"{name}: extreme aspect ratio {width}x{height}: would be "
                        f"{_megapixels(width * height * scale * scale)} MP once resized for the model"
                    )
            if min_side and im.format == "JPEG":
                im.draft("RGB", (min_side, min_side))  # keeps both sides >= min_side
            im.load()  # first frame only for animations; truncated data fails here
            try:
                ImageOps.exif_transpose(im, in_place=True)
            except Exception:  # a corrupt EXIF block should not make the pixels unusable
                pass
            try:
                return _to_rgb(im)
            except ValueError:
                raise MediaError(f"{name}: unsupported color mode {im.mode}") from None
        except MediaError:
            raise
        except Image.DecompressionBombError as e:  # Pillow refused it at open, before our check
            m = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{_megapixels(int(m[1]))} MP" if m else "image"
            limit = min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS) if Image.MAX_IMAGE_PIXELS else max_pixels
            raise MediaError(f"{name}: too large: {size} > {limit / 1e6:g} MP limit") from None
        except UnidentifiedImageError:
            raise MediaError(f"{name}: not an image (cannot identify format)") from None
        except MemoryError:
            raise MediaError(f"{name}: out of memory while decoding") from None
        except Exception as e:  # OSError, SyntaxError, ValueError, struct.error ... from decoders
            if is_transient(e):  # the disk or the network failed, not the file
                raise MediaReadError(f"{name}: cannot read: {_os_reason(e)}") from None
            msg = " ".join(str(e).split()) or type(e).__name__
            raise MediaError(f"{name}: truncated or corrupt: {msg}") from None
