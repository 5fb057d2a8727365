"""faiss itself: the lazy import, making an empty index from a plan, and questions about an index's
structure. Every function imports faiss when called, so importing this module stays cheap."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from mmsearch.errors import BadArgumentError

from .plan import IndexPlan


def faiss_module():
    """The faiss module, or one clear error saying how to install it (and that cpu and gpu builds clash)."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(f"faiss is not importable ({e}): pip install 'mmsearch[cpu]' (or 'mmsearch[gpu]' on a "
                          "CUDA machine); if both faiss-cpu and faiss-gpu are installed, uninstall both and "
                          "install one") from None
    return faiss


def faiss_message(e: BaseException) -> str:
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", lines[-1])  # drop faiss's C++ location


def from_factory(d: int, factory: str):
    """A faiss ``index_factory`` index (inner product), in an id map unless it holds ids itself."""
    faiss = faiss_module()

    hint = "use e.g. 'IVF1024,PQ32', 'IVF256,Flat', 'HNSW32' or 'Flat'"
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except (RuntimeError, ValueError) as e:
        raise BadArgumentError(f"bad index factory string {factory!r} for dimension {d} "
                               f"({faiss_message(e)}): {hint}") from None
    if not is_ivf(index) and not isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.IndexIDMap2(index)
    return index


def new_index(plan: IndexPlan, d: int):
    """The empty (untrained) faiss index ``plan`` asks for. IVF indexes hold the item ids themselves;
    the others sit in an ``IndexIDMap2``."""
    faiss = faiss_module()

    if plan.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    if plan.kind == "hnsw":
        return faiss.IndexIDMap2(faiss.IndexHNSWFlat(d, plan.hnsw_m, faiss.METRIC_INNER_PRODUCT))
    if plan.kind == "ivfpq" and plan.codes:
        return from_factory(d, f"IVF{plan.nlist},{plan.codes}")
    if plan.kind in ("ivfflat", "ivfpq"):
        quantizer = faiss.IndexFlatIP(d)
        if plan.kind == "ivfflat":
            index = faiss.IndexIVFFlat(quantizer, d, plan.nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, plan.nlist, plan.m, plan.nbits, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()
        return index
    return from_factory(d, plan.factory)


def seed(index, seed: int) -> None:
    """Seeded k-means everywhere; min_points_per_centroid=1 keeps faiss quiet on small sets."""
    faiss = faiss_module()

    if is_ivf(index):
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        cps = [ivf.cp] + ([ivf.pq.cp] if hasattr(ivf, "pq") else [])
        for cp in cps:
            cp.seed = seed
            cp.min_points_per_centroid = 1
        if hasattr(ivf, "do_polysemous_training"):  # minutes of annealing for codes we never use
            ivf.do_polysemous_training = False


def is_ivf(index) -> bool:
    faiss = faiss_module()

    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def nlist(index) -> int:
    """IVF lists of ``index`` (0: not an IVF index)."""
    return int(faiss_module().extract_index_ivf(index).nlist) if is_ivf(index) else 0


def exact_scores(index) -> bool:
    """Whether ``index`` returns exact inner products (full float vectors, no transform)."""
    faiss = faiss_module()

    inner = index
    while isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    return isinstance(inner, (faiss.IndexFlat, faiss.IndexIVFFlat))


def hnsw(index):
    """The HNSW index inside ``index``, or None."""
    faiss = faiss_module()

    inner = index
    while isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        inner = faiss.downcast_index(inner.index)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def stored_ids(index) -> np.ndarray:
    """The item ids ``index`` holds, sorted int64 (read from its inverted lists or its id map)."""
    faiss = faiss_module()

    if is_ivf(index):
        ivf = faiss.extract_index_ivf(index)
        inv = ivf.invlists
        parts = [faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).copy()
                 for i in range(ivf.nlist) if inv.list_size(i)]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    return np.sort(faiss.vector_to_array(index.id_map).astype(np.int64))


def search_params(index, nprobe: int | None, ef: int | None) -> Any:
    """Per-call search parameters (no shared state, so concurrent searches are safe); None: defaults."""
    faiss = faiss_module()

    if hnsw(index) is not None:
        return faiss.SearchParametersHNSW(efSearch=int(ef)) if ef else None
    if not (is_ivf(index) and nprobe):
        return None
    p = faiss.SearchParametersIVF(nprobe=int(nprobe))
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):  # an HNSW coarse quantizer finds at most efSearch lists
        p.quantizer_params = faiss.SearchParametersHNSW(efSearch=max(int(quantizer.hnsw.efSearch), 2 * int(nprobe)))
    wrappers, inner = [], index
    while isinstance(inner, (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexIDMap2)):
        wrappers.append(inner)
        inner = faiss.downcast_index(inner.index)
    for w in reversed(wrappers):
        if isinstance(w, faiss.IndexPreTransform):
            p = faiss.SearchParametersPreTransform(index_params=p)
    return p


def merge_on_disk(index, shard_paths: list[str], ivfdata: str) -> None:
    """Move the lists of the IVF shards in ``shard_paths`` into the empty trained ``index``, stored in
    one ``ivfdata`` file (faiss.contrib.ondisk: the shards are memory-mapped, not loaded)."""
    faiss_module()
    from faiss.contrib.ondisk import merge_ondisk

    merge_ondisk(index, shard_paths, ivfdata)


def read_on_disk(path: str):
    """An index written after :func:`merge_on_disk`, its lists memory-mapped from the .ivfdata beside it."""
    faiss = faiss_module()

    return faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
