"""What the API answers, independent of HTTP: search results as JSON-ready records, uploads checked."""

from __future__ import annotations

import io
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..config import MAX_IMAGE_PIXELS
from ..errors import BadQueryError, MediaError, MmsearchError
from ..lang import check_lang
from ..search import Hit
from .live import Snapshot

KINDS = ("auto", "image", "video", "text", "all")
UPLOAD_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"}  # what Pillow reads safely
MAX_K = 200


class NotFound(MmsearchError, LookupError):
    """An item id the index does not hold (or a file that may not be served)."""


class TooLarge(MmsearchError, ValueError):
    """An upload over the byte or pixel limit."""


@dataclass
class Limits:
    upload_bytes: int = 20 * 2**20
    upload_pixels: int = 50_000_000


@dataclass
class Item:
    id: int
    kind: str
    path: str
    name: str
    thumb: str | None
    media: str | None
    text: str | None = None
    start: float | None = None
    end: float | None = None
    rank: int | None = None
    score: float | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if not (k in ("rank", "score") and v is None)}


def media_url(item_id: int, kind: str, start: float | None, end: float | None, playable: bool) -> str | None:
    """Where the browser gets the item: the file itself, with the span as a media fragment; for a
    video browsers cannot play, a transcoded clip of the span (which then starts at 0)."""
    if kind == "text":
        return None
    if kind != "video" or start is None:
        return f"/media/{item_id}"
    end = end if end is not None and end > start else start + 1.0
    if playable:
        return f"/media/{item_id}#t={start:g},{end:g}"
    return f"/media/{item_id}?start={start:g}&end={end:g}#t=0,{end - start:g}"


class Results:
    """Searches of one snapshot, as pages of Items. Encoding and searching are serialised: on a few
    cores, one query at a time with all of them is faster than several competing for them."""

    _lock = threading.Lock()

    def __init__(self, snap: Snapshot, playable, stage) -> None:
        self.snap, self.playable, self.stage = snap, playable, stage  # stage(name): a timing context

    def item(self, item_id: int, hit: Hit | None = None) -> Item:
        c = self.snap.collection
        try:
            row = int(c.rows_of(np.array([item_id]))[0])
        except (KeyError, IndexError, ValueError):
            raise NotFound(f"no item {item_id} in the index") from None
        kind, path = c.items.kind[row], c.items.path[row]
        start = hit.start if hit is not None else (float(c.items.t[row]) if kind == "video" else None)
        end = hit.end if hit is not None else start
        name = path.rsplit("#", 1)[0].rsplit("/", 1)[-1]
        media = media_url(item_id, kind, start, end, kind != "video" or self.playable(path))
        return Item(id=int(item_id), kind=kind, path=path, name=name,
                    thumb=None if kind == "text" else f"/thumb/{item_id}?size=256", media=media,
                    text=c.items.text[row], start=start, end=end,
                    rank=hit.rank if hit else None, score=round(hit.score, 4) if hit else None)

    def page(self, vector: np.ndarray, k: int, page: int, query: str | None, kind, per_video: int | None = None) -> dict:
        """One page of results for a query vector (``query``: its modality, for the hubness correction)."""
        k, page = _check_k(k), max(0, int(page))
        t0 = time.perf_counter()
        s = self.snap.searcher
        with self._lock, self.stage("search"):
            hits = s._search(np.atleast_2d(vector), k * (page + 1) + 1, kind, query, per_video)[0]  # +1: a next page?
            corrected = query is not None and s.hubness and s._correction(query, kind) is not None
        items = [self.item(h.id, h).to_json() for h in hits[page * k:(page + 1) * k]]
        return {"items": items, "next_page": page + 1 if len(hits) > (page + 1) * k else None,
                "took_ms": round(1000 * (time.perf_counter() - t0), 2),
                "score_kind": "cosine minus hubness correction" if corrected else "cosine"}

    def _encode(self, embed, what):
        t0 = time.perf_counter()
        with self._lock, self.stage("encode"):
            vector = embed([what])
        return vector, time.perf_counter() - t0

    def text(self, q: str, k: int, page: int, kind: str, per_video: int | None = None, lang: str = "auto") -> dict:
        s = self.snap.searcher
        if not isinstance(q, str) or not q.strip():
            raise BadQueryError("empty query: give some text to search for (q=...), or POST an image")
        wanted = s._kind(_check_kind(kind), "text")
        check_lang(lang)
        vector, seconds = self._encode(lambda texts: s.embed_texts(texts, lang), q)
        return _took(self.page(vector, k, page, "text", wanted, per_video), seconds)

    def image(self, image, k: int, page: int, kind: str, per_video: int | None = None) -> dict:
        s = self.snap.searcher
        wanted = s._kind(_check_kind(kind), "image")
        vector, seconds = self._encode(s.encoder.embed_images, image)
        return _took(self.page(vector, k, page, "image", wanted, per_video), seconds)

    def similar(self, item_id: int, k: int, page: int, kind: str, per_video: int | None = None) -> dict:
        """Items like a stored one, from its stored vector (nothing re-encoded); same modality by default."""
        s, c = self.snap.searcher, self.snap.collection
        item = self.item(item_id)
        vector = c.lookup.get(np.array([[item_id]]))[0]
        if kind == "auto":
            wanted = ("text",) if item.kind == "text" else tuple(x for x in ("image", "video") if len(s._rows_of_kind(x)))
        else:
            wanted = s._kind(_check_kind(kind), "image")
        return self.page(vector, k, page, None, wanted, per_video)


def _took(result: dict, encode_seconds: float) -> dict:
    result["took_ms"] = round(result["took_ms"] + 1000 * encode_seconds, 2)
    return result


def _check_k(k) -> int:
    k = int(k)
    if not 1 <= k <= MAX_K:
        raise BadQueryError(f"k must be between 1 and {MAX_K}, got {k}")
    return k


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise BadQueryError(f"unknown kind {kind!r}: use {', '.join(KINDS)}")
    return kind


def read_upload(data: bytes, limits: Limits):
    """An uploaded image query as an upright RGB PIL image; TooLarge / MediaError otherwise."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from ..media import _to_rgb

    if len(data) > limits.upload_bytes:
        raise TooLarge(f"the image is over the upload limit of {limits.upload_bytes // 2**20} MB")
    if not data:
        raise MediaError("the upload is empty: send an image file in the field 'image'")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in UPLOAD_FORMATS:
                raise MediaError(f"unsupported image format {im.format}: send JPEG, PNG, WebP, GIF, BMP or TIFF")
            w, h = im.size
            if w * h > min(limits.upload_pixels, MAX_IMAGE_PIXELS):
                raise TooLarge(f"the image is {w}x{h} = {w * h / 1e6:.1f} MP, over the limit of "
                               f"{limits.upload_pixels / 1e6:g} MP")
            im.draft("RGB", (1024, 1024))
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise MediaError("the upload is not an image mmsearch can read") from None
    except MmsearchError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data, from any decoder
        raise MediaError(f"the image is truncated or corrupt ({type(e).__name__})") from None
