"""The search page in a real browser (headless Debian chromium driven by Playwright) against a real
`mmsearch serve` process over a small index of real photos, two real videos and some captions: text
and image queries, "similar", playing a video hit's span, the URL as the state, the token prompt."""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from tests.conftest import ROOT, VIDEOS, copy_photos

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
RESULTS = ROOT / "benchmarks" / "results"
K = 24  # the page asks for pages of this many
PHOTO = 2  # pairs.images[PHOTO] is the photo its first caption must find
VIDEO_CLIPS = {"airplane_then_field.mp4": "an airplane in the sky", "vtest.avi": "people walking in a street"}
TOKEN = "s3cret-token_42"


# ---- the server ----

def start_server(index: Path, cache: Path, *extra: str):
    """`mmsearch serve --port 0` on the index; (process, base URL, stderr lines so far)."""
    env = dict(os.environ, MMSEARCH_CACHE=str(cache))
    proc = subprocess.Popen([sys.executable, "-m", "mmsearch.cli", "serve", "--index", str(index), "--port", "0", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines: queue.Queue = queue.Queue()

    def drain():  # keeps reading so the server never blocks on a full pipe
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    log, deadline = [], time.monotonic() + 180
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            stop_server(proc)
            pytest.fail("mmsearch serve printed no `serving` line in 180 s:\n" + "".join(log))
        if line is None:
            pytest.fail(f"mmsearch serve exited ({proc.wait()}) before serving:\n" + "".join(log))
        log.append(line)
        m = re.match(r"serving (http://127\.0\.0\.1:\d+)\s*$", line)
        if m:
            return proc, m.group(1), log


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def site(tmp_path_factory, pairs, encoder, model_cache):
    """An index of the photos, airplane_then_field.mp4, vtest.avi (an AVI browsers cannot play) and
    a few captions as texts, served by a real `mmsearch serve`; yields the facts tests need."""
    from mmsearch.indexing import index_folder, index_texts

    base = tmp_path_factory.mktemp("served")
    mapping = copy_photos(pairs, base / "media")
    for clip in VIDEO_CLIPS:
        shutil.copy2(VIDEOS / clip, base / "media" / clip)
    texts = base / "captions.txt"
    texts.write_text("".join(caps[1] + "\n" for caps in pairs.captions[:6]))
    index_folder(base / "media", base / "index", encoder=encoder)
    index_texts(texts, base / "index", encoder=encoder)
    proc, url, _ = start_server(base / "index", model_cache)
    yield {"url": url, "index": base / "index", "photos": [mapping[p] for p in pairs.images], "pairs": pairs}
    stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium not found: `apt-get install -y chromium` (the browser tests drive Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    context.close()


# ---- helpers ----

def settled(page) -> str:
    """Wait until the page's current query has finished; its status line's state."""
    state = page.wait_for_function(
        "() => { const s = document.querySelector('[data-testid=status]');"
        " return s && !['loading', undefined].includes(s.dataset.state) && s.dataset.state; }", timeout=60_000)
    return state.json_value()


def result_ids(page, first: int = K) -> list[int]:
    """Ids of the hits shown, in rank order, up to rank `first` (the first page)."""
    cards = page.locator("[data-testid=result]")
    pairs = [(int(c.get_attribute("data-rank")), int(c.get_attribute("data-id"))) for c in cards.all()]
    return [i for r, i in sorted(pairs) if r <= first]


def path_of(page, site, item_id: int) -> str:
    res = page.request.get(f"{site['url']}/api/items/{item_id}")
    assert res.ok, res.text()
    return res.json()["path"]


def shoot(page, name: str) -> None:
    from mmsearch._util import atomic_write_bytes

    page.wait_for_function("[...document.images].filter(i => i.getBoundingClientRect().top < innerHeight)"
                           ".every(i => i.complete)")  # the thumbnails in view have loaded
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(RESULTS / name, page.screenshot())


def search(page, site, text: str) -> str:
    page.goto(site["url"])
    page.keyboard.press("/")  # the shortcut focuses the search box
    assert page.evaluate("document.activeElement.dataset.testid") == "search-input"
    page.keyboard.type(text)
    page.keyboard.press("Enter")
    return settled(page)


# ---- tests ----

def test_a_caption_finds_its_photo_and_the_url_keeps_the_query(page, site):
    caption = site["pairs"].captions[PHOTO][0]
    assert search(page, site, caption) == "done"
    assert parse_qs(urlparse(page.url).query)["q"] == [caption.strip()]
    ids = result_ids(page)
    top = [Path(path_of(page, site, i)).name for i in ids[:3]]
    assert Path(site["photos"][PHOTO]).name in top, f"{caption!r} -> {top}"
    first = page.locator("[data-testid=result]").first
    assert first.locator("img").get_attribute("loading") == "lazy"
    first.hover()  # the score shows on hover
    score = first.locator("[data-testid=score]")
    page.wait_for_function("el => getComputedStyle(el).opacity === '1'", arg=score.element_handle())
    assert 0 < float(score.inner_text()) <= 1.0
    shoot(page, "serve_page.png")


def _drop(page, photo: str, how: str) -> None:
    """Give the page an image as a user would: the file picker, a drop or a paste."""
    if how == "file-input":
        page.set_input_files("[data-testid=file-input]", photo)
        return
    data = list(Path(photo).read_bytes())
    page.evaluate(
        """([bytes, name, how]) => {
          const dt = new DataTransfer();
          dt.items.add(new File([new Uint8Array(bytes)], name, {type: 'image/jpeg'}));
          const target = document.querySelector('[data-testid=drop-zone]');
          if (how === 'drop') {
            for (const type of ['dragenter', 'dragover', 'drop'])
              target.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
          } else {
            target.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true}));
          }
        }""", [data, Path(photo).name, how])


@pytest.mark.parametrize("how", ["file-input", "drop", "paste"])
def test_an_image_query_finds_the_same_photo_first(page, site, how):
    photo = site["photos"][5]
    page.goto(site["url"])
    page.select_option("[data-testid=kind]", "image")  # "auto" would answer an image with the captions
    _drop(page, photo, how)
    assert settled(page) == "done", page.inner_text("[data-testid=status]")
    assert page.locator("[data-testid=query-preview]").is_visible()
    assert parse_qs(urlparse(page.url).query)["kind"] == ["image"]
    ids = result_ids(page)
    assert Path(path_of(page, site, ids[0])).name == Path(photo).name
    assert len(ids) == len(site["photos"])
    assert {c.get_attribute("data-kind") for c in page.locator("[data-testid=result]").all()} == {"image"}


def test_similar_shows_that_item_first_and_back_forward_restore(page, site):
    assert search(page, site, "a dog") == "done"
    before = result_ids(page)
    chosen = page.locator("[data-testid=result]").nth(2)
    chosen_id = int(chosen.get_attribute("data-id"))
    chosen.locator("[data-testid=similar]").click()
    page.wait_for_url(re.compile(rf"[?&]similar={chosen_id}\b"))
    assert settled(page) == "done"
    similar = result_ids(page)
    assert similar[0] == chosen_id
    page.go_back()
    assert settled(page) == "done"
    assert page.input_value("[data-testid=search-input]") == "a dog"
    assert result_ids(page) == before
    page.go_forward()
    assert settled(page) == "done"
    assert result_ids(page) == similar


def _player_state(page) -> dict:
    return page.evaluate(
        """() => { const v = document.querySelector('[data-testid=player-video]');
                   const m = /#t=([\\d.]+),([\\d.]+)$/.exec(v.currentSrc || v.src);
                   return {t: v.currentTime, paused: v.paused, played: v.played.length,
                           a: m && +m[1], b: m && +m[2], error: v.error && v.error.code}; }""")


@pytest.mark.parametrize("clip", list(VIDEO_CLIPS))
def test_play_shows_the_video_span_only_when_clicked(page, site, clip):
    page.goto(f"{site['url']}/?q={VIDEO_CLIPS[clip]}&kind=video")
    assert settled(page) == "done"
    assert page.input_value("[data-testid=kind]") == "video"
    hits = page.locator("[data-testid=result][data-kind=video]").filter(has_text=clip)
    assert hits.count() > 0, f"no hit of {clip} among {page.locator('[data-testid=result]').all_inner_texts()}"
    page.mouse.wheel(0, 2000)  # scrolling never starts a video
    assert page.evaluate("[...document.querySelectorAll('video')].every(v => v.paused && !v.currentSrc)")
    hits.first.locator("[data-testid=play]").click()
    assert page.locator("[data-testid=player]").is_visible()
    page.wait_for_function(
        """() => { const v = document.querySelector('[data-testid=player-video]');
                   return v.error || (v.played.length > 0 && v.currentTime > 0.05); }""", timeout=90_000)
    page.wait_for_timeout(1500)
    s = _player_state(page)
    assert s["error"] is None and s["a"] is not None, s
    assert s["a"] - 0.05 <= s["t"] <= s["b"] + 0.3, s
    if clip == "airplane_then_field.mp4":
        shoot(page, "serve_video.png")
    page.keyboard.press("Escape")
    assert page.locator("[data-testid=player]").is_hidden()
    assert page.evaluate("document.querySelector('[data-testid=player-video]').paused")


def test_reloading_a_query_url_repeats_it(page, site):
    q = site["pairs"].captions[8][0]
    page.goto(f"{site['url']}/?q={q}")
    assert settled(page) == "done"
    first = result_ids(page)
    assert first
    page.reload()
    assert settled(page) == "done"
    assert page.input_value("[data-testid=search-input]") == q.strip()
    assert result_ids(page) == first


def test_scrolling_loads_the_next_pages_in_a_stable_order(page, site):
    q, n = "a dog", 5
    page.goto(f"{site['url']}/?q={q}&kind=all&k={n}")
    settled(page)
    more = page.locator("[data-testid=load-more]")
    for _ in range(20):  # the button loads the next page when it scrolls into view
        page.mouse.wheel(0, 4000)
        if settled(page) == "done" and more.is_hidden():
            break
        page.wait_for_timeout(300)
    want, p = [], 0
    while p is not None:
        body = page.request.get(f"{site['url']}/api/search", params={"q": q, "kind": "all", "k": n, "page": p}).json()
        want += [item["id"] for item in body["items"]]
        p = body["next_page"]
    assert len(want) > 2 * n
    assert result_ids(page, first=10**6) == want
    ranks = [int(r) for r in page.locator("[data-testid=result]").evaluate_all("els => els.map(e => e.dataset.rank)")]
    assert ranks == list(range(1, len(want) + 1))


def test_the_kind_filter_shows_texts_as_text_cards(page, site):
    assert search(page, site, "a dog in the water") == "done"
    page.select_option("[data-testid=kind]", "text")
    page.wait_for_url(re.compile(r"[?&]kind=text\b"))
    assert settled(page) == "done"
    cards = page.locator("[data-testid=result]")
    assert cards.count() == 6
    kinds = {c.get_attribute("data-kind") for c in cards.all()}
    assert kinds == {"text"}
    texts = {" ".join(caps[1].split()) for caps in site["pairs"].captions[:6]}
    assert " ".join(cards.first.locator("blockquote").inner_text().split()) in texts


def test_a_server_error_is_shown_as_the_server_said_it(page, site):
    said = page.request.get(f"{site['url']}/api/items/999999/similar").json()["error"]
    page.goto(f"{site['url']}/?similar=999999")
    assert settled(page) == "error"
    assert page.inner_text("[data-testid=status]") == said
    assert page.locator("[data-testid=result]").count() == 0


def test_the_page_asks_for_the_token_once_and_keeps_it(browser, site, model_cache):
    proc, url, _ = start_server(site["index"], model_cache, "--token", TOKEN)
    try:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.set_default_timeout(60_000)
        res = page.goto(url)
        assert res.status == 200, (f"GET / answered {res.status} {res.text()[:200]}: the page (and /static) must load "
                                   "without the token, or it cannot ask for it")
        page.locator("[data-testid=token-dialog]").wait_for(state="visible")
        page.fill("[data-testid=token-input]", TOKEN)
        page.click("[data-testid=token-submit]")
        page.locator("[data-testid=token-dialog]").wait_for(state="hidden")
        page.fill("[data-testid=search-input]", "a dog")
        page.press("[data-testid=search-input]", "Enter")
        assert settled(page) == "done"
        assert page.locator("[data-testid=token-dialog]").is_hidden()
        cookie = {c["name"]: c for c in context.cookies()}["mmsearch_token"]
        assert cookie["value"] == TOKEN and cookie["sameSite"] == "Strict"
        thumb = page.locator("[data-testid=result] img").first
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle())
        context.close()
    finally:
        stop_server(proc)
