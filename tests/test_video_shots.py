"""Video search by shot (issue 17): frames know their shot, a hit is a moment within one shot, one
hit per shot, at most --per-video spans of a video; indexes from before shots get them without
embedding again. On the shared clips."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.indexing import index_folder
from mmsearch.search import Searcher
from mmsearch.store import Collection, read_manifest
from tests.conftest import VIDEOS, CountingEncoder

runner = CliRunner()
CUT = (3.4, 3.5)  # airplane_then_field.mp4: the last airplane frame and the first field frame (tests/test_video.py)
PLANE = "an airplane flying in a grey sky"
FIELD = "people sitting on a grassy field with a tree"


@pytest.fixture(scope="module")
def shot_index(tmp_path_factory, encoder):
    base = tmp_path_factory.mktemp("shots")
    folder = base / "media"
    folder.mkdir()
    for name in ("airplane_then_field.mp4", "vtest.avi", "chaplin.mp4"):
        shutil.copy2(VIDEOS / name, folder / name)
    index_folder(folder, base / "index", encoder=encoder)
    return folder, base / "index"


def _rows(c: Collection, path: str) -> list[int]:
    return [r for r, p in enumerate(c.items.path) if p == path]


def test_frames_know_their_shot_and_the_cut_is_stored(shot_index):
    folder, idx = shot_index
    c = Collection.open(idx)
    rows = _rows(c, str(folder / "airplane_then_field.mp4"))
    shots = sorted({(int(c.items.shot[r]), float(c.items.shot_start[r]), float(c.items.shot_end[r])) for r in rows})
    # the airliner, the field, then (from 11 s) the fade to black that ends the clip
    assert [s[0] for s in shots[:2]] == [0, 1] and shots[0][1] == 0.0 and shots[1][2] >= 10.0, shots
    assert CUT[0] - 1.0 <= shots[0][2] == shots[1][1] <= CUT[1] + 1.0, shots  # within one sampling interval
    first_field = min(float(c.items.t[r]) for r in rows if c.items.shot[r] == 1)
    assert abs(first_field - shots[1][1]) < 0.1  # a shot's first frame is always sampled
    assert read_manifest(idx).video_modes[str(folder / "airplane_then_field.mp4")] in ("seek", "decode")


def test_the_airplane_query_is_one_span_from_0_to_the_cut_and_the_field_starts_there(shot_index, encoder):
    folder, idx = shot_index
    path = str(folder / "airplane_then_field.mp4")
    s = Searcher(idx, encoder=encoder)
    hits = s.search_text(PLANE, k=10)
    videos = [(h.path, h.shot) for h in hits if h.kind == "video"]
    assert len(videos) == len(set(videos))  # two spans of one shot are never returned separately
    plane = [h for h in hits if h.path == path]
    assert plane[0].shot == 0 and plane[0].start == 0.0 and 3.0 <= plane[0].end <= 4.0, plane
    field = next(h for h in s.search_text(FIELD, k=10) if h.path == path)
    assert field.shot == 1 and 3.0 <= field.start <= 4.0, field


def test_one_long_video_cannot_fill_the_page(shot_index):
    folder, idx = shot_index
    for per_video, most in ((None, 3), ("1", 1)):
        args = ["query", "people walking on a path", "-k", "20", "--json", "--index", str(idx)]
        r = runner.invoke(app, args + (["--per-video", per_video] if per_video else []))
        assert r.exit_code == 0, r.output
        hits = json.loads(r.stdout)
        assert hits[0]["path"] == str(folder / "vtest.avi")
        assert 1 <= sum(h["path"] == str(folder / "vtest.avi") for h in hits) <= most


def test_an_index_from_before_shots_gets_them_without_embedding_again(tmp_path, encoder):
    folder = tmp_path / "media"
    folder.mkdir()
    shutil.copy2(VIDEOS / "airplane_then_field.mp4", folder / "airplane_then_field.mp4")
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    items = idx / read_manifest(idx).generation_dir / "items.parquet"
    table = pq.read_table(items)
    pq.write_table(table.drop_columns(["shot", "shot_start", "shot_end"]), items)  # as an older mmsearch wrote it
    assert (Collection.open(idx).items.shot == -1).all()
    counting = CountingEncoder(encoder)
    r = index_folder(folder, idx, encoder=counting)
    assert counting.embedded == 0 and r.embedded == 0
    fresh = Collection.open(idx)
    shots = sorted({(int(s), float(a), float(b)) for s, a, b in zip(fresh.items.shot, fresh.items.shot_start,
                                                                      fresh.items.shot_end)})
    assert shots[0][:2] == (0, 0.0) and 3.0 <= shots[0][2] == shots[1][1] <= 4.5, shots
    assert index_folder(folder, idx, encoder=counting).changed is False  # and then nothing more to do


def test_per_video_in_the_library_and_the_service(shot_index, encoder, tmp_path):
    from fastapi.testclient import TestClient

    from mmsearch.errors import BadQueryError
    from mmsearch.serve.app import create_app

    folder, idx = shot_index
    path = str(folder / "airplane_then_field.mp4")
    s = Searcher(idx, encoder=encoder)
    shots = sum(h.path == path for h in s.search_text(PLANE, k=10))
    assert 2 <= shots <= 3  # one hit for each of its shots, at most the default 3
    assert sum(h.path == path for h in s._search(encoder.embed_texts([PLANE]), 10, None, "text", per_video=1)[0]) == 1
    with pytest.raises(BadQueryError, match="per_video"):
        Searcher(idx, encoder=encoder, per_video=0)
    with TestClient(create_app(idx, cache_dir=tmp_path / "cache")) as c:
        for extra, most in (({}, shots), ({"per_video": 1}, 1), ({"per_video": 2}, 2)):
            got = c.get("/api/search", params={"q": PLANE, "k": 10} | extra).json()["items"]
            assert sum(i["path"] == path for i in got) == most, got
            posted = c.post("/api/search", json={"q": PLANE, "k": 10} | extra).json()["items"]
            assert [i["id"] for i in posted] == [i["id"] for i in got]
        for bad in (0, "two", 1.5, True):
            r = c.post("/api/search", json={"q": PLANE, "per_video": bad})
            assert r.status_code == 400 and "per_video" in r.json()["error"], r.text
        assert c.get("/api/search", params={"q": PLANE, "per_video": 0}).status_code == 400
