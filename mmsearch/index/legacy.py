"""Index files of format 1, which wrote IVF-PQ as ``IdMap2(IndexRefineFlat(IVFPQ))``: they are still
searched as they are (faiss re-ranks them with its own stored copy of the vectors) and rebuilt in the
current layout on their next update (their kind reads "factory", so ``needs_rebuild`` says so)."""

from __future__ import annotations

from dataclasses import replace

from ._faiss import faiss_module
from .params import IndexParams

#: format 1 re-ranked this many candidates per result when its manifest does not say
DEFAULT_K_FACTOR = 10


def is_format1(index) -> bool:
    """Whether ``index`` has the format-1 IVF-PQ layout."""
    faiss = faiss_module()

    return isinstance(index, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(index.index), faiss.IndexRefine)


def adopt(index, params: IndexParams) -> tuple[str, IndexParams]:
    """(kind, params) to search a format-1 ``index`` with: faiss's refine step re-ranks
    ``rerank_factor`` x k candidates, so mmsearch's own re-ranking is off."""
    faiss = faiss_module()

    faiss.downcast_index(index.index).k_factor = float(params.rerank_factor or DEFAULT_K_FACTOR)
    return "factory", replace(params, rerank_factor=1, legacy_refine=True)


def set_nprobe(index, nprobe: int) -> None:
    """Format-1 layout: faiss's refine step takes no per-call IVF parameters, so set nprobe on the index."""
    faiss_module().extract_index_ivf(index).nprobe = int(nprobe)
