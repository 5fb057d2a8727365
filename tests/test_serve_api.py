"""`mmsearch serve`'s API in-process (FastAPI's TestClient): every endpoint, every 4xx, the token, the
file guard, and a re-index while queries run."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mmsearch.indexing import index_folder, index_texts
from mmsearch.serve.api import Limits
from mmsearch.serve.app import create_app
from mmsearch.store import Collection
from tests.conftest import FLICKR, copy_photos


@pytest.fixture(scope="module")
def library(tmp_path_factory, pairs, encoder):
    """An index of 12 photos, a playable mp4, an AVI browsers cannot play, and the photos' captions."""
    base = tmp_path_factory.mktemp("serve")
    mapping = copy_photos(pairs, base / "library")
    for name in ("airplane_then_field.mp4", "vtest.avi"):
        shutil.copyfile(FLICKR.parent / "videos" / name, base / "library" / name)
    index_folder(base / "library", base / "index", encoder=encoder)
    captions = base / "captions.txt"
    captions.write_text("\n".join(caps[0] for caps in pairs.captions) + "\n")
    index_texts(captions, base / "index", encoder=encoder)
    return base, mapping


@pytest.fixture(scope="module")
def client(library, model_cache):
    base, _ = library
    with TestClient(create_app(base / "index", cache_dir=base / "cache")) as c:
        yield c


def _id_of(library, path) -> int:
    c = Collection.open(library[0] / "index")
    return int(c.items.id[c.items.path.index(str(path))])


def test_a_text_query_finds_its_photo_with_thumb_and_media(client, library, pairs):
    base, mapping = library
    target = mapping[pairs.images[3]]
    r = client.get("/api/search", params={"q": pairs.captions[3][0], "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["score_kind"] == "cosine minus hubness correction" and body["took_ms"] > 0
    assert target in [it["path"] for it in body["items"][:3]]
    hit = next(it for it in body["items"] if it["path"] == target)
    assert hit["kind"] == "image" and hit["thumb"] == f"/thumb/{hit['id']}?size=256" and hit["media"] == f"/media/{hit['id']}"
    assert [it["rank"] for it in body["items"]] == list(range(1, 6)) and hit["name"] == os.path.basename(target)
    assert r.json()["items"] == client.post("/api/search", json={"q": pairs.captions[3][0], "k": 5}).json()["items"]


def test_pages_are_stable_and_end(client):
    q = {"q": "a dog", "kind": "all"}
    six = client.get("/api/search", params={**q, "k": 6}).json()
    first, second = (client.get("/api/search", params={**q, "k": 3, "page": p}).json() for p in (0, 1))
    assert [i["id"] for i in first["items"] + second["items"]] == [i["id"] for i in six["items"]]
    assert first["next_page"] == 1 and [i["rank"] for i in second["items"]] == [4, 5, 6]
    last = client.get("/api/search", params={**q, "k": 200}).json()
    assert last["next_page"] is None and len({i["id"] for i in last["items"]}) == len(last["items"])
    assert {i["kind"] for i in client.get("/api/search", params={"q": "a dog", "kind": "text"}).json()["items"]} == {"text"}


def test_an_image_query_and_similar_find_the_same_photo_first(client, library, pairs):
    _, mapping = library
    target = mapping[pairs.images[5]]
    with open(target, "rb") as f:
        r = client.post("/api/search", files={"image": ("q.jpg", f, "image/jpeg")}, data={"kind": "image", "k": "4"})
    assert r.status_code == 200, r.text
    first = r.json()["items"][0]
    assert first["path"] == target and first["score"] > 0.99
    sim = client.get(f"/api/items/{first['id']}/similar", params={"k": 4}).json()
    assert sim["items"][0]["id"] == first["id"] and sim["score_kind"] == "cosine"
    assert {i["kind"] for i in sim["items"]} <= {"image", "video"}
    assert client.get(f"/api/items/{first['id']}").json()["path"] == target


def test_video_hits_carry_their_span_and_a_playable_media_url(client):
    body = client.get("/api/search", params={"q": "an airplane flying in the sky", "kind": "video", "k": 10}).json()
    by_name = {}
    for it in body["items"]:
        by_name.setdefault(it["name"], it)
    mp4, avi = by_name["airplane_then_field.mp4"], by_name["vtest.avi"]
    assert mp4["start"] is not None and mp4["media"] == f"/media/{mp4['id']}#t={mp4['start']:g},{max(mp4['end'], mp4['start'] + 1):g}"
    assert avi["media"].startswith(f"/media/{avi['id']}?start=") and "#t=0," in avi["media"]
    clip = client.get(avi["media"].split("#")[0])
    assert clip.status_code == 200 and clip.headers["content-type"] in ("video/mp4", "video/webm") and len(clip.content) > 1000
    thumb = client.get(mp4["thumb"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


def test_thumbnails_are_cached_jpegs_with_an_etag(client, library, pairs):
    item = _id_of(library, library[1][pairs.images[0]])
    r = client.get(f"/thumb/{item}", params={"size": 128})
    assert r.status_code == 200 and r.headers["cache-control"] == "public, max-age=31536000, immutable"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "JPEG" and max(im.size) <= 128
    again = client.get(f"/thumb/{item}", params={"size": 128}, headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and not again.content


def test_media_serves_byte_ranges_of_the_original(client, library, pairs):
    path = library[1][pairs.images[1]]
    r = client.get(f"/media/{_id_of(library, path)}", headers={"Range": "bytes=10-109"})
    assert r.status_code == 206 and r.content == open(path, "rb").read()[10:110]


@pytest.mark.parametrize("url,status", [
    ("/api/items/999999", 404), ("/api/items/abc", 404), ("/thumb/999999", 404), ("/thumb/-1", 404),
    ("/media/..%2f..%2fetc%2fpasswd", 404), ("/media/%2e%2e/%2e%2e/etc/passwd", 404), ("/media//etc/passwd", 404),
    ("/media/%2fetc%2fpasswd", 404), ("/thumb/%2e%2e", 404), ("/static/../app.py", 404), ("/static/%2e%2e/app.py", 404),
    ("/static/..%2f..%2fapp.py", 404), ("/media/1%00", 404), ("/api/search?q=dog&k=abc", 422), ("/api/search?q=", 400),
    ("/api/search?q=dog&k=0", 400), ("/api/search?q=dog&kind=faces", 400), ("/nope", 404),
])
def test_bad_requests_are_json_errors_never_a_file_or_a_500(client, url, status):
    r = client.get(url)
    assert r.status_code == status and set(r.json()) == {"error"}, (url, r.status_code, r.text)
    assert "Traceback" not in r.text and "root:" not in r.text


def test_text_items_have_no_file_to_serve(client):
    text = client.get("/api/search", params={"q": "a dog", "kind": "text", "k": 1}).json()["items"][0]
    assert text["thumb"] is None and text["media"] is None and text["text"]
    assert client.get(f"/thumb/{text['id']}").status_code == 404


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("data,status,words", [
    (b"", 400, "empty"), (b"GIF89a but not really", 400, "not an image"), (b"plain text, no image", 400, "not an image"),
    (_png(224, 224)[:200], 400, "truncated or corrupt"), (_png(400, 400), 413, "MP"), (b"x" * 3000, 413, "upload limit"),
])
def test_bad_uploads_are_4xx_json(library, data, status, words):
    base, _ = library
    app = create_app(base / "index", cache_dir=base / "cache", limits=Limits(upload_bytes=2500, upload_pixels=100_000))
    with TestClient(app) as c:
        r = c.post("/api/search", files={"image": ("x.png", data, "image/png")})
    assert r.status_code == status and words in r.json()["error"], r.text


def test_a_huge_upload_is_refused_by_its_declared_length(library):
    base, _ = library
    with TestClient(create_app(base / "index", cache_dir=base / "cache", limits=Limits(upload_bytes=2**20))) as c:
        r = c.post("/api/search", files={"image": ("big.png", b"\0" * (2 * 2**20), "image/png")})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]


def test_a_file_outside_the_indexed_folders_is_never_served(library, tmp_path):
    from mmsearch.serve.live import LiveIndex, servable

    base, mapping = library
    snap = LiveIndex(base / "index").current()
    inside = next(iter(mapping.values()))
    assert servable(snap, inside) == os.path.realpath(inside)
    outside = tmp_path / "secret.jpg"
    shutil.copyfile(inside, outside)
    link = base / "library" / "link-out.jpg"
    link.symlink_to(outside)
    try:
        assert servable(snap, str(link)) is None and servable(snap, "/etc/passwd") is None
    finally:
        link.unlink()


def test_a_token_is_required_on_every_request(library):
    base, _ = library
    with TestClient(create_app(base / "index", token="s3cret", cache_dir=base / "cache")) as c:
        for url in ("/api/search?q=dog", "/healthz", "/api/info", "/thumb/0", "/media/0", "/metrics"):
            r = c.get(url)
            assert r.status_code == 401 and "token" in r.json()["error"]
        assert c.get("/").status_code == 200  # the page itself holds nothing of the index: it asks for the token
        assert c.get("/healthz", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/healthz", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        c.cookies.set("mmsearch_token", "s3cret")
        assert c.get("/api/search", params={"q": "dog"}).status_code == 200


def test_info_health_metrics_and_the_page(client, library):
    base, _ = library
    info = client.get("/api/info").json()
    assert info["count"] == Collection.open(base / "index").count and info["model"] == "mmsearch-lite2"
    assert client.get("/healthz").json()["ok"] is True
    client.get("/api/search", params={"q": "a dog"})
    text = client.get("/metrics").text
    assert 'mmsearch_requests_total{route="/api/search",status="200"}' in text
    assert 'mmsearch_stage_seconds_count{stage="encode"}' in text and 'stage="search"' in text
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_queries_during_a_reindex_never_fail_or_mix(library, pairs, encoder, tmp_path):
    base, _ = library
    folder, idx = tmp_path / "lib", tmp_path / "idx"
    copy_photos(pairs.subset(4), folder)
    index_folder(folder, idx, encoder=encoder)
    generations = [set(Collection.open(idx).items.id.tolist())]
    errors, seen, stop = [], [], threading.Event()
    with TestClient(create_app(idx, cache_dir=tmp_path / "cache")) as c:
        def hammer():
            while not stop.is_set():
                r = c.get("/api/search", params={"q": "a dog", "kind": "all", "k": 50})
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    seen.append({i["id"] for i in r.json()["items"]})
        t = threading.Thread(target=hammer)
        t.start()
        try:
            for i, src in enumerate(pairs.images[4:8]):
                shutil.copyfile(src, folder / f"new{i}.jpg")
                index_folder(folder, idx, encoder=encoder)
                generations.append(set(Collection.open(idx).items.id.tolist()))
        finally:
            stop.set()
            t.join()
        assert not errors and seen
        assert all(any(ids == g for g in generations) for ids in seen)  # one whole generation, never a mix
        health = c.get("/healthz").json()
        assert health["count"] == 8 and health["generation"] == Collection.open(idx).manifest.generation


def test_serve_listens_on_a_free_port_and_refuses_an_open_host_without_a_token(library, model_cache):
    base, _ = library
    env = dict(os.environ, MMSEARCH_CACHE=str(model_cache))
    r = subprocess.run([sys.executable, "-m", "mmsearch.cli", "serve", "--index", str(base / "index"),
                        "--host", "0.0.0.0"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "--token" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    proc = subprocess.Popen([sys.executable, "-m", "mmsearch.cli", "serve", "--index", str(base / "index"),
                             "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert line.startswith("serving http://127.0.0.1:"), line
        import urllib.request

        with urllib.request.urlopen(line.split()[1].strip() + "/healthz", timeout=30) as resp:
            assert resp.status == 200 and b'"ok":true' in resp.read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
