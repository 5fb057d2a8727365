"""What a hostile disk or user does to an index (issue 16, the parts done so far): folders mmsearch
did not make are never deleted, leftovers of killed runs are swept, damaged manifests and absurd
arguments are one line, names cannot break the output, files keep the user's umask, and a bad
--texts file fails before anything is committed."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from mmsearch.cli import app, printable
from mmsearch.config import ModelRef
from mmsearch.errors import BadArgumentError, IndexFormatError
from mmsearch.indexing import index_folder
from mmsearch.store import Collection, read_manifest
from tests.conftest import FLICKR

runner = CliRunner()


@pytest.mark.parametrize("name", ["gen-000007", ".gen-000001.partial"])
def test_a_users_folder_named_like_a_generation_is_refused_not_deleted(photo_dir, tmp_path, name):
    folder, _ = photo_dir
    mine = tmp_path / "idx" / name
    mine.mkdir(parents=True)
    (mine / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(IndexFormatError, match=f"not an mmsearch index and is not empty .*{name}"):
        index_folder(folder, tmp_path / "idx", model=ModelRef())
    assert (mine / "holiday.jpg").read_bytes() == b"precious"


def test_a_killed_runs_generation_is_swept_but_a_users_folder_in_an_index_is_kept(photo_dir, encoder, tmp_path):
    folder, _ = photo_dir
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    gen = read_manifest(idx).generation_dir
    shutil.copytree(idx / gen, idx / "gen-000090")  # as a run killed after writing its generation left it
    mine = idx / "gen-000091"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    r = index_folder(folder, idx, encoder=encoder)  # nothing changed: no commit, but a sweep
    assert r.changed is False and not (idx / "gen-000090").exists()
    assert (mine / "notes.txt").read_text() == "mine" and (idx / gen).is_dir()


def test_written_files_follow_the_umask(photo_dir, encoder, tmp_path):
    folder, _ = photo_dir
    old = os.umask(0o022)
    try:
        index_folder(folder, tmp_path / "idx", encoder=encoder)
    finally:
        os.umask(old)
    m = read_manifest(tmp_path / "idx")
    for path in (tmp_path / "idx" / "manifest.json", tmp_path / "idx" / m.generation_dir / "index.faiss",
                 tmp_path / "idx" / m.generation_dir / "items.parquet"):
        assert path.stat().st_mode & 0o777 == 0o644, path


@pytest.mark.parametrize("content", ["[]", "null", "42", '{"format": "mmsearch-index", "format_version": 2}',
                                     '{"format": "mmsearch-index", "format_version": 2, "model": "x"}'])
def test_a_damaged_manifest_that_is_still_json_is_one_error_line(built_index, tmp_path, content):
    idx = tmp_path / "idx"
    shutil.copytree(built_index[0], idx)
    (idx / "manifest.json").write_text(content)
    for args in (["info"], ["query", "a dog"]):
        r = runner.invoke(app, [*args, "--index", str(idx)])
        assert r.exit_code == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.output


@pytest.mark.parametrize("at", ["inf", "1e300", "nan"])
def test_frame_at_an_absurd_time_is_one_error_line(tmp_path, at):
    r = runner.invoke(app, ["frame", str(FLICKR.parent / "videos" / "airplane_then_field.mp4"), "--at", at,
                            "-o", str(tmp_path / "f.jpg")])
    assert r.exit_code in (1, 2) and "Traceback" not in r.output and r.stderr.strip(), r.output
    assert not (tmp_path / "f.jpg").exists()


def test_frame_at_refuses_times_no_video_has():
    from mmsearch.video import frame_at

    for seconds in (float("inf"), float("nan"), 1e300, -1.0):
        with pytest.raises(BadArgumentError, match="time must be between"):
            frame_at(str(FLICKR.parent / "videos" / "airplane_then_field.mp4"), seconds)


def test_names_with_control_characters_cannot_break_the_output(photo_dir, encoder, tmp_path):
    folder, _ = photo_dir
    odd = folder / "tab\there\nnew\x1b[31mred.jpg"
    shutil.copyfile(next(folder.rglob("*.jpg")), odd)
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    r = runner.invoke(app, ["query", "a dog", "--index", str(idx), "-k", "20"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 13 and all(line.count("\t") == 1 for line in lines) and "\x1b" not in r.stdout
    assert any(line.endswith("tab\\there\\nnew\\x1b[31mred.jpg") for line in lines)
    as_json = runner.invoke(app, ["query", "a dog", "--index", str(idx), "-k", "20", "--json"])
    assert str(odd) in [h["path"] for h in json.loads(as_json.stdout)]  # JSON keeps the name exactly
    assert printable("plain name.jpg") == "plain name.jpg"


def test_a_bad_texts_file_fails_before_the_photos_are_committed(photo_dir, tmp_path, model_cache):
    folder, _ = photo_dir
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\x00\x01binary")
    idx = tmp_path / "idx"
    r = runner.invoke(app, ["index", str(folder), "--texts", str(bad), "--index", str(idx), "-q"])
    assert r.exit_code == 1 and "not a text file" in r.stderr
    assert not Collection.exists(idx)  # nothing committed


def test_remove_drops_a_deleted_folders_items_without_embedding(photo_dir, encoder, tmp_path):
    from tests.conftest import CountingEncoder

    folder, _ = photo_dir
    trip = folder / "holiday-2019"
    trip.mkdir()
    for src in sorted(folder.rglob("*.jpg"))[:3]:
        shutil.copyfile(src, trip / src.name)
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    before = Collection.open(idx)
    kept = {p: v.copy() for p, v in zip(before.items.path, before.embeddings) if not p.startswith(str(trip))}
    shutil.rmtree(trip)
    r = runner.invoke(app, ["index", str(trip), "--index", str(idx)])
    assert r.exit_code == 1 and f"mmsearch remove {trip}" in r.stderr  # the error says what to do
    r = runner.invoke(app, ["remove", str(trip), "--index", str(idx)])
    assert r.exit_code == 0 and "3 files removed" in r.stderr, r.output
    after = Collection.open(idx)
    assert sorted(after.items.path) == sorted(kept) and after.count == before.count - 3
    assert all((after.embeddings[after.items.path.index(p)] == v).all() for p, v in kept.items())
    enc = CountingEncoder(encoder)
    assert index_folder(folder, idx, encoder=enc).changed is False and enc.embedded == 0
    r = runner.invoke(app, ["remove", str(trip), "--index", str(idx)])
    assert r.exit_code == 1 and "holds no items at or under" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_file_name_that_is_not_utf8_is_indexed_and_round_trips(photo_dir, encoder, tmp_path):
    from fastapi.testclient import TestClient

    from mmsearch.serve.app import create_app
    from tests.conftest import CountingEncoder

    folder, _ = photo_dir
    raw = os.fsencode(str(folder)) + b"/caf\xe9 \xff.jpg"  # Latin-1 bytes: not UTF-8
    shutil.copyfile(next(folder.rglob("*.jpg")), os.fsdecode(raw))
    idx = tmp_path / "idx"
    assert index_folder(folder, idx, encoder=encoder).added == 13
    enc = CountingEncoder(encoder)
    assert index_folder(folder, idx, encoder=enc).changed is False and enc.embedded == 0  # same path next run
    assert os.fsdecode(raw) in Collection.open(idx).items.path
    hits = json.loads(runner.invoke(app, ["query", "a dog", "--index", str(idx), "-k", "20", "--json"]).stdout)
    assert raw in [os.fsencode(h["path"]) for h in hits]  # the exact bytes, through --json
    plain = runner.invoke(app, ["query", "a dog", "--index", str(idx), "-k", "20"])
    assert plain.exit_code == 0 and "caf\\udce9 \\udcff.jpg" in plain.stdout
    with TestClient(create_app(idx, cache_dir=tmp_path / "cache")) as c:
        items = c.get("/api/search", params={"q": "a dog", "k": 20, "kind": "image"}).json()["items"]
        hit = next(i for i in items if os.fsencode(i["path"]) == raw)
        assert c.get(hit["thumb"]).status_code == 200


def test_a_renamed_folder_keeps_its_items_and_vectors_without_embedding(photo_dir, encoder, tmp_path):
    from tests.conftest import CountingEncoder

    folder, _ = photo_dir
    album = folder / "album"
    album.mkdir()
    for src in sorted(folder.rglob("*.jpg"))[:4]:
        shutil.move(src, album / src.name)
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    before = Collection.open(idx)
    vectors = {p.replace("/album/", "/album 2024/"): (i, v.copy()) for p, i, v in
               zip(before.items.path, before.items.id.tolist(), before.embeddings)}
    os.rename(album, folder / "album 2024")
    enc = CountingEncoder(encoder)
    r = index_folder(folder, idx, encoder=enc)
    assert (r.moved, r.added, r.removed, r.embedded, enc.embedded) == (4, 0, 0, 0, 0)
    after = Collection.open(idx)
    assert sorted(after.items.path) == sorted(vectors)
    for p, i, v in zip(after.items.path, after.items.id.tolist(), after.embeddings):
        assert vectors[p][0] == i and (vectors[p][1] == v).all()  # same id, same vector, new path
    hits = runner.invoke(app, ["query", "a dog", "--index", str(idx), "-k", "20"]).stdout
    assert "album 2024" in hits and "/album/" not in hits


def test_indexing_a_folder_under_its_new_name_moves_its_items(photo_dir, encoder, tmp_path):
    from tests.conftest import CountingEncoder

    folder, _ = photo_dir
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    count = Collection.open(idx).count
    renamed = folder.with_name("photos-renamed")
    os.rename(folder, renamed)
    enc = CountingEncoder(encoder)
    r = index_folder(renamed, idx, encoder=enc)
    assert (r.moved, r.added, enc.embedded) == (count, 0, 0) and r.total == count
    assert all(p.startswith(str(renamed) + os.sep) for p in Collection.open(idx).items.path)


def _link_photos(folder, other, how: str) -> None:
    """``other`` reaches the photos of ``folder`` by ``how``: a symlinked folder, symlinks or hard links."""
    other.mkdir()
    if how == "symlinked folder":
        (other / "linked").symlink_to(folder, target_is_directory=True)
    for src in sorted(folder.rglob("*.jpg")) if how != "symlinked folder" else []:
        if how == "symlinks":
            (other / src.name).symlink_to(src)
        else:
            os.link(src, other / src.name)


@pytest.mark.parametrize("how", ["symlinked folder", "symlinks", "hard links"])
def test_a_folder_reaching_indexed_photos_again_does_not_store_them_twice(photo_dir, encoder, tmp_path, how):
    from tests.conftest import CountingEncoder

    folder, _ = photo_dir
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    before = Collection.open(idx)
    count, paths = before.count, sorted(before.items.path)
    other = tmp_path / "other"
    _link_photos(folder, other, how)
    r = runner.invoke(app, ["index", str(other), "--index", str(idx), "-q"])
    assert r.exit_code == 0, r.output
    assert f"0 added, 0 updated, 0 removed, {count} already indexed under another path" in r.stderr, r.stderr
    enc = CountingEncoder(encoder)
    again = index_folder(other, idx, encoder=enc)  # and on every run after
    assert (again.duplicates, again.added, again.changed, enc.embedded) == (count, 0, False, 0)
    after = Collection.open(idx)
    assert after.count == count and sorted(after.items.path) == paths
    hits = json.loads(runner.invoke(app, ["query", "a dog", "--index", str(idx), "-k", "50", "--json"]).stdout)
    assert sorted(h["path"] for h in hits) == paths  # each photo once, under its first path


def test_a_copied_photo_takes_the_originals_vector_and_an_edited_copy_is_embedded(photo_dir, encoder, tmp_path):
    from tests.conftest import CountingEncoder

    folder, _ = photo_dir
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    before = Collection.open(idx)
    src = min(folder.rglob("*.jpg"))
    original = before.embeddings[before.items.path.index(str(src))].copy()
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copy(src, backup / "copy.jpg")
    enc = CountingEncoder(encoder)
    r = index_folder(backup, idx, encoder=enc)
    assert (r.added, r.copied, r.embedded, r.duplicates, enc.embedded) == (1, 1, 0, 0, 0)
    after = Collection.open(idx)
    row = after.items.path.index(str(backup / "copy.jpg"))
    assert after.count == before.count + 1 and int(after.items.id[row]) not in set(before.items.id.tolist())
    assert (after.embeddings[row] == original).all() and str(src) in after.items.path  # both stay, one vector
    data = bytearray(src.read_bytes())  # same size, one byte of the compressed pixels changed
    middle = len(data) // 2
    while 0xFF in (data[middle - 1], data[middle]):
        middle += 1
    data[middle] ^= 0x55
    (backup / "edited.jpg").write_bytes(bytes(data))
    r = index_folder(backup, idx, encoder=enc)
    assert (r.added, r.copied, r.embedded, enc.embedded) == (1, 0, 1, 1)


def test_a_file_that_matches_a_copy_only_where_the_digest_samples_is_embedded(photo_dir, encoder, tmp_path):
    """The fast digest reads the first, middle and last 64 KB; a copy is confirmed byte for byte before it
    takes another file's vector. Two 400 KB files (a photo padded after its end marker, which decoders
    ignore) that differ at 100 KB only: the second is embedded, not copied."""
    from tests.conftest import CountingEncoder

    folder, _ = photo_dir
    padded = tmp_path / "padded"
    padded.mkdir()
    data = bytearray(min(folder.rglob("*.jpg")).read_bytes())
    data += bytes(400_000 - len(data))
    (padded / "a.jpg").write_bytes(bytes(data))
    idx = tmp_path / "idx"
    index_folder(padded, idx, encoder=encoder)
    data[100_000] ^= 0x55  # outside the three sampled 64 KB blocks
    later = tmp_path / "later"
    later.mkdir()
    (later / "b.jpg").write_bytes(bytes(data))
    enc = CountingEncoder(encoder)
    r = index_folder(later, idx, encoder=enc)
    assert (r.added, r.copied, r.embedded, enc.embedded) == (1, 0, 1, 1)


def test_a_moved_photo_stays_a_move_when_a_copy_of_it_appears_too(photo_dir, encoder, tmp_path):
    folder, _ = photo_dir
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    before = Collection.open(idx)
    src = min(folder.rglob("*.jpg"))
    row = before.items.path.index(str(src))
    item_id, vector = int(before.items.id[row]), before.embeddings[row].copy()
    (folder / "moved").mkdir()
    shutil.copy(src, folder / "a copy.jpg")
    shutil.move(src, folder / "moved" / src.name)
    r = runner.invoke(app, ["index", str(folder), "--index", str(idx), "-q"])
    assert r.exit_code == 0, r.output
    assert "1 added, 0 updated, 0 removed, 1 moved (kept their vectors), 1 copied" in r.stderr, r.stderr
    after = Collection.open(idx)
    rows = [after.items.path.index(str(p)) for p in (folder / "a copy.jpg", folder / "moved" / src.name)]
    assert after.count == before.count + 1 and item_id in after.items.id[rows].tolist()  # one of them kept the item
    assert all((after.embeddings[r] == vector).all() for r in rows)


def test_identical_new_files_in_one_run_are_embedded_once(photo_dir, encoder, tmp_path):
    from tests.conftest import CountingEncoder

    folder, _ = photo_dir
    photos = sorted(folder.rglob("*.jpg"))
    for i in range(2):  # two more copies of the first photo, in another folder too
        (folder / f"copies{i}").mkdir()
        shutil.copy(photos[0], folder / f"copies{i}" / "same.jpg")
    enc = CountingEncoder(encoder)
    idx = tmp_path / "idx"
    r = index_folder(folder, idx, encoder=enc)
    assert (r.added, r.copied, r.embedded, enc.embedded) == (len(photos) + 2, 2, len(photos), len(photos))
    c = Collection.open(idx)
    vectors = [c.embeddings[c.items.path.index(str(p))] for p in
               (photos[0], folder / "copies0" / "same.jpg", folder / "copies1" / "same.jpg")]
    assert (vectors[0] == vectors[1]).all() and (vectors[0] == vectors[2]).all()
    assert len(set(c.items.id.tolist())) == c.count == len(photos) + 2


def test_a_copied_video_takes_all_its_frames_without_embedding(encoder, tmp_path):
    from tests.conftest import CountingEncoder

    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(FLICKR.parent / "videos" / "airplane_then_field.mp4", videos / "flight.mp4")
    idx = tmp_path / "idx"
    index_folder(videos, idx, encoder=encoder)
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copy(videos / "flight.mp4", backup / "flight copy.mp4")
    enc = CountingEncoder(encoder)
    r = index_folder(backup, idx, encoder=enc)
    assert (r.added, r.copied, r.embedded, enc.embedded) == (1, 1, 0, 0)
    c = Collection.open(idx)

    def frames(path):
        rows = [i for i, p in enumerate(c.items.path) if p == str(path)]
        return c.items.t[rows], c.embeddings[rows]

    (t0, v0), (t1, v1) = frames(videos / "flight.mp4"), frames(backup / "flight copy.mp4")
    assert len(t0) > 3 and (t0 == t1).all() and (v0 == v1).all()


@pytest.mark.parametrize("err", [28, 5])  # ENOSPC, EIO
@pytest.mark.parametrize("stage", ["embeddings", "manifest"])
def test_a_full_disk_or_io_error_during_a_commit_keeps_the_previous_index(photo_dir, encoder, tmp_path, monkeypatch,
                                                                          err, stage):
    import numpy as np

    from mmsearch import store

    folder, _ = photo_dir
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    manifest = (idx / "manifest.json").read_bytes()
    shutil.copyfile(next(folder.rglob("*.jpg")), folder / "one-more.jpg")

    def fail(*a, **k):
        raise OSError(err, os.strerror(err))

    if stage == "embeddings":
        monkeypatch.setattr(np, "save", fail)
    else:
        real = store.atomic_write_bytes
        monkeypatch.setattr(store, "atomic_write_bytes", lambda p, d: fail() if p.name == "manifest.json" else real(p, d))
    with pytest.raises(OSError):
        index_folder(folder, idx, encoder=encoder)
    monkeypatch.undo()
    assert (idx / "manifest.json").read_bytes() == manifest  # the previous generation, intact
    assert not [p.name for p in idx.iterdir() if p.name.endswith(".partial")]  # no partial folder left
    assert Collection.open(idx).count == 12
    r = runner.invoke(app, ["query", "a dog", "--index", str(idx)])
    assert r.exit_code == 0 and r.stdout
    assert index_folder(folder, idx, encoder=encoder).added == 1  # and the next run carries on
