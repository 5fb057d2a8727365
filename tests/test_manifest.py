"""The index manifest as one typed record, the writer's no-change run, and transient read errors."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmsearch.config import IndexSpec
from mmsearch.errors import IndexFormatError
from mmsearch.indexing import index_folder
from mmsearch.manifest import Failure, Manifest, Sampling
from mmsearch.store import Collection, read_manifest
from tests.conftest import CountingEncoder

RELEASE = Path(__file__).parent / "fixtures" / "manifest_v2_release.json"  # written by mmsearch before Manifest


def test_a_manifest_written_by_the_previous_release_reads_and_writes_unchanged():
    data = json.loads(RELEASE.read_text())
    m = Manifest.from_json(data)
    assert m.to_json() == data and list(m.to_json()) == list(data)  # same fields, same order
    assert (m.model.key, m.model.weights, m.model.dim, m.precision) == ("mmsearch-lite2", "4d05c3d7de4a596d", 256, "int8")
    assert m.failed["/tmp/mf/photos/fake.png"] == Failure(13, 1796249131644987262, "not an image (cannot identify format)")
    assert m.video_sampled == {"/tmp/mf/photos/airplane_then_field.mp4": Sampling(1.0, 0.0)}
    assert m.spec == IndexSpec(memory=4 * 2**30) and m.index.kind == "flat" and m.counts_by_kind["video"] == 12


def test_a_format_1_manifest_and_unknown_fields_are_kept():
    data = json.loads(RELEASE.read_text())
    del data["index_spec"], data["model"]["weights"], data["model"]["precision"]
    data.update(format_version=1, index_type="ivfpq", from_a_newer_release={"x": 1})
    m = Manifest.from_json(data)
    assert m.spec.index_type == "ivfpq" and m.model.weights is None and m.precision == "fp32"
    out = m.to_json()
    assert out["from_a_newer_release"] == {"x": 1} and out["index_type"] == "ivfpq" and "index_spec" not in out


@pytest.mark.parametrize("damage", [lambda d: d.pop("model"), lambda d: d.update(failed={"a": {"size": 1}}),
                                    lambda d: d.update(video_sampling="1s")])
def test_a_damaged_manifest_is_one_clear_error(tmp_path, damage):
    data = json.loads(RELEASE.read_text())
    damage(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(IndexFormatError, match=r"manifest.json is damaged .*`mmsearch doctor --index .* --repair`"):
        read_manifest(tmp_path)


def test_a_run_with_nothing_to_do_reads_no_vectors_and_no_faiss_index(photo_dir, encoder, tmp_path, monkeypatch):
    from mmsearch import indexing, store
    from mmsearch.index import VectorIndex

    folder, _ = photo_dir
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    gen = read_manifest(idx).generation

    def refuse(*a, **k):
        raise AssertionError("a run with nothing to do loaded vectors or the faiss index")

    for target, name in ((store, "_read_embeddings"), (indexing, "_read_embeddings"), (VectorIndex, "load")):
        monkeypatch.setattr(target, name, refuse)
    r = index_folder(folder, idx)  # no encoder: it must not need one either
    assert (r.added, r.updated, r.removed, r.unchanged, r.total) == (0, 0, 0, 12, 12)
    assert read_manifest(idx).generation == gen
    monkeypatch.undo()
    shutil.copyfile(next(folder.rglob("*.jpg")), folder / "one-more.jpg")  # real work loads them again
    assert index_folder(folder, idx, encoder=encoder).added == 1


def _fail_reading(monkeypatch, name: str):
    """Reading the file called ``name`` fails with EIO, as on a flaky disk or network mount."""
    import builtins

    from mmsearch import media

    def flaky_open(path, *a, **k):
        if Path(path).name == name:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return builtins.open(path, *a, **k)

    monkeypatch.setattr(media, "open", flaky_open, raising=False)


def test_a_transient_read_error_is_retried_next_run_not_remembered(photo_dir, encoder, tmp_path, monkeypatch):
    folder, _ = photo_dir
    idx = tmp_path / "idx"
    victim = sorted(folder.rglob("*.jpg"))[3]
    _fail_reading(monkeypatch, victim.name)
    r = index_folder(folder, idx, encoder=encoder)
    assert [s.path for s in r.skipped] == [str(victim)] and "input/output error" in r.skipped[0].reason
    assert r.total == 11 and str(victim) not in read_manifest(idx).failed  # not recorded as a broken file
    monkeypatch.undo()
    enc = CountingEncoder(encoder)
    again = index_folder(folder, idx, encoder=enc)
    assert (again.added, again.total, enc.embedded, again.skipped) == (1, 12, 1, [])


def test_a_changed_file_that_cannot_be_read_now_keeps_its_vector(photo_dir, encoder, tmp_path, monkeypatch):
    folder, _ = photo_dir
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    photos = sorted(folder.rglob("*.jpg"))
    victim = photos[2]
    before = Collection.open(idx)
    row = before.items.path.index(str(victim))
    vector, item_id = np.array(before.embeddings[row]), int(before.items.id[row])
    shutil.copyfile(photos[5], victim)  # changed on disk...
    _fail_reading(monkeypatch, victim.name)  # ...but unreadable just now
    r = index_folder(folder, idx, encoder=encoder)
    assert (r.updated, r.removed, r.total) == (0, 0, 12) and [s.path for s in r.skipped] == [str(victim)]
    after = Collection.open(idx)
    row = after.items.path.index(str(victim))
    assert int(after.items.id[row]) == item_id and np.array_equal(after.embeddings[row], vector)
    assert str(victim) not in after.manifest.failed
    monkeypatch.undo()
    r = index_folder(folder, idx, encoder=encoder)
    assert (r.updated, r.total) == (1, 12)  # retried once it reads again


def naive_plan(files, items, belongs, unreadable, failures, resample):
    """The per-row rules of plan_update, written as a plain loop (the reference)."""
    seen = {f.path: f for f in files}
    keep, reuse, unchanged, removed, indexed = [], {}, set(), set(), set()
    rows_of: dict[str, list[int]] = {}
    for row, path in enumerate(items.path):
        rows_of.setdefault(path, []).append(row)
    resampled = set()
    for path, rows in rows_of.items():
        f, kind = seen.get(path), items.kind[rows[0]]
        if f is None:
            if belongs(path, kind) and not any(path == u or path.startswith(u + "/") for u in unreadable):
                removed.add(path)
            else:
                keep += rows
            continue
        same = [int(items.size[r]) == f.size and int(items.mtime_ns[r]) == f.mtime_ns for r in rows]
        if kind == "video":
            if all(same) and not resample(path):
                keep += rows
                indexed.add(path)
                unchanged.add(path)
            else:
                resampled.add(path)
            continue
        keep += rows
        indexed.add(path)
        for r, s in zip(rows, same):
            if s:
                unchanged.add(path)
            else:
                reuse[path] = int(items.id[r])
    to_embed = [f.path for f in files if not (f.path in indexed and f.path not in reuse)
                and not (f.path not in indexed and f.path not in resampled and f.path in failures
                         and failures[f.path].same_file(f.size, f.mtime_ns))]
    return sorted(keep), to_embed, reuse, len(removed), len(unchanged), resampled


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_plan_update_equals_the_per_row_rules(data):
    from mmsearch.indexing import plan_update
    from mmsearch.media import MediaFile
    from mmsearch.store import Items

    names = [f"/src/{k}{i}.{'mp4' if k == 'v' else 'jpg'}" for k in "iv" for i in range(4)] + ["/other/o.jpg"]
    rows = data.draw(st.lists(st.tuples(st.sampled_from(names), st.integers(1, 2), st.integers(0, 3)), max_size=20))
    rows = [(p, s, t) for p, s, t in rows if not p.endswith(".jpg") or sum(q == p for q, _, _ in rows) == 1]
    items = Items(np.arange(len(rows), dtype=np.int64), [p for p, _, _ in rows], np.array([s for _, s, _ in rows]),
                  np.full(len(rows), 7), ["video" if p.endswith(".mp4") else "image" for p, _, _ in rows],
                  t=np.array([t for _, _, t in rows], float))
    on_disk = data.draw(st.lists(st.sampled_from(names), unique=True))
    files = [MediaFile(p, data.draw(st.integers(1, 2)), 7, "video" if p.endswith(".mp4") else "image")
             for p in sorted(on_disk)]
    failures = {p: Failure(1, 7, "bad") for p in data.draw(st.lists(st.sampled_from(names), unique=True))}
    again = set(data.draw(st.lists(st.sampled_from(names), unique=True)))
    unreadable = data.draw(st.sampled_from([[], ["/src"]]))
    got = plan_update(files, items, "/src", unreadable, failures, resample_videos=lambda p: p in again)
    want = naive_plan(files, items, lambda p, k: p.startswith("/src/"), unreadable, failures, lambda p: p in again)
    assert (sorted(got.keep_rows.tolist()), [f.path for f in got.to_embed], got.reuse_ids, got.removed,
            got.unchanged, got.resampled) == want
