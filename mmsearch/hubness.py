"""Hubness correction for cross-modal search, measured with a query bank (numpy only).

In a shared image-text space some items are hubs: close to very many queries, so they crowd the top
of unrelated result lists. A query bank, embeddings of typical queries of each modality (for a
trained model: captions and photos of its training pairs), measures this per item: ``hub(x)`` is the
mean cosine of x to its ``k`` nearest bank queries. A cross-modal query (text -> photos and video
frames, photo -> texts) then ranks items by

    score(q, x) = cos(q, x) - beta * max(0, hub(x) - threshold)

This is the CSLS score (Conneau et al. 2018, "Word translation without parallel data") with the
query side dropped (it is the same for every item of one query), as in querybank normalisation
(Bogolin et al. 2022), and one-sided: items are only ever pushed down, never lifted above their
cosine. Lifting items with a low hub value (frames of a blank wall, far from every caption) would
rank unusual content above what a query asks for. ``hub(x)`` depends on the item only, so it is
computed once at index time and stored with it; a search over-fetches by plain cosine and re-ranks
exactly (``rerank``). ``k``, ``beta`` and ``threshold`` (a percentile of the calibration items' hub
values) are chosen on validation pairs (``calibrate``); beta 0 means the correction did not help
and is off.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ._util import atomic_write_bytes
from .errors import ModelLoadError
from .metrics import recall_at_k

BANK_FORMAT = "mmsearch-query-bank"
BANK_FORMAT_VERSION = 1
#: item kind -> the query modality whose bank measures its hubness (the modality that searches it cross-modally)
QUERY_OF = {"image": "text", "video": "text", "text": "image"}
KS = (5, 10, 20, 50)  # bank neighbours tried by calibrate
BETAS = tuple(round(0.1 * i, 1) for i in range(11))  # correction weights tried by calibrate (0 = off)
PERCENTILES = (25, 50, 75)  # thresholds tried by calibrate: these percentiles of the calibration items' hub values
CALIBRATION_IMAGES = 1000  # calibrate scores at most this many validation images (and their captions)
MIN_CALIBRATION_IMAGES = 100  # with fewer validation images the settings would fit noise: the correction stays off
CHUNK = 4096  # items per block when scoring against a bank: memory stays O(CHUNK * bank size)


def mean_topk(bank: np.ndarray, emb: np.ndarray, k: int) -> np.ndarray:
    """(n,) float32: each row of ``emb``'s mean cosine to its ``k`` nearest rows of ``bank``."""
    emb = np.asarray(emb, dtype=np.float32)
    out = np.empty(len(emb), np.float32)
    k = min(k, len(bank))
    for s in range(0, len(emb), CHUNK):
        sim = emb[s : s + CHUNK] @ bank.T
        out[s : s + CHUNK] = np.partition(sim, sim.shape[1] - k, axis=1)[:, -k:].mean(1)
    return out


@dataclass(frozen=True)
class Side:
    """The bank of one query modality and how its correction is weighted."""

    k: int  # bank neighbours averaged into an item's hub value
    beta: float  # correction weight; 0 = off
    threshold: float  # items whose hub value exceeds this are pushed down by beta times the excess


class QueryBank:
    """Banks of query embeddings per modality ("text", "image") with their calibrated ``Side``."""

    def __init__(self, vectors: dict[str, np.ndarray], sides: dict[str, Side], weights: str | None = None) -> None:
        if set(vectors) != set(sides) or not set(vectors) <= {"text", "image"}:
            raise ValueError("a query bank holds 'text' and/or 'image' vectors, each with its settings")
        import hashlib

        self.vectors = {m: np.ascontiguousarray(v, dtype=np.float32) for m, v in vectors.items()}
        self.sides = dict(sides)
        self.weights = weights  # fingerprint of the model weights the bank was embedded with
        # which vectors (and k) the hub values of an index came from: they are measured again when these change
        self.digests = {m: hashlib.sha1(v.astype(np.float16).tobytes() + str(sides[m].k).encode()).hexdigest()[:16]
                        for m, v in self.vectors.items()}

    def hubs(self, emb: np.ndarray, kinds: Sequence[str]) -> np.ndarray:
        """(n,) float32 hub values of items with these embeddings and kinds (NaN where the bank has no
        queries of the modality that searches that kind)."""
        kinds = np.asarray(kinds, dtype=object)
        out = np.full(len(kinds), np.nan, np.float32)
        for modality, side in self.sides.items():
            rows = np.flatnonzero([QUERY_OF.get(k) == modality for k in kinds])
            if len(rows):
                out[rows] = mean_topk(self.vectors[modality], np.asarray(emb)[rows], side.k)
        return out

    def settings(self) -> dict:
        """What an index manifest records: {query modality: {"k", "beta", "threshold", "bank", "digest"}}."""
        return {m: dict(asdict(s), bank=int(len(self.vectors[m])), digest=self.digests[m]) for m, s in self.sides.items()}

    # ---- on disk -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank as safetensors (float16 vectors; settings and format in the metadata), atomically."""
        from safetensors.numpy import save

        path = Path(path)
        meta = {"format": BANK_FORMAT, "format_version": str(BANK_FORMAT_VERSION),
                "sides": json.dumps({m: asdict(s) for m, s in self.sides.items()}), "weights": self.weights or ""}
        atomic_write_bytes(path, save({m: v.astype(np.float16) for m, v in self.vectors.items()}, metadata=meta))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QueryBank":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "numpy") as f:
                meta = f.metadata() or {}
                if meta.get("format") != BANK_FORMAT:
                    raise ValueError("not an mmsearch query bank")
                if meta.get("format_version") != str(BANK_FORMAT_VERSION):
                    raise ValueError(f"format version {meta.get('format_version')}, this mmsearch reads "
                                     f"{BANK_FORMAT_VERSION}")
                sides = {m: Side(**s) for m, s in json.loads(meta["sides"]).items()}
                vectors = {m: f.get_tensor(m).astype(np.float32) for m in sides}
            _check_bank(sides, vectors)
            return cls(vectors, sides, meta.get("weights") or None)
        except Exception as e:  # safetensors raises its own errors for truncated or foreign files
            reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise ModelLoadError(f"query bank {path} is unreadable ({reason}): "
                                 "rebuild it (`mmsearch train` writes one) or delete it") from e

    @property
    def dim(self) -> int:
        """The dimension of the bank's vectors (the model's embedding size)."""
        return next(iter(self.vectors.values())).shape[1]


def _check_bank(sides: dict[str, Side], vectors: dict[str, np.ndarray]) -> None:
    """ValueError unless a loaded bank's settings and vectors are what ``save`` writes: a damaged bank
    would otherwise fail while measuring an index's items, or poison its manifest's settings."""
    if not sides:
        raise ValueError("it holds no query modality")
    for m, side in sides.items():
        if isinstance(side.k, bool) or not isinstance(side.k, int) or side.k < 1:
            raise ValueError(f"{m}: k must be a positive integer, not {side.k!r}")
        for name in ("beta", "threshold"):
            value = getattr(side, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{m}: {name} must be a finite number, not {value!r}")
        if side.beta < 0:  # a correction never lifts a score (``rerank`` relies on it)
            raise ValueError(f"{m}: beta must not be negative, not {side.beta!r}")
        if vectors[m].ndim != 2 or not vectors[m].size:
            raise ValueError(f"{m}: vectors of shape {vectors[m].shape}, not (n, d)")
        if not np.isfinite(vectors[m]).all():
            raise ValueError(f"{m}: vectors hold NaN or infinite values")
    if len({v.shape[1] for v in vectors.values()}) != 1:
        raise ValueError("its modalities' vectors differ in dimension")


# ---- search --------------------------------------------------------------------------------------
def damping(hubs: np.ndarray, beta: float, threshold: float) -> np.ndarray:
    """``-beta * max(0, hub - threshold)``: the (never positive) score change of items with these hub
    values; 0 where a hub value is unknown (NaN)."""
    excess = np.nan_to_num(np.asarray(hubs, np.float32) - np.float32(threshold), nan=0.0)
    return (-np.float32(beta) * np.maximum(excess, 0)).astype(np.float32)


def corrections(hubs: np.ndarray, kinds: Sequence[str], query: str, settings: dict) -> np.ndarray | None:
    """Per-item additive score corrections (<= 0) for a query of modality ``query`` ("text" or
    "image"): ``damping`` for the items that query searches cross-modally, 0 elsewhere. None when
    the settings hold no correction for that query."""
    side = (settings or {}).get(query)
    if not side or not side.get("beta"):
        return None
    crossed = np.array([QUERY_OF.get(k) == query for k in kinds], dtype=bool)
    return np.where(crossed, damping(hubs, side["beta"], side["threshold"]), np.float32(0)).astype(np.float32)


def rerank(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int,
           n: int, correction_of: Callable[[np.ndarray], np.ndarray], max_correction: float
           ) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of ``n`` candidates by corrected score, from a ``search(q, depth)`` that ranks by
    plain score: fetch deeper (x4) until no unfetched candidate can beat the k-th corrected score.
    An unfetched one scores at most the last fetched plain score plus ``max_correction``, so the
    result is what scoring all ``n`` with the correction would give (for the ranking ``search`` has).
    ``correction_of(ids)`` maps an id array to its corrections."""
    q = np.atleast_2d(queries)
    depth = min(n, max(4 * k, k + 32))
    while True:
        D, I = search(q, depth)
        adjusted = D + correction_of(I).reshape(I.shape)
        order = np.argsort(-adjusted, axis=1, kind="stable")[:, :k]
        top_d, top_i = np.take_along_axis(adjusted, order, 1), np.take_along_axis(I, order, 1)
        if depth >= n or I.shape[1] < depth:
            return top_d.astype(np.float32), top_i
        kth = top_d[:, -1] if top_d.shape[1] == k else np.full(len(q), -np.inf)
        if (D[:, -1] + max_correction <= kth).all():
            return top_d.astype(np.float32), top_i
        depth = min(n, 4 * depth)


# ---- calibration ---------------------------------------------------------------------------------
def calibrate(val_img: np.ndarray, val_txt: np.ndarray, owner: Sequence[int], bank_img: np.ndarray,
              bank_txt: np.ndarray, weights: str | None = None, ks: Sequence[int] = KS,
              betas: Sequence[float] = BETAS, percentiles: Sequence[float] = PERCENTILES) -> QueryBank:
    """Choose ``k``, ``beta`` and ``threshold`` of each side on validation pairs (text -> image recall
    for the text bank, image -> text recall for the image bank; sum of recall@1/5/10), the banks
    being other images and captions (training pairs, never the validation ones). At most
    CALIBRATION_IMAGES validation images (the first ones) and their captions are used; with fewer
    than MIN_CALIBRATION_IMAGES the correction stays off (beta 0)."""

    owner = np.asarray(owner, np.int64)
    n = min(len(val_img), CALIBRATION_IMAGES)
    tried = ks if n >= MIN_CALIBRATION_IMAGES else ()  # none tried: every side keeps beta 0
    keep = owner < n
    val_img, val_txt, owner = val_img[:n], val_txt[keep], owner[keep]
    sides = {}
    # the text bank damps images (text -> image recall), the image bank texts (image -> text recall)
    for modality, bank, items, direction, bias in (("text", bank_txt, val_img, "t2i", "image_bias"),
                                                   ("image", bank_img, val_txt, "i2t", "text_bias")):
        def score(damp=None):
            return sum(recall_at_k(val_img, val_txt, owner, **{bias: damp})[direction].values())

        best = (score(), Side(k=int(ks[0]), beta=0.0, threshold=0.0))  # off, unless it helps
        for k in tried:
            hub = mean_topk(bank, items, k)
            for pct in percentiles:
                threshold = float(np.percentile(hub, pct))
                for beta in betas:
                    if beta == 0:
                        continue
                    s = score(damping(hub, beta, threshold))
                    if s > best[0] + 1e-9:
                        best = (s, Side(k=int(k), beta=float(beta), threshold=threshold))
        sides[modality] = best[1]
    return QueryBank({"text": bank_txt, "image": bank_img}, sides, weights)
