"""`mmsearch serve`: the JSON API and the page over one Searcher, in one process and one origin.

Endpoints (JSON errors are ``{"error": "..."}`` with a 4xx status; a 500 only for a bug, without
its traceback):

    GET  /                          the page (static/index.html; no build step, no CDN)
    GET  /api/search?q=&k=&page=&kind=&per_video=&lang=   text query (per_video: spans of one video, default 3;
                                    lang: auto, en or multi, the text tower as `mmsearch query --lang`)
    POST /api/search                JSON {"q", "k", "page", "kind", "per_video", "lang"}, or multipart with the file in "image"
    GET  /api/items/{id}            one item;  GET /api/items/{id}/similar  items like it (stored vector)
    GET  /api/info                  what `mmsearch info --json` says
    GET  /thumb/{id}?size=256       EXIF-rotated JPEG thumbnail, cached on disk (a video's: its frame)
    GET  /media/{id}                the file, with HTTP Range; ?start=&end= a browser-playable clip of a video span
    GET  /healthz, /metrics         liveness; Prometheus text (requests and latency per stage)

Items are addressed by id only: the client never sends a path, and a file is served only if it
resolves (after symlinks) under a folder that was indexed.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..errors import (
    BadQueryError,
    EmptyIndexError,
    IndexNotFoundError,
    MediaError,
    MediaReadError,
    MmsearchError,
    PathNotFoundError,
)
from ..lang import warm_detector
from .api import Limits, NotFound, Results, TooLarge, read_upload
from .live import LiveIndex, servable
from .metrics import Metrics

STATIC = Path(__file__).parent / "static"
IMMUTABLE = "public, max-age=31536000, immutable"


class Server:
    """The state one app serves from: the live index, the caches, the limits, the metrics."""

    def __init__(self, index_path, token: str | None, cache_dir: Path, limits: Limits) -> None:
        from .thumbs import Thumbnails
        from .transcode import SpanClips, browser_playable

        self.live = LiveIndex(index_path)
        # the model loads now, not on the first query; its multilingual tower and the language ID too
        self.live.current().searcher.encoder.warm("text", "multi")
        warm_detector()
        self.token, self.limits, self.metrics = token, limits, Metrics()
        self.thumbs = Thumbnails(cache_dir / "thumbs")
        self.clips = SpanClips(cache_dir / "clips")
        self._playable: dict[str, bool] = {}
        self._browser_playable = browser_playable

    def playable(self, path: str) -> bool:
        if path not in self._playable:
            self._playable[path] = self._browser_playable(path)
        return self._playable[path]

    def results(self) -> Results:
        return Results(self.live.current(), self.playable, self.metrics.stage)

    def file_of(self, item_id: int) -> tuple[str, dict]:
        """(real path, item) of an item whose file may be served; NotFound otherwise."""
        results = self.results()
        item = results.item(item_id)
        real = servable(results.snap, item.path) if item.kind != "text" else None
        if real is None:
            raise NotFound(f"item {item_id} has no file to serve")
        return real, item.to_json()


class Json(JSONResponse):
    """JSON with non-ASCII escaped: a file name that is not UTF-8 (surrogate escapes in Python) comes
    out as ``\\udcXX`` instead of failing to encode, and round-trips through ``json.loads``."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def create_app(index_path, token: str | None = None, cache_dir: str | os.PathLike | None = None,
               limits: Limits | None = None) -> FastAPI:
    """The app over the index at ``index_path`` (which must exist and hold items). ``token``: every
    request must carry it (``Authorization: Bearer`` or the ``mmsearch_token`` cookie)."""
    from ..exported import cache_root

    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "serve"
    server = Server(index_path, token, cache, limits or Limits())
    app = FastAPI(title="mmsearch", docs_url=None, redoc_url=None, openapi_url=None, default_response_class=Json)
    app.state.server = server
    _install_guards(app, server)
    _install_api(app, server)
    _install_files(app, server)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _error(status: int, message: str) -> JSONResponse:
    return Json({"error": message}, status_code=status)


def _install_guards(app: FastAPI, server: Server) -> None:
    """Token check, metrics around every request, and every error as one JSON line."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.perf_counter()
        public = request.url.path == "/" or request.url.path.startswith("/static/")  # the page, which asks for it
        if server.token is not None and not public and not _authorised(request, server.token):
            response = _error(401, "this server needs its token: send `Authorization: Bearer TOKEN`")
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        server.metrics.request(getattr(route, "path", "unmatched"), response.status_code, time.perf_counter() - t0)
        return response

    @app.exception_handler(MmsearchError)
    async def ours(request: Request, e: MmsearchError):
        if isinstance(e, (NotFound, IndexNotFoundError, PathNotFoundError)):
            return _error(404, str(e))
        if isinstance(e, TooLarge):
            return _error(413, str(e))
        if isinstance(e, MediaReadError):
            return _error(503, str(e))
        return _error(400 if not isinstance(e, EmptyIndexError) else 404, str(e))

    @app.exception_handler(HTTPException)
    async def http(request: Request, e: HTTPException):
        return _error(e.status_code, str(e.detail) if e.status_code != 404 else "not found")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("query", "path", "body"))
        return _error(422, f"bad request: {where} {first.get('msg', '')}".strip())

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        return _error(500, f"internal error ({type(e).__name__}); the server log has the details")


def _whole(value) -> int | None:
    """An optional whole-number field of a JSON body or a form (None when absent)."""
    bad = BadQueryError(f"per_video must be a whole number of at least 1, got {value!r}")
    if value is None:
        return None
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise bad
    try:
        return int(value)
    except (TypeError, ValueError):
        raise bad from None


def _item_id(text: str) -> int:
    """An item id from the URL; anything but a plain number (``..``, a path, NUL, ...) is not found."""
    if not (text.isascii() and text.isdigit() and len(text) < 19):
        raise NotFound(f"no item {text[:40]!r} in the index")
    return int(text)


def _authorised(request: Request, token: str) -> bool:
    given = request.headers.get("authorization", "")
    given = given[7:] if given.lower().startswith("bearer ") else request.cookies.get("mmsearch_token", "")
    return secrets.compare_digest(given.encode(), token.encode())


def _install_api(app: FastAPI, server: Server) -> None:
    @app.get("/api/search")
    def search_get(q: str = "", k: int = 20, page: int = 0, kind: str = "auto", per_video: int | None = None,
                   lang: str = "auto"):
        return server.results().text(q, k, page, kind, per_video, lang)

    @app.post("/api/search")
    async def search_post(request: Request):
        kind_of = request.headers.get("content-type", "")
        if kind_of.startswith("multipart/form-data"):
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > server.limits.upload_bytes + 64 * 1024:  # before reading it
                raise TooLarge(f"the upload is over the limit of {server.limits.upload_bytes // 2**20} MB")
            form = await request.form(max_files=1, max_fields=8)
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise MediaError("send the query image in the multipart field 'image'")
            data = await upload.read(server.limits.upload_bytes + 1)
            image = read_upload(data, server.limits)
            args = {k: form.get(k) for k in ("k", "page", "kind", "per_video") if form.get(k) is not None}
            return server.results().image(image, int(args.get("k", 20)), int(args.get("page", 0)),
                                          str(args.get("kind", "auto")), _whole(args.get("per_video")))
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise MediaError("the request body is not JSON: send {\"q\": \"...\"} or a multipart image") from None
        if not isinstance(body, dict):
            raise MediaError("send a JSON object: {\"q\": \"...\", \"k\": 20}")
        return server.results().text(str(body.get("q", "")), int(body.get("k", 20)), int(body.get("page", 0)),
                                     str(body.get("kind", "auto")), _whole(body.get("per_video")),
                                     str(body.get("lang") or "auto"))

    @app.get("/api/items/{item_id}")
    def item(item_id: str):
        return server.results().item(_item_id(item_id)).to_json()

    @app.get("/api/items/{item_id}/similar")
    def similar(item_id: str, k: int = 20, page: int = 0, kind: str = "auto", per_video: int | None = None):
        return server.results().similar(_item_id(item_id), k, page, kind, per_video)

    @app.get("/api/info")
    def info():
        return server.live.current().collection.facts()

    @app.get("/healthz")
    def healthz():
        snap = server.live.current()
        return {"ok": True, "generation": snap.generation, "count": snap.collection.count}

    @app.get("/metrics")
    def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def _install_files(app: FastAPI, server: Server) -> None:
    @app.get("/thumb/{item_id}")
    def thumb(item_id: str, request: Request, size: int = 256):
        real, item = server.file_of(_item_id(item_id))
        with server.metrics.stage("thumbnail"):
            path, etag = server.thumbs.get(real, size, item["start"] if item["kind"] == "video" else None)
        headers = {"Cache-Control": IMMUTABLE, "ETag": f'"{etag}"'}
        if request.headers.get("if-none-match") == f'"{etag}"':
            return Response(status_code=304, headers=headers)
        return FileResponse(path, media_type="image/jpeg", headers=headers)

    @app.get("/media/{item_id}")
    def media(item_id: str, start: float | None = None, end: float | None = None):
        real, item = server.file_of(_item_id(item_id))
        if start is not None and item["kind"] == "video":
            with server.metrics.stage("transcode"):
                path, mime = server.clips.get(real, start, end if end is not None else start + 1.0)
            return FileResponse(path, media_type=mime, headers={"Cache-Control": IMMUTABLE})
        return FileResponse(real, headers={"Cache-Control": "no-cache"})  # Range requests: Starlette
