"""The vector index: faiss over L2-normalised float32 vectors, inner-product metric, stable int64 item ids.

Kinds (chosen by :func:`plan_index` from N, d and a memory budget, or forced):

``flat``     exact search (``IndexFlatIP`` in an ``IndexIDMap2``).
``hnsw``     graph search (``IndexHNSWFlat``); exact distances, tuned ``efSearch``; no removal in place.
``ivfflat``  inverted file over full vectors (``IndexIVFFlat``); exact distances, tuned ``nprobe``.
``ivfpq``    inverted file over product-quantised codes (``IndexIVFPQ``, or 4-bit fast-scan
             ``IndexIVFPQFastScan`` when ``choice`` measured it cheaper); its candidates are re-ranked
             exactly with the stored embeddings (``rerank_factor`` x k of them), tuned ``nprobe``.
``factory``  any faiss ``index_factory`` string the user forces; re-ranked unless its codes are exact.

IVF indexes hold the item ids themselves; the others sit in an ``IndexIDMap2``. ``nprobe`` / ``efSearch``
are tuned at build time to reach ``IndexSpec.target_recall`` recall@10 against exact search and kept in
the index's :class:`IndexParams`. ``faiss`` is imported inside functions, so importing this package stays
cheap.

One job per module:

``plan``          :func:`plan_index` -> :class:`IndexPlan`: what to build and why (no numpy, no faiss)
``exact``         :class:`VectorLookup` (stored vectors by id) and :func:`exact_knn`, the one brute-force k-NN
``vector_index``  :class:`VectorIndex`: build, add, remove, search (with exact re-ranking), save, load
``params``        :class:`IndexParams`: what is not in the faiss file, and its manifest JSON
``tuning``        :func:`tune` -> :class:`Tuning`: the search setting reaching the target recall
``choice``        :func:`choose_codes` -> :class:`Choice`: the IVF-PQ code layout, by measurement on a sample
``files``         atomic writes and checked reads of index files
``legacy``        format-1 index files
``gpu``           faiss-gpu: training, adding and searching on a CUDA device
``_faiss``        the faiss import and questions about an index's structure
"""

from __future__ import annotations

from .exact import VectorLookup, exact_knn, exact_topk
from .gpu import gpu_count
from .params import BuildSeconds, IndexParams
from .plan import INDEX_TYPES, KINDS, IndexPlan, parse_size, plan_index, ram_per_vector
from .tuning import Tuning, TuningPoint, tune
from .vector_index import RERANK_MAX, VectorIndex, check_spec

__all__ = ["INDEX_TYPES", "KINDS", "RERANK_MAX", "BuildSeconds", "IndexParams", "IndexPlan", "Tuning",
           "TuningPoint", "VectorIndex", "VectorLookup", "check_spec", "exact_knn", "exact_topk", "gpu_count",
           "parse_size", "plan_index", "ram_per_vector", "tune"]
