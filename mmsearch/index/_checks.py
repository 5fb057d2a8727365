"""Input checks shared by the index modules: vectors, queries and item ids from callers."""

from __future__ import annotations

import numpy as np


def as_matrix(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 2-D array with finite values, else ValueError."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (n, d), got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or inf values: re-embed the affected items")
    return x


def check_ids(ids: np.ndarray, n: int) -> np.ndarray:
    """``ids`` as n unique non-negative int64 item ids, else ValueError."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) != n:
        raise ValueError(f"ids must have shape ({n},) to match the vectors, got {ids.shape}")
    if n and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(np.unique(ids)) != n:
        raise ValueError(f"ids contain {n - len(np.unique(ids))} duplicate(s): every item needs a unique id")
    if (ids < 0).any():
        raise ValueError("ids must be non-negative (faiss uses -1 for 'no result')")
    return ids


def check_new_ids(ids: np.ndarray, n: int, stored: np.ndarray) -> np.ndarray:
    """``ids`` as n int64 item ids that are unique, non-negative and not in ``stored``, else ValueError."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) != n or (len(ids) and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"ids must be {n} integers to match the vectors, got shape {ids.shape}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    clash = np.intersect1d(ids, stored)
    if len(np.unique(ids)) != len(ids) or len(clash):
        raise ValueError(f"ids must be new and unique: {clash[:5].tolist() or 'duplicates in the batch'}")
    if (ids < 0).any():
        raise ValueError("ids must be non-negative (faiss uses -1 for 'no result')")
    return ids
