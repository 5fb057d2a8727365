"""faiss on a CUDA device (faiss-gpu): k-means training, adding, searching. The trained and filled
index always lives on the CPU (that is what is saved); a GPU copy only ever speeds things up."""

from __future__ import annotations

import numpy as np

from mmsearch.config import IndexSpec
from mmsearch.errors import BadArgumentError

from ._faiss import faiss_message, faiss_module, is_ivf

#: faiss GPU indexes search with k and nprobe up to this; beyond it the CPU index answers
GPU_MAX_K = 2048

_GPU_RES = None


def gpu_count() -> int:
    """CUDA devices faiss can use (0 with faiss-cpu)."""
    faiss = faiss_module()

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def use_gpu(spec: IndexSpec) -> bool:
    return spec.gpu != "never" and gpu_count() > 0


def gpu_resources():
    faiss = faiss_module()

    global _GPU_RES
    if _GPU_RES is None:
        _GPU_RES = faiss.StandardGpuResources()
    return _GPU_RES


def gpu_cloner_options(m: int | None):
    faiss = faiss_module()

    co = faiss.GpuClonerOptions()
    co.useFloat16 = bool(m and m > 48)  # GpuIndexIVFPQ needs float16 lookup tables beyond m=48
    return co


def train(index, train: np.ndarray, gpu: bool) -> None:
    """Train ``index`` on ``train``; with ``gpu``, IVF k-means assigns on the GPU."""
    faiss = faiss_module()

    if gpu and is_ivf(index):  # k-means assignment on the GPU; the trained index stays on the CPU
        ivf = faiss.extract_index_ivf(index)
        ivf.clustering_index = faiss.index_cpu_to_gpu(gpu_resources(), 0, faiss.IndexFlatIP(ivf.d))
    try:
        index.train(train)
    except RuntimeError as e:
        raise BadArgumentError(f"cannot train the index on {len(train)} vectors ({faiss_message(e)}): "
                               "use fewer lists (--index-factory) or add more items") from None
    if gpu and is_ivf(index):
        faiss.extract_index_ivf(index).clustering_index = None


def add_on_gpu(index, x: np.ndarray, ids: np.ndarray, m: int | None):
    """``index`` (CPU) with ``x`` added under ``ids`` on the GPU, or None if the GPU does not take its
    layout (then add on the CPU: same result)."""
    faiss = faiss_module()

    try:
        g = faiss.index_cpu_to_gpu(gpu_resources(), 0, index, gpu_cloner_options(m))
        g.add_with_ids(x, ids)
        return faiss.index_gpu_to_cpu(g)
    except RuntimeError:
        return None


def gpu_copy(index, m: int | None):
    """A GPU copy of ``index`` to search with, or None (no device, or a layout the GPU does not take)."""
    faiss = faiss_module()

    if gpu_count() == 0:
        return None
    try:
        return faiss.index_cpu_to_gpu(gpu_resources(), 0, index, gpu_cloner_options(m))
    except RuntimeError:
        return None
