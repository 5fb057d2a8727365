"""What the Ray failure tests share: a folder of real photos, the single-process index of it, a
`--ray` run of it in a background thread, and the embedding actors' processes on this machine."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from conftest import flickr8k


def dev_photos(folder: Path, n: int) -> Path:
    """``folder`` holding links to the first ``n`` Flickr8k dev photos (read in place)."""
    from mmsearch.data import load_flickr8k

    folder.mkdir()
    for src in load_flickr8k(flickr8k(), "dev").subset(n).images:
        (folder / Path(src).name).symlink_to(src)
    return folder


class BackgroundIndex:
    """``index_folder`` in a thread: ``report`` or ``error`` once it ends."""

    def __init__(self, folder: Path, out: Path, encoder, config) -> None:
        from mmsearch.indexing import index_folder

        self.report, self.error = None, None

        def go() -> None:
            try:
                self.report = index_folder(folder, out, encoder=encoder, config=config)
            except Exception as e:  # surfaces in the test's thread
                self.error = e

        self.thread = threading.Thread(target=go)
        self.thread.start()

    def running(self) -> bool:
        return self.thread.is_alive()

    def finish(self) -> None:
        self.thread.join(timeout=300)
        assert self.report is not None, self.error or "the run did not end"


def actor_pids(parent: int | None = None) -> list[int]:
    """Processes Ray titled as embedding actors (``ray::MapWorker(...EmbedWorker...)``), started by
    the process ``parent`` (a node's raylet) when given."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"EmbedWorker" in (proc / "cmdline").read_bytes():
                stat = (proc / "stat").read_text()
                if parent is None or int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    out.append(int(proc.name))
        except OSError:
            continue
    return out


def assert_same_index(single: Path, on_ray: Path, n: int) -> None:
    """The run on Ray made the single-process index: the same rows, and vectors to float tolerance."""
    from mmsearch.store import Collection

    one, many = Collection.open(single), Collection.open(on_ray)
    assert list(many.items.path) == list(one.items.path) and len(one.items.path) == n
    np.testing.assert_allclose(np.asarray(many.embeddings), np.asarray(one.embeddings), atol=2e-3)
