"""Query layer: text -> image, image -> image and image -> text search over a built index.

The Searcher depends on "something that embeds" (``embed_texts`` / ``embed_images`` returning
normalised float32 rows), not on torch itself, so a lighter backend can drop in later.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from .encoder import embed_texts_with, get_encoder
from .errors import (
    BadQueryError,
    EmptyIndexError,
    MmsearchError,
    ModelMismatchError,
    PathNotFoundError,
)
from .hubness import corrections, rerank
from .index import exact_knn, gpu_count
from .lang import check_lang
from .manifest import Sampling
from .store import Collection, read_manifest
from .weights import check_weights

EXACT_FILTER_MAX = 50_000  # a modality with at most this many items is searched exactly when filtered
SPAN_MARGIN = 0.1  # video frames scoring within this (cosine) of a span's best frame extend the span
PER_VIDEO = 3  # at most this many spans (shots) of one video in a result list


def _spans(frames: list[tuple[int, float, int]], margin: float) -> list[list[tuple[int, float, int]]]:
    """Group (frame id, score, row) of one video into spans grown from the best frame outwards."""
    by_id = {f[0]: f for f in frames}
    left = sorted(frames, key=lambda f: -f[1])
    spans = []
    for seed in left:
        if seed[0] not in by_id:
            continue
        span = [by_id.pop(seed[0])]
        for step in (-1, 1):
            i = seed[0] + step
            while i in by_id and by_id[i][1] >= seed[1] - margin:
                span.append(by_id.pop(i))
                i += step
        spans.append(sorted(span))
    return spans


@dataclass(frozen=True)
class Hit:
    rank: int  # 1-based
    score: float  # cosine similarity; for a cross-modal query minus the item's hubness correction (mmsearch.hubness)
    path: str  # absolute path of the item ("<file>#<line>" for texts)
    kind: str  # "image", "video" or "text"
    id: int  # stable item id (for a video span: its best frame)
    text: str | None = None  # the text, for kind "text"
    start: float | None = None  # for kind "video": the span of matching frames, seconds
    end: float | None = None
    shot: int | None = None  # for kind "video": the shot the span lies in (None: an index without shots)

    def to_dict(self) -> dict:
        return asdict(self)


def _in_background(fn, *args):
    """``fn(*args)`` started in a thread; returns a Future of its result (or its exception). Not a
    daemon: a process that exits meanwhile (say, on an empty index) waits for it rather than
    tearing down ONNX Runtime under a thread still inside it."""
    import threading
    from concurrent.futures import Future

    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # handed to whoever asks for the result
            future.set_exception(e)

    threading.Thread(target=run, name="mmsearch-load-model").start()
    return future


def _check_per_video(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise BadQueryError(f"per_video (--per-video) must be a whole number of at least 1, got {n!r}")
    return int(n)


class Searcher:
    """Search one index. ``Searcher("indexes/default").search_text("a dog", k=5)``.

    The encoder defaults to the model recorded in the index manifest, loaded on first query.
    """

    def __init__(self, index: str | os.PathLike | Collection, encoder=None, nprobe: int | None = None,
                 ef_search: int | None = None, rerank_factor: int | None = None, gpu: bool | None = None,
                 span_margin: float = SPAN_MARGIN, hubness: bool = True, backend: str = "auto",
                 per_video: int = PER_VIDEO, shards=None, lang: str = "auto",
                 expect: Sequence[str] | None = None) -> None:
        """``nprobe`` / ``ef_search`` / ``rerank_factor`` override the values tuned at build time for
        every query; ``gpu`` (None: when faiss-gpu sees a CUDA device) searches the index on the GPU;
        ``span_margin`` (cosine) decides which neighbouring video frames join a hit's time span;
        ``hubness`` False ranks cross-modal queries by plain cosine, without the correction the
        model's query bank calibrated (see mmsearch.hubness; models without a bank have none);
        ``backend`` runs the index's model when no ``encoder`` is given ("auto": ONNX Runtime when
        the model has an export, see mmsearch.encoder); ``per_video`` caps the spans of one video in a
        result list; ``shards`` (a folder or a ``mmsearch.scale.ShardedIndex`` built from this index)
        answers the nearest-neighbour step from shards instead of the index's own faiss file; ``lang``
        picks the text tower of text queries ("auto": by each query's language, see mmsearch.lang;
        "en" or "multi" force one). Both towers embed into the same space, so existing indexes answer
        queries in other languages without re-embedding anything; ``expect`` (the text queries about to
        be asked, if known) loads the text towers they need, and only those, while the index loads."""
        self.span_margin = span_margin
        self.lang = check_lang(lang)
        self.per_video = _check_per_video(per_video)
        self._shot_rows: dict[tuple[str, int], np.ndarray] | None = None
        self.hubness = hubness
        self.backend = backend
        self._loading = None  # the index's encoder, loading in a background thread while the index loads
        if encoder is None and not isinstance(index, Collection):
            self._loading = _in_background(self._load_encoder, read_manifest(Path(index)).model, tuple(expect or ()))
        self.collection = index if isinstance(index, Collection) else Collection.open(index, load_index=shards is None)
        if shards is not None:
            from .scale.shards import use_shards

            use_shards(self.collection, shards)
        self.search_options = {"nprobe": nprobe, "ef_search": ef_search, "rerank_factor": rerank_factor}
        if self.collection.count == 0:
            raise EmptyIndexError(
                f"index {self.collection.path} is empty: add images with `mmsearch index FOLDER`"
            )
        if encoder is not None:
            key = self.collection.model.key
            if getattr(encoder, "name", key) != key:
                raise ModelMismatchError(
                    f"index {self.collection.path} was built with model {key!r}, the encoder is "
                    f"{encoder.name!r}: load the index's model or rebuild the index"
                )
            self._check_weights(encoder)
        self._encoder = encoder
        self.on_gpu = False
        if gpu or (gpu is None and self.collection.count > EXACT_FILTER_MAX):
            if gpu_count():
                self.on_gpu = self.collection.index.to_gpu()
        self._kinds: np.ndarray | None = None  # items' kinds as an array, built on first filtered query
        self._kind_rows: dict[tuple[str, ...], np.ndarray] = {}
        self._kind_lookups: dict = {}  # exact search over one modality (<= EXACT_FILTER_MAX items)
        self._corrections: dict[tuple, np.ndarray | None] = {}  # (query modality, kinds) -> per-row correction

    def _load_encoder(self, m, expect: tuple[str, ...] = ()):
        """The encoder of the model record ``m``, with the text towers of the ``expect``ed queries
        ready (without any: the model's own text tower; a query comes next)."""

        encoder = get_encoder(m.name, pretrained=m.pretrained, backend=self.backend,
                              precision=m.precision or "fp32")  # indexes before int8 existed: fp32
        try:  # best effort: a query that needs what fails here raises it itself, not any first query
            towers = set(encoder.routes(list(expect), self.lang)) if expect else {"en"}
            encoder.warm(*("text" if t == "en" else t for t in towers))
        except MmsearchError:
            pass
        return encoder

    @property
    def encoder(self):
        if self._encoder is None:
            loading, self._loading = self._loading, None
            encoder = loading.result() if loading is not None else self._load_encoder(self.collection.model)
            self._check_weights(encoder)
            self._encoder = encoder
        return self._encoder

    def _check_weights(self, encoder) -> None:
        check_weights(self.collection.model, getattr(encoder, "weights", None), self.collection.path)
        have, got = self.collection.model.precision or "fp32", getattr(encoder, "precision", "fp32")
        if got != have:
            raise ModelMismatchError(f"index {self.collection.path} holds {have} vectors, the encoder embeds at "
                                     f"{got}: query with the index's precision ({have})")

    def _correction(self, query: str | None, kind=None) -> np.ndarray | None:
        """Per-row score corrections for a query of this modality over items of ``kind``, None when
        none of those items has one (e.g. a same-modality search): then plain search is exact."""
        if query is None or not self.hubness:
            return None
        key = (query, self._kinds_of(kind) if kind is not None else None)
        if key not in self._corrections:
            items = self.collection.items
            corr = corrections(items.hub, items.kind, query, self.collection.manifest.hubness)
            rows = self._rows_of_kind(kind) if kind is not None else slice(None)
            self._corrections[key] = corr if corr is not None and corr[rows].any() else None
        return self._corrections[key]

    # ---- numpy in, numpy out -------------------------------------------------------------------
    def search_vectors(self, queries: np.ndarray, k: int = 10, kind: str | tuple[str, ...] | None = None,
                       query: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(q, d) normalised float32 queries -> (D, I): scores and item ids, best first.

        ``kind`` ("image", "video", "text", or a tuple of them) restricts results to items of those
        modalities. ``query`` ("text" or "image": what the vectors embed) applies the hubness
        correction to the items of the other modality (see mmsearch.hubness), exactly: candidates
        are fetched by plain cosine until no other item can rank among the k best. At most
        ``min(k, number of candidates)`` columns; never padded with -1. Video frames come back one by
        one here; :meth:`search_texts` and friends merge them into spans.
        """
        if k < 1:
            raise BadQueryError(f"k must be at least 1, got {k}")
        if query not in (None, "text", "image"):
            raise BadQueryError(f"unknown query modality {query!r}: use 'text', 'image' or None")
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        corr = self._correction(query, kind)
        n = len(self._rows_of_kind(kind)) if kind is not None else self.collection.count
        if corr is None or n == 0:  # n == 0: _search_plain says what is missing
            return self._search_plain(q, k, kind)

        return rerank(lambda qq, depth: self._search_plain(qq, depth, kind), q, min(k, n), n,
                      lambda ids: corr[self.collection.rows_of(ids)], 0.0)  # corrections never raise a score

    def _search_plain(self, q: np.ndarray, k: int, kind) -> tuple[np.ndarray, np.ndarray]:
        """search_vectors by plain cosine."""
        kinds = self.collection.items.kind
        rows = self._rows_of_kind(kind) if kind is not None else None
        opts = {key: v for key, v in self.search_options.items() if v is not None}
        if rows is None or len(rows) == len(kinds):
            return self.collection.index.search(q, k, **opts)
        if len(rows) == 0:
            have = ", ".join(sorted(set(kinds)))
            want = " or ".join(self._kinds_of(kind))
            raise EmptyIndexError(f"index {self.collection.path} holds no {want} items (it has: {have})")
        k = min(k, len(rows))
        if len(rows) > EXACT_FILTER_MAX:
            # a large share of a large index: over-fetch from the ANN index and keep that modality
            n = len(kinds)
            D, I = self.collection.index.search(q, min(n, k + int(np.ceil(2 * k * n / len(rows)))), **opts)
            wanted = np.isin(self._kind_array()[self.collection.rows_of(I)], list(self._kinds_of(kind))).reshape(I.shape)
            if (wanted.sum(1) >= k).all():
                cols = np.argsort(~wanted, axis=1, kind="stable")[:, :k]  # first k wanted, order kept
                return np.take_along_axis(D, cols, 1), np.take_along_axis(I, cols, 1)
        # exact search over that modality's vectors: a filter never returns fewer than asked

        key = self._kinds_of(kind)
        if key not in self._kind_lookups:  # the modality's vectors and ids, gathered once per Searcher
            self._kind_lookups[key] = (np.asarray(self.collection.embeddings[rows]), self.collection.items.id[rows])
        vectors, ids = self._kind_lookups[key]
        _, I = exact_knn(q, vectors, k, ids)
        # scores as the hits have always shown them (a dot product per hit, not the blocked matmul that
        # ranked them: the two can differ in the 7th decimal)
        D = np.einsum("qkd,qd->qk", self.collection.lookup.get(I), q)
        return D.astype(np.float32), I

    def _kind_array(self) -> np.ndarray:
        if self._kinds is None:
            self._kinds = np.asarray(self.collection.items.kind, dtype=object)
        return self._kinds

    @staticmethod
    def _kinds_of(kind: str | tuple[str, ...]) -> tuple[str, ...]:
        return (kind,) if isinstance(kind, str) else tuple(kind)

    def _rows_of_kind(self, kind: str | tuple[str, ...]) -> np.ndarray:
        key = self._kinds_of(kind)
        if key not in self._kind_rows:
            self._kind_rows[key] = np.flatnonzero(np.isin(self._kind_array(), list(key)))
        return self._kind_rows[key]

    def hits(self, D: np.ndarray, I: np.ndarray, k: int | None = None, queries: np.ndarray | None = None,
             query: str | None = None, per_video: int | None = None) -> list[list[Hit]]:
        """Turn search results into Hit lists (one per query), best first, at most ``k`` each.

        Video frames become spans. In an index with shots (and given the ``queries`` vectors), a
        video hit is a moment within one shot: every frame of a shot that was found is scored (with
        the same hubness correction), and the span runs from the first to the last of its frames
        scoring within ``span_margin`` of its best; one hit per shot, at most ``per_video`` (default:
        the Searcher's) per video. Without shots, neighbouring sampled frames (consecutive ids) that were also found
        and score within ``span_margin`` of a video's best frame join its span. A span scores as
        its best frame.
        """
        items, out, per_video = self.collection.items, [], _check_per_video(self.per_video if per_video is None else per_video)
        for qi, (scores, ids) in enumerate(zip(D, I)):
            rows = self.collection.rows_of(ids)
            hits: list[Hit] = []
            frames: dict[str, list[tuple[int, float, int]]] = {}
            for s, i, row in zip(scores, ids, rows):
                if items.kind[row] == "video":
                    frames.setdefault(items.path[row], []).append((int(i), float(s), int(row)))
                else:
                    hits.append(Hit(rank=0, score=float(s), path=items.path[row], kind=items.kind[row], id=int(i),
                                    text=items.text[row]))
            q = queries[qi] if queries is not None else None
            for path, fs in frames.items():
                hits += self._video_hits(path, fs, q, query)[:per_video]
            hits.sort(key=lambda h: -h.score)
            out.append([replace(h, rank=r + 1) for r, h in enumerate(hits[:k] if k else hits)])
        return out

    def _video_hits(self, path: str, fs: list[tuple[int, float, int]], q: np.ndarray | None,
                    query: str | None) -> list[Hit]:
        """The hits of one video's frames found for one query, best first."""
        items, out = self.collection.items, []
        by_shot: dict[int, list[tuple[int, float, int]]] = {}
        for f in fs:
            by_shot.setdefault(int(items.shot[f[2]]), []).append(f)
        for shot, found in by_shot.items():
            if shot < 0 or q is None:  # no shots known: spans of neighbouring frames found
                for span in _spans(found, self.span_margin):
                    best = max(span, key=lambda x: x[1])
                    times = [float(items.t[r]) for _, _, r in span]
                    out.append(Hit(rank=0, score=best[1], path=path, kind="video", id=best[0],
                                   start=min(times), end=max(times)))
            else:
                out.append(self._shot_hit(path, shot, q, query))
        return sorted(out, key=lambda h: -h.score)

    def _shot_hit(self, path: str, shot: int, q: np.ndarray, query: str | None) -> Hit:
        """One shot's hit: all its frames scored, the span of those within the margin of the best."""
        items = self.collection.items
        rows = self._rows_of_shot(path, shot)
        scores = np.asarray(self.collection.embeddings[rows], np.float32) @ q
        corr = self._correction(query, ("video",)) if query is not None else None
        if corr is not None:
            scores = scores + corr[rows]
        best = int(np.argmax(scores))
        near = np.flatnonzero(scores >= scores[best] - self.span_margin)
        first, last = rows[near[0]], rows[near[-1]]
        interval = (self.collection.manifest.video_sampling or Sampling()).frame_interval
        cut, next_cut = float(items.shot_start[first]), float(items.shot_end[last])
        start = cut if near[0] == 0 and not np.isnan(cut) else float(items.t[first])
        end = float(items.t[last]) + interval
        end = min(end, next_cut) if not np.isnan(next_cut) else end
        return Hit(rank=0, score=float(scores[best]), path=path, kind="video", id=int(items.id[rows[best]]),
                   start=start, end=max(end, float(items.t[last])), shot=shot)

    def _rows_of_shot(self, path: str, shot: int) -> np.ndarray:
        """The rows of one shot's frames, in time order (the map is built once per Searcher)."""
        if self._shot_rows is None:
            items, groups = self.collection.items, {}
            for r in np.flatnonzero(items.shot >= 0).tolist():
                groups.setdefault((items.path[r], int(items.shot[r])), []).append(r)
            self._shot_rows = {key: np.asarray(sorted(rs, key=lambda r: items.t[r])) for key, rs in groups.items()}
        return self._shot_rows[(path, shot)]

    def _search(self, q: np.ndarray, k: int, kind, query: str | None = None,
                per_video: int | None = None) -> list[list[Hit]]:
        """Hits for query vectors; with videos in the candidates, fetch deeper until k hits remain
        after merging frames into spans."""
        if k < 1:
            raise BadQueryError(f"k must be at least 1, got {k}")
        has_video = len(self._rows_of_kind("video")) > 0 and (kind is None or "video" in self._kinds_of(kind))
        n = len(self._rows_of_kind(kind)) if kind is not None else self.collection.count
        fetch = max(1, min(n, 4 * k if has_video else k))  # n == 0: search_vectors says what is missing
        while True:
            D, I = self.search_vectors(q, fetch, kind, query)
            hits = self.hits(D, I, k, q, query, per_video)
            if not has_video or fetch >= n or all(len(h) >= k for h in hits):
                return hits
            fetch = min(n, 4 * fetch)

    # ---- queries -------------------------------------------------------------------------------
    def _kind(self, kind: str | None, query: str) -> tuple[str, ...] | None:
        """Resolve ``kind`` for a ``query`` of "text" or "image". "auto" searches the other modality
        when the index holds it (text -> photos and video frames, image -> texts), else everything;
        "all"/None searches everything; "image", "video", "text" restrict to that one."""
        present = {k for k in ("image", "video", "text") if len(self._rows_of_kind(k))}
        if kind == "auto":
            other = ("image", "video") if query == "text" else ("text",)
            wanted = tuple(k for k in other if k in present)
            return wanted or None
        if kind in (None, "all"):
            return None
        if kind not in ("image", "video", "text"):
            raise BadQueryError(f"unknown kind {kind!r}: use image, video, text, all or auto")
        return (kind,)

    def search_text(self, text: str, k: int = 10, kind: str | None = "auto", lang: str | None = None) -> list[Hit]:
        return self.search_texts([text], k, kind, lang)[0]

    def embed_texts(self, texts: Sequence[str], lang: str | None = None) -> np.ndarray:
        """Query texts -> vectors, each through the text tower ``lang`` (default: the Searcher's) picks."""
        return embed_texts_with(self.encoder, list(texts), check_lang(lang or self.lang))

    def search_texts(self, texts: Sequence[str], k: int = 10, kind: str | None = "auto",
                     lang: str | None = None) -> list[list[Hit]]:
        """Text -> by default photos and video spans (cross-modal; see ``_kind``), or ``kind``;
        ``lang`` overrides the Searcher's choice of text tower for these queries."""
        if isinstance(texts, str):
            raise TypeError("search_texts takes a list of strings; use search_text for one")
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise BadQueryError("empty query: give some text to search for, or --image PATH")
        return self._search(self.embed_texts(texts, lang), k, self._kind(kind, "text"), "text")

    def search_image(self, image, k: int = 10, kind: str | None = "auto") -> list[Hit]:
        """Image -> texts when the index holds texts, else photos and video frames (``kind``
        overrides). ``image`` is a path or a PIL image; a bad file raises MediaError."""
        if isinstance(image, (str, Path)) and not Path(image).is_file():
            raise PathNotFoundError(f"query image not found: {image}")
        return self._search(self.encoder.embed_images([image]), k, self._kind(kind, "image"), "image")[0]
