"""Small internal helpers shared by the pipelines."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def prefetch_iter(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``items`` (an iterator) run ahead in a background thread, at most ``depth`` items buffered.

    Used to decode the next batches while the model embeds the current one (``prefetch_iter(map(
    decode, batches))``); memory stays bounded by ``depth``, however long ``items`` is. One thread:
    the forward pass is the bottleneck on CPU, and image decoding silences Pillow warnings with
    ``catch_warnings``, which is not thread-safe across several decoding threads.

    Exceptions raised by the producer surface in the consumer; a consumer that stops early stops
    the producer at its next item.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((None, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((None, done))
        except BaseException as e:  # handed to the consumer
            q.put((e, None))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            error, item = q.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except Exception:
                pass
            thread.join(timeout=0.05)


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Swallow prints and warnings of third-party code (exporters, quantisers): the library never prints."""
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None, ahead: int = 8) -> Iterator[R]:
    """``map(fn, items)`` run in ``workers`` threads (default: one per core), results in input order,
    at most ``ahead`` items in flight. For work that releases the GIL (Pillow decoding and resizing,
    numpy, ONNX Runtime). An exception raised by ``fn`` surfaces when its item's turn comes; a
    consumer that stops early cancels what has not started."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or available_cores()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmsearch-decode")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def fsync_dir(folder: str | Path) -> None:
    """Make renames and new entries in ``folder`` durable (where the platform can fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """The one way mmsearch writes a file: ``with atomic_path(p) as tmp:`` write ``tmp`` (by name, for
    writers that want a path: ONNX, safetensors...); on leaving the block it is fsynced and renamed
    over ``p``, and the folder fsynced. Readers see the old file or the new one, never a partial one.
    If the block raises, the temp file is removed and ``p`` is left as it was."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private; give it the mode open() would
        os.close(fd)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, OSError) and e.errno is None and _out_of_space(tmp.parent)
        tmp.unlink(missing_ok=True)
        if full:  # numpy's tofile reports a full disk as "N requested and M written", without an errno
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise
    fsync_dir(path.parent)


def _out_of_space(folder: Path) -> bool:
    """Whether the file system holding ``folder`` is full for this user (under 64 KiB or no inode left)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024 or (st.f_files > 0 and st.f_favail == 0)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """``with atomic_file(p) as f: f.write(...)`` (or hand ``f`` to ``np.save``, ``pq.write_table``...):
    :func:`atomic_path` with the temp file open for writing."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_file`)."""
    atomic_write_bytes(path, text.encode("utf-8"))
