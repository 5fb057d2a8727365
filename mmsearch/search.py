"""Query layer: text -> image, image -> image and image -> text search over a built index.

The Searcher depends on "something that embeds" (``embed_texts`` / ``embed_images`` returning
normalised float32 rows), not on torch itself, so a lighter backend can drop in later.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import BadQueryError, EmptyIndexError, ModelMismatchError
from .store import Collection

EXACT_FILTER_MAX = 50_000  # a modality with at most this many items is searched exactly when filtered


@dataclass(frozen=True)
class Hit:
    rank: int  # 1-based
    score: float  # cosine similarity (inner product of unit vectors)
    path: str  # absolute path of the item ("<file>#<line>" for texts)
    kind: str  # "image" or "text"
    id: int  # stable item id
    text: str | None = None  # the text, for kind "text"

    def to_dict(self) -> dict:
        return asdict(self)


class Searcher:
    """Search one index. ``Searcher("indexes/default").search_text("a dog", k=5)``.

    The encoder defaults to the model recorded in the index manifest, loaded on first query.
    """

    def __init__(self, index: str | os.PathLike | Collection, encoder=None, nprobe: int | None = None,
                 ef_search: int | None = None, rerank_factor: int | None = None, gpu: bool | None = None) -> None:
        """``nprobe`` / ``ef_search`` / ``rerank_factor`` override the values tuned at build time for
        every query; ``gpu`` (None: when faiss-gpu sees a CUDA device) searches the index on the GPU."""
        self.collection = index if isinstance(index, Collection) else Collection.open(index, load_index=True)
        self.search_options = {"nprobe": nprobe, "ef_search": ef_search, "rerank_factor": rerank_factor}
        if self.collection.count == 0:
            raise EmptyIndexError(
                f"index {self.collection.path} is empty: add images with `mmsearch index FOLDER`"
            )
        if encoder is not None:
            key = self.collection.model["key"]
            if getattr(encoder, "name", key) != key:
                raise ModelMismatchError(
                    f"index {self.collection.path} was built with model {key!r}, the encoder is "
                    f"{encoder.name!r}: load the index's model or rebuild the index"
                )
        self._encoder = encoder
        self.on_gpu = False
        if gpu or (gpu is None and self.collection.count > EXACT_FILTER_MAX):
            from .index import gpu_count

            if gpu_count():
                self.on_gpu = self.collection.index.to_gpu()
        self._kinds: np.ndarray | None = None  # items' kinds as an array, built on first filtered query
        self._kind_rows: dict[str, np.ndarray] = {}

    @property
    def encoder(self):
        if self._encoder is None:
            from .encoder import get_encoder

            m = self.collection.model
            self._encoder = get_encoder(m["name"], pretrained=m["pretrained"])
        return self._encoder

    # ---- numpy in, numpy out -------------------------------------------------------------------
    def search_vectors(self, queries: np.ndarray, k: int = 10, kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(q, d) normalised float32 queries -> (D, I): scores and item ids, best first.

        ``kind`` ("image", "text") restricts results to items of that modality. At most
        ``min(k, number of candidates)`` columns; never padded with -1.
        """
        if k < 1:
            raise BadQueryError(f"k must be at least 1, got {k}")
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        kinds = self.collection.items.kind
        rows = self._rows_of_kind(kind) if kind is not None else None
        opts = {key: v for key, v in self.search_options.items() if v is not None}
        if rows is None or len(rows) == len(kinds):
            return self.collection.index.search(q, k, **opts)
        if len(rows) == 0:
            have = ", ".join(sorted(set(kinds)))
            raise EmptyIndexError(f"index {self.collection.path} holds no {kind} items (it has: {have})")
        k = min(k, len(rows))
        if len(rows) > EXACT_FILTER_MAX:
            # a large share of a large index: over-fetch from the ANN index and keep that modality
            n = len(kinds)
            D, I = self.collection.index.search(q, min(n, k + int(np.ceil(2 * k * n / len(rows)))), **opts)
            wanted = (self._kind_array()[self.collection.rows_of(I)] == kind).reshape(I.shape)
            if (wanted.sum(1) >= k).all():
                cols = np.argsort(~wanted, axis=1, kind="stable")[:, :k]  # first k wanted, order kept
                return np.take_along_axis(D, cols, 1), np.take_along_axis(I, cols, 1)
        # exact search over that modality's vectors: a filter never returns fewer than asked
        from .index import VectorLookup, exact_topk

        lookup = VectorLookup(self.collection.embeddings[rows], self.collection.items.id[rows])
        I = exact_topk(q, lookup, k)
        D = np.einsum("qkd,qd->qk", self.collection.lookup.get(I), q)
        return D.astype(np.float32), I

    def _kind_array(self) -> np.ndarray:
        if self._kinds is None:
            self._kinds = np.asarray(self.collection.items.kind, dtype=object)
        return self._kinds

    def _rows_of_kind(self, kind: str) -> np.ndarray:
        if kind not in self._kind_rows:
            self._kind_rows[kind] = np.flatnonzero(self._kind_array() == kind)
        return self._kind_rows[kind]

    def hits(self, D: np.ndarray, I: np.ndarray) -> list[list[Hit]]:
        """Turn search results into Hit lists (one per query)."""
        items = self.collection.items
        out = []
        for scores, ids in zip(D, I):
            rows = self.collection.rows_of(ids)
            out.append([
                Hit(rank=r + 1, score=float(s), path=items.path[row], kind=items.kind[row], id=int(i),
                    text=items.text[row])
                for r, (s, i, row) in enumerate(zip(scores, ids, rows))
            ])
        return out

    # ---- queries -------------------------------------------------------------------------------
    def _kind(self, kind: str | None, other: str) -> str | None:
        """Resolve ``kind``: "auto" searches the other modality when the index holds any (text ->
        images, image -> texts), else everything; "all"/None searches everything."""
        if kind == "auto":
            return other if len(self._rows_of_kind(other)) else None
        if kind in (None, "all"):
            return None
        if kind not in ("image", "text"):
            raise BadQueryError(f"unknown kind {kind!r}: use image, text, all or auto")
        return kind

    def search_text(self, text: str, k: int = 10, kind: str | None = "auto") -> list[Hit]:
        return self.search_texts([text], k, kind)[0]

    def search_texts(self, texts: Sequence[str], k: int = 10, kind: str | None = "auto") -> list[list[Hit]]:
        """Text -> by default images (cross-modal; see ``_kind``), or ``kind`` "text" / "all"."""
        if isinstance(texts, str):
            raise TypeError("search_texts takes a list of strings; use search_text for one")
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise BadQueryError("empty query: give some text to search for, or --image PATH")
        return self.hits(*self.search_vectors(self.encoder.embed_texts(list(texts)), k, self._kind(kind, "image")))

    def search_image(self, image, k: int = 10, kind: str | None = "auto") -> list[Hit]:
        """Image -> texts when the index holds texts, else images (``kind`` overrides: "image",
        "text", "all"). ``image`` is a path or a PIL image; a bad file raises MediaError."""
        if isinstance(image, (str, Path)) and not Path(image).is_file():
            raise FileNotFoundError(f"query image not found: {image}")
        return self.hits(*self.search_vectors(self.encoder.embed_images([image]), k, self._kind(kind, "text")))[0]
