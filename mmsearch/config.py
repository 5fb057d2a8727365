"""Dataclasses holding every tunable of mmsearch, with its default: the one home of defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

#: the default built-in offline model (EfficientNet-Lite2 + all-MiniLM-L6-v2 trained on Flickr8k; see mmsearch.models)
DEFAULT_MODEL = "mmsearch-lite2"

#: where `mmsearch index` / `mmsearch query` keep the index when no --index / MMSEARCH_INDEX is given
DEFAULT_INDEX_DIR = Path("indexes") / "default"

#: environment variable naming the index folder
INDEX_ENV_VAR = "MMSEARCH_INDEX"

#: file extensions (lower case) treated as images
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

#: file extensions (lower case) treated as videos (decoded with PyAV)
VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".avi", ".mov", ".mkv", ".m4v"})

#: video sampling of an index that was never told otherwise
DEFAULT_FRAME_INTERVAL = 1.0

#: images with more pixels than this are skipped (decompression-bomb guard)
MAX_IMAGE_PIXELS = 100_000_000


def default_index_dir() -> Path:
    """The index folder to use when the caller names none: $MMSEARCH_INDEX, else ./indexes/default."""
    env = os.environ.get(INDEX_ENV_VAR)
    return Path(env) if env else DEFAULT_INDEX_DIR


@dataclass(frozen=True)
class ModelRef:
    """Which model embeds images and texts."""

    name: str = DEFAULT_MODEL  # open_clip model name, "hf-hub:org/repo", a local checkpoint folder, or "mmsearch-lite"
    pretrained: str | None = None  # open_clip pretrained tag (e.g. "laion2b_s34b_b79k") or a weights file path
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None picks cuda when available

    def key(self) -> str:
        """A stable string naming the weights, stored in the manifest to detect mismatches."""
        name = self.name
        if os.path.isdir(name):
            name = os.path.abspath(name)
        return f"{name}@{self.pretrained}" if self.pretrained else name


#: RAM the faiss index may use when no --memory is given (the index only; embeddings are memory-mapped)
DEFAULT_INDEX_MEMORY = 4 * 2**30


@dataclass(frozen=True)
class IndexSpec:
    """How the faiss index is chosen, built and tuned (see mmsearch.index.plan_index)."""

    index_type: str = "auto"  # "auto", "flat" (exact), "hnsw", "ivfflat" or "ivfpq" (IVF-PQ + exact re-rank)
    factory: str | None = None  # a faiss index_factory string ("IVF4096,PQ32", "HNSW32"); overrides index_type
    memory: int | str | None = None  # RAM budget for the index ("4G" or bytes); None = DEFAULT_INDEX_MEMORY
    flat_max: int = 50_000  # "auto" stays exact up to this many vectors (exact search over 50k x 256 is a few ms)
    ivfflat_max: int = 1_000_000  # "auto" uses IVF-Flat below this many vectors when they fit the budget, else IVF-PQ
    pq_m: int | None = None  # PQ sub-quantizers; None = largest of 64/48/32/24/16/8 dividing d that fits the budget
    nlist: int | None = None  # IVF lists; None = 2**round(log2(4*sqrt(N))), capped so each list trains on >= 39 points
    train_per_list: int = 64  # k-means trains on at most this many sampled vectors per list (at least 39)
    hnsw_m: int = 32  # HNSW graph degree
    nprobe: int | None = None  # IVF lists visited per query; None = tuned at build time to target_recall
    ef_search: int | None = None  # HNSW search breadth; None = tuned at build time to target_recall
    target_recall: float = 0.95  # tuning goal: recall@10 against exact search
    tune_queries: int = 500  # stored vectors used as held-out tuning queries (their own entry left out)
    rerank_factor: int = 4  # lossy indexes return k * rerank_factor candidates, re-ranked with exact vectors
    choose_sample: int = 25_000  # "auto" IVF-PQ: code layouts are tried on this many stored vectors; 0 = plain PQ
    growth_rebuild: float = 4.0  # retrain an IVF index once the collection is this many times what it was trained on
    gpu: str = "auto"  # "auto": faiss on the GPU when faiss-gpu sees one (training, adding, search); "never"
    seed: int = 1234  # k-means / sampling seed, so builds are reproducible


@dataclass(frozen=True)
class RayOptions:
    """Embedding on a Ray cluster (``mmsearch index --ray``): see mmsearch.scale."""

    address: str | None = None  # a cluster to join ("auto", "ray://host:10001", "local": a new one); None: Ray's rule
    # (RAY_ADDRESS, else a cluster running on this machine, else a new local one)
    workers: int | None = None  # embedding actors, each loading the model once; None: fit to the cluster's CPUs
    cpus_per_worker: float | None = None  # None: the cluster's CPUs shared so the read tasks keep one free
    gpus_per_worker: float = 0.0  # > 0: the actors embed on GPUs (ONNX Runtime's CUDA provider)
    scratch: str | None = None  # folder every node can write for the parquet shards; None: inside the index folder


@dataclass(frozen=True)
class IndexingConfig:
    """How `mmsearch index` reads and embeds files."""

    batch_size: int = 32  # images embedded per forward pass
    backend: str = "auto"  # "auto" (ONNX Runtime when the model has an export), "onnx" or "torch"
    precision: str | None = None  # "fp32" or "int8" (ONNX only); None: the index's, else the model's default
    commit_every: int = 2048  # commit embedded images to disk this often, so a killed run keeps its work
    max_pixels: int = MAX_IMAGE_PIXELS  # larger images are skipped with a warning
    follow_symlinks: bool = True  # follow links to files and folders (loops are detected and skipped)
    extensions: frozenset[str] = field(default=IMAGE_EXTENSIONS)  # what counts as an image
    video_extensions: frozenset[str] = field(default=VIDEO_EXTENSIONS)  # what counts as a video
    frame_interval: float | None = None  # seconds between sampled video frames; None: the index's last setting, else 1
    skip_similar: float | None = None  # drop frames this close (mean grey levels, 16x16) to the last kept one; 0 = off;
    # None: the index's last setting, else off
    ray: RayOptions | None = None  # embed on a Ray cluster instead of this process (the `ray` extra)
    decode_threads: int | None = None  # threads decoding images ahead of the model; None: one per core
    lang: str = "auto"  # text tower of indexed texts: "auto" by each text's language (mmsearch.lang), "en" or "multi"


@dataclass(frozen=True)
class TrainConfig:
    """InfoNCE training (``mmsearch train``): heads on cached tower features, optionally unlocked layers."""

    epochs: int = 150  # upper bound; early stopping may end sooner
    batch_size: int = 512  # image-caption pairs per step (one caption per image per step)
    lr: float = 2e-3  # AdamW peak learning rate, cosine decay after warmup
    weight_decay: float = 0.1  # AdamW weight decay on head weights
    warmup_steps: int = 50  # linear learning-rate warmup
    patience: int = 15  # stop after this many epochs without a better validation score
    init_temperature: float = 0.07  # initial softmax temperature (learnable)
    tower_lr_scale: float = 0.01  # unlocked tower layers learn at lr * this (pretrained weights need small steps)
    feature_dropout: float = 0.5  # dropout on the cached tower features fed to the heads (6k images overfit fast)
    captions_per_step: int = 1  # captions of each image per step, one InfoNCE term each (cached-tower training)
    flip_views: bool = False  # also cache mirrored images' features; each step picks a view (cached-tower training)
    zoom_views: bool = False  # also cache features of the images' central 1/1.125 (and mirrored, with flip_views)
    seed: int = 0  # shuffling, caption sampling and head initialisation
    query_bank: int = 2000  # training images (one caption each) saved as the model's hubness query bank; 0 = none
