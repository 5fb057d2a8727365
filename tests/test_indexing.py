"""Incremental indexing and crash safety of the on-disk index."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mmsearch import store
from mmsearch.errors import IndexLockedError, ModelMismatchError
from mmsearch.config import ModelRef
from mmsearch.indexing import index_folder
from mmsearch.search import Searcher
from mmsearch.store import Collection


class CountingEncoder:
    """Wraps the real encoder and counts the images it embeds."""

    def __init__(self, inner):
        self.inner, self.embedded = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed_pixels(self, pixels):
        self.embedded += len(pixels)
        return self.inner.embed_pixels(pixels)


def test_add_change_delete_reembeds_only_what_changed(photo_dir, pairs, encoder, tmp_path):
    folder, mapping = photo_dir
    idx = tmp_path / "idx"
    enc = CountingEncoder(encoder)
    first = index_folder(folder, idx, encoder=enc)
    assert (first.added, first.total, enc.embedded) == (12, 12, 12)
    before = Collection.open(idx)
    ids_before = dict(zip(before.items.path, before.items.id))
    emb_before = {p: np.array(before.embeddings[i]) for i, p in enumerate(before.items.path)}

    # unchanged folder: nothing embedded, nothing written
    enc.embedded = 0
    again = index_folder(folder, idx, encoder=enc)
    assert (again.added, again.updated, again.removed, again.unchanged, enc.embedded) == (0, 0, 0, 12, 0)
    assert Collection.open(idx).manifest["generation"] == before.manifest["generation"]

    paths = [mapping[p] for p in pairs.images]
    deleted, changed = paths[1], paths[2]
    os.remove(deleted)
    shutil.copyfile(paths[7], changed)  # different content: size changes
    new = folder / "new" / "added.jpg"
    new.parent.mkdir()
    shutil.copyfile(load := pairs.images[0], new)  # a 13th file (same pixels as photo 0)
    enc.embedded = 0
    r = index_folder(folder, idx, encoder=enc)
    assert (r.added, r.updated, r.removed, r.unchanged, r.total) == (1, 1, 1, 10, 12)
    assert enc.embedded == 2

    after = Collection.open(idx)
    assert deleted not in after.items.path and str(new) in after.items.path
    row = {p: i for i, p in enumerate(after.items.path)}
    assert int(after.items.id[row[changed]]) == ids_before[changed]  # same item id after a change
    assert int(after.items.id[row[str(new)]]) not in ids_before.values()  # a fresh id
    for p in paths:
        if p not in (deleted, changed):
            assert np.array_equal(after.embeddings[row[p]], emb_before[p])
    s = Searcher(idx, encoder=encoder)
    top2 = {h.path for h in s.search_image(paths[7], k=2)}
    assert top2 == {paths[7], changed}  # the changed file now holds photo 7's pixels
    assert s.search_image(load, k=2)[0].score > 0.99


def test_other_folders_of_the_same_index_are_kept(photo_dir, pairs, encoder, tmp_path):
    folder, mapping = photo_dir
    idx = tmp_path / "idx"
    index_folder(folder / "trip", idx, encoder=encoder)
    n_trip = Collection.open(idx).count
    index_folder(folder, idx, encoder=encoder)
    assert Collection.open(idx).count == 12
    r = index_folder(folder / "trip", idx, encoder=encoder)
    assert (r.removed, r.unchanged, r.total) == (0, n_trip, 12)


def test_model_mismatch_is_refused_before_loading(built_index, tmp_path):
    idx, _ = built_index
    with pytest.raises(ModelMismatchError, match="mmsearch-lite"):
        index_folder(tmp_path, idx, model=ModelRef("ViT-B-32", "laion2b_s34b_b79k"))


def test_second_writer_is_refused_and_lock_is_not_stale(built_index, tmp_path):
    idx, _ = built_index
    with store.write_lock(idx):
        with pytest.raises(IndexLockedError, match="another mmsearch process"):
            with store.write_lock(idx):
                pass
    with store.write_lock(idx):  # released: usable again
        pass


@pytest.mark.parametrize("fail_at", ["parquet", "faiss", "gen-rename", "manifest"])
def test_a_write_that_dies_midway_leaves_the_previous_index(photo_dir, pairs, encoder, tmp_path, monkeypatch, fail_at):
    folder, mapping = photo_dir
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    manifest = (idx / "manifest.json").read_text()
    shutil.copyfile(pairs.images[3], folder / "extra.jpg")

    class Died(BaseException):
        pass

    def die(*a, **k):
        raise Died()

    import pyarrow.parquet as pq

    from mmsearch import _util, index as vindex

    if fail_at == "parquet":
        monkeypatch.setattr(pq, "write_table", die)
    elif fail_at == "faiss":
        monkeypatch.setattr(vindex.VectorIndex, "save", die)
    elif fail_at == "gen-rename":
        real = os.replace
        monkeypatch.setattr(store.os, "replace", lambda a, b: die() if ".partial" in str(a) else real(a, b))
    else:
        monkeypatch.setattr(store, "atomic_write_bytes", die)
    with pytest.raises(Died):
        index_folder(folder, idx, encoder=encoder)
    monkeypatch.undo()

    assert (idx / "manifest.json").read_text() == manifest
    c = Collection.open(idx)
    assert c.count == 12 and str(folder / "extra.jpg") not in c.items.path
    assert Searcher(c, encoder=encoder).search_text("a dog", k=3)
    r = index_folder(folder, idx, encoder=encoder)  # the next run continues normally
    assert (r.added, r.total) == (1, 13)
    gens = [p.name for p in idx.iterdir() if p.is_dir()]
    assert gens == [json.loads((idx / "manifest.json").read_text())["generation_dir"]]  # leftovers swept


@pytest.mark.slow
def test_kill_9_during_indexing_keeps_a_usable_index(tmp_path, pairs):
    """A real `mmsearch index` process killed with SIGKILL at several moments."""
    from tests.conftest import FLICKR, copy_photos
    from mmsearch.data import load_flickr8k

    folder, idx = tmp_path / "photos", tmp_path / "idx"
    copy_photos(pairs, folder)
    cmd = [sys.executable, "-m", "mmsearch.cli", "index", str(folder), "--index", str(idx), "-q", "--batch-size", "8"]
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    more = load_flickr8k(FLICKR, "dev").subset(120)
    copy_photos(more, folder / "more")
    for delay in (4.0, 7.0, 10.0):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        c = Collection.open(idx)  # always a complete, readable generation
        assert 12 <= c.count <= 132 and len(c.items) == c.embeddings.shape[0] == c.index.ntotal
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert Collection.open(idx).count == 132
