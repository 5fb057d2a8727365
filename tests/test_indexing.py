"""Incremental indexing and crash safety of the on-disk index."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mmsearch import store
from mmsearch.errors import IndexLockedError, ModelMismatchError
from mmsearch.config import ModelRef
from mmsearch.indexing import index_folder
from mmsearch.search import Searcher
from mmsearch.store import Collection
from tests.conftest import CountingEncoder


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
    assert Collection.open(idx).manifest.generation == before.manifest.generation

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
    assert (enc.embedded, r.copied) == (1, 1)  # the changed file; the new one has photo 0's bytes: vector copied

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

    from mmsearch import index as vindex

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
    gens = sorted(p.name for p in idx.iterdir() if p.is_dir())
    now = json.loads((idx / "manifest.json").read_text())
    assert gens == sorted([now["generation_dir"], now["previous"]]) == ["gen-000001", "gen-000002"]  # leftovers swept


@pytest.mark.slow
def test_kill_9_during_indexing_keeps_a_usable_index(tmp_path, pairs):
    """A real `mmsearch index` process killed with SIGKILL while it embeds and commits."""
    from tests.conftest import copy_photos, flickr8k
    from mmsearch.data import load_flickr8k

    folder, idx = tmp_path / "photos", tmp_path / "idx"
    copy_photos(pairs, folder)
    cmd = [sys.executable, "-m", "mmsearch.cli", "index", str(folder), "--index", str(idx), "-q",
           "--batch-size", "4", "--commit-every", "4"]
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    copy_photos(load_flickr8k(flickr8k(), "dev").subset(60), folder / "more")
    counts = [12]
    for _ in range(2):
        generation = Collection.open(idx).manifest.generation
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while Collection.open(idx).manifest.generation < generation + 2 and time.time() < deadline:
            time.sleep(0.05)  # wait until it has committed twice, then kill it mid-stream
        p.send_signal(signal.SIGKILL)
        p.wait()
        c = Collection.open(idx, load_index=True)  # always a complete, readable generation
        assert len(c.items) == c.embeddings.shape[0] == c.index.ntotal
        counts.append(c.count)
    assert counts[0] < counts[1] < counts[2] < 72, counts  # each killed run kept its committed work
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{72 - counts[2]} added" in done.stderr and Collection.open(idx).count == 72
    assert not [p for p in idx.iterdir() if p.name.startswith(".gen-")]  # no partial leftovers


# ---- regressions found in review ---------------------------------------------------------------
class StopAfter(CountingEncoder):
    """Embeds ``n`` batches, then dies like a killed process."""

    def __init__(self, inner, n):
        super().__init__(inner)
        self.left = n

    def embed_pixels(self, pixels):
        if self.left == 0:
            raise KeyboardInterrupt("killed")
        self.left -= 1
        return super().embed_pixels(pixels)


def test_a_run_killed_after_checkpoints_keeps_changed_files_and_their_ids(photo_dir, encoder, tmp_path):
    from dataclasses import replace

    from mmsearch.config import IndexingConfig

    folder, mapping = photo_dir
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    ids = dict(zip(Collection.open(idx).items.path, Collection.open(idx).items.id.tolist()))
    for p in mapping.values():  # every file changes (touch: new mtime)
        os.utime(p, ns=(time.time_ns(), time.time_ns()))
    cfg = replace(IndexingConfig(), batch_size=2, commit_every=2)
    with pytest.raises(KeyboardInterrupt):
        index_folder(folder, idx, encoder=StopAfter(encoder, 3), config=cfg)
    c = Collection.open(idx)
    assert c.count == 12 and dict(zip(c.items.path, c.items.id.tolist())) == ids  # nothing lost
    r = index_folder(folder, idx, encoder=encoder, config=cfg)
    assert (r.added, r.removed, r.total) == (0, 0, 12) and 0 < r.updated < 12  # the rest of the work
    assert dict(zip(Collection.open(idx).items.path, Collection.open(idx).items.id.tolist())) == ids


def test_a_bad_file_does_not_make_every_run_rebuild(photo_dir, encoder, tmp_path):
    folder, _ = photo_dir
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    idx = tmp_path / "idx"
    enc = CountingEncoder(encoder)
    first = index_folder(folder, idx, encoder=enc)
    assert [s.path for s in first.skipped] == [str(folder / "broken.jpg")] and first.total == 12
    gen = Collection.open(idx).manifest.generation
    enc.embedded = 0
    again = index_folder(folder, idx, model=ModelRef())  # no encoder given: it must not need one
    assert (again.added, again.updated, again.removed) == (0, 0, 0)
    assert "not retried" in again.skipped[0].reason and Collection.open(idx).manifest.generation == gen
    shutil.copyfile(next(iter(_photos(folder))), folder / "broken.jpg")  # fixed: retried and added
    assert index_folder(folder, idx, encoder=enc).added == 1


def _photos(folder):
    return sorted(p for p in folder.rglob("*.jpg") if p.name != "broken.jpg")


def test_the_index_type_a_user_chose_is_kept(photo_dir, pairs, encoder, tmp_path):
    from mmsearch.config import IndexSpec

    folder, _ = photo_dir
    idx = tmp_path / "idx"
    assert index_folder(folder, idx, encoder=encoder, spec=IndexSpec(index_type="ivfpq")).index_kind == "ivfpq"
    shutil.copyfile(pairs.images[0], folder / "one-more.jpg")
    assert index_folder(folder, idx, encoder=encoder).index_kind == "ivfpq"  # not silently flat again
    r = index_folder(folder, idx, encoder=encoder, spec=IndexSpec(index_type="flat"))  # nothing changed
    assert r.index_kind == "flat" and Collection.open(idx).manifest.index.kind == "flat"


def test_one_folder_reached_through_a_symlink_is_indexed_once(photo_dir, encoder, tmp_path):
    folder, _ = photo_dir
    os.symlink(folder, tmp_path / "alias")
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    r = index_folder(tmp_path / "alias", idx, encoder=encoder)
    assert (r.added, r.total) == (0, 12)


def test_an_unreadable_folder_is_not_a_deletion():
    from mmsearch.indexing import plan_update
    from mmsearch.media import MediaFile
    from mmsearch.store import Items

    items = Items(np.array([1, 2]), ["/p/a.jpg", "/p/locked/b.jpg"], np.array([10, 20]), np.array([5, 5]),
                  ["image", "image"])
    files = [MediaFile("/p/a.jpg", 10, 5, "image")]
    plan = plan_update(files, items, "/p", unreadable=["/p/locked"])
    assert plan.removed == 0 and plan.keep_rows.tolist() == [0, 1] and not plan.to_embed
    assert plan_update(files, items, "/p").removed == 1  # really gone: removed


def test_a_folder_holding_other_files_is_never_used_as_an_index(photo_dir, tmp_path):
    from mmsearch.errors import IndexFormatError

    folder, _ = photo_dir
    busy = tmp_path / "reports"
    (busy / "gen-reports").mkdir(parents=True)
    (busy / "gen-reports" / "q3.txt").write_text("keep me")
    with pytest.raises(IndexFormatError, match="not an mmsearch index"):
        index_folder(folder, busy, model=ModelRef())
    assert (busy / "gen-reports" / "q3.txt").read_text() == "keep me"


def test_a_searcher_keeps_working_while_the_index_is_rewritten(photo_dir, pairs, encoder, tmp_path):
    folder, mapping = photo_dir
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    s = Searcher(idx, encoder=encoder)
    shutil.copyfile(pairs.images[0], folder / "later.jpg")
    index_folder(folder, idx, encoder=encoder)  # retires the generation the searcher opened
    assert len(s.search_text("a dog", k=20)) == 12  # still its consistent snapshot
    assert len(Searcher(idx, encoder=encoder).search_text("a dog", k=20)) == 13


def test_a_long_thin_image_is_skipped_not_blown_up(photo_dir, encoder, tmp_path):
    from PIL import Image

    folder, _ = photo_dir
    Image.new("RGB", (40000, 2), "white").save(folder / "strip.png")
    r = index_folder(folder, tmp_path / "idx", encoder=encoder)
    assert r.total == 12 and any("strip.png" in s.path and "aspect ratio" in s.reason for s in r.skipped)
