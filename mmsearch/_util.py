"""Small internal helpers shared by the pipelines."""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], depth: int = 2, workers: int = 1) -> Iterator[R]:
    """``map(fn, items)`` in order, running ``fn`` on up to ``depth`` items ahead in threads.

    Used to decode the next batch of images while the model embeds the current one; memory stays
    bounded by ``depth`` results, however long ``items`` is. One worker by default: the forward pass
    is the bottleneck on CPU, and image decoding silences Pillow warnings with ``catch_warnings``,
    which is not thread-safe across several decoding threads.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > depth:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
