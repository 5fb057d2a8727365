"""The index a running server searches: one Searcher per committed generation, swapped atomically.

A ``mmsearch index`` run next to the server writes a new generation and then renames a new
manifest into place. ``LiveIndex.current()`` notices the new manifest (its inode changes with the
rename) and opens a Searcher on the new generation, reusing the loaded model; requests already
running keep the Searcher they started with, whose generation stays readable (its faiss index is in
memory and its embeddings memory-mapped), so no query sees a half-written index or fails during one.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from ..search import Searcher
from ..store import MANIFEST, Collection


@dataclass(frozen=True)
class Snapshot:
    """One committed generation and the Searcher over it."""

    searcher: Searcher
    generation: int
    stamp: tuple[int, int]  # (inode, mtime_ns) of the manifest it was opened from
    roots: tuple[str, ...]  # real paths files may be served from (see ``servable``)

    @property
    def collection(self) -> Collection:
        return self.searcher.collection


class LiveIndex:
    def __init__(self, path: str | os.PathLike, encoder=None) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._snapshot = self._open(encoder)

    def _stamp(self) -> tuple[int, int]:
        st = os.stat(self.path / MANIFEST)
        return st.st_ino, st.st_mtime_ns

    def _open(self, encoder) -> Snapshot:
        for _ in range(3):  # a commit between the stat and the open: take the newer one
            stamp = self._stamp()
            searcher = Searcher(self.path, encoder=encoder)
            if self._stamp() == stamp:
                break
        m = searcher.collection.manifest
        roots = tuple(os.path.realpath(r) for r in m.roots) if m.roots else ()
        return Snapshot(searcher, m.generation, stamp, roots)

    def current(self) -> Snapshot:
        """The newest committed generation (one stat of the manifest when nothing changed)."""
        snap = self._snapshot
        try:
            if self._stamp() == snap.stamp:
                return snap
        except OSError:  # the manifest is being replaced right now: keep serving what we have
            return snap
        with self._lock:
            if self._snapshot is snap:
                encoder = snap.searcher._encoder  # the loaded model carries over (None: not loaded yet)
                self._snapshot = self._open(encoder)
            return self._snapshot


def servable(snap: Snapshot, path: str) -> str | None:
    """The real path of an indexed file if it may be served, else None: it must exist and resolve
    (after symlinks) under a folder that was indexed (indexes made before folders were recorded:
    under the folder it sits in, so a symlink pointing elsewhere is still refused)."""
    real = os.path.realpath(path)
    roots = snap.roots or (os.path.realpath(os.path.dirname(path)),)
    if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        return None
    return real if os.path.isfile(real) else None
