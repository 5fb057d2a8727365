"""An exported model folder: what ``mmsearch export`` writes and the ONNX Runtime backend reads.

A folder is self-contained; nothing else is needed to embed with it::

    mmsearch_export.json      this manifest (format, version, the model it came from, sizes, files)
    image.onnx, text.onnx     fp32 graphs: pixels (n, 3, S, S) -> unit vectors; token ids (n, L) -> unit vectors
    image.int8.onnx           the int8 image graph (static QDQ quantisation); int8 runs it with text.onnx
    tokenizer.json            the text tower's tokenizer (``tokenizers``)
    query_bank.safetensors    the model's hubness query bank, when it has one

Exports made the first time a model is used live in the user's cache, one folder per weights
fingerprint: ``~/.cache/mmsearch/onnx/<fingerprint>/`` (``$MMSEARCH_CACHE`` replaces
``~/.cache/mmsearch``). This module imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ._util import atomic_write_bytes
from .errors import ModelLoadError
from .preprocess import ImageConfig, TextConfig

MANIFEST = "mmsearch_export.json"
FORMAT = "mmsearch-onnx-export"
FORMAT_VERSION = 1  # bumped when the graphs' inputs or outputs change: older folders are exported again
PRECISIONS = ("fp32", "int8")
TOKENIZER_FILE = "tokenizer.json"
CACHE_ENV_VAR = "MMSEARCH_CACHE"


def cache_root() -> Path:
    """``$MMSEARCH_CACHE``, else ``~/.cache/mmsearch``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmsearch"


def graph_files(precision: str) -> dict[str, str]:
    """The file name of each tower's graph of one precision, by default."""
    suffix = "" if precision == "fp32" else f".{precision}"
    return {"image": f"image{suffix}.onnx", "text": f"text{suffix}.onnx"}


FP32_GRAPHS = graph_files("fp32")


@dataclass(frozen=True)
class ModelRecord:
    """The model an export came from, as index manifests record it."""

    name: str  # built-in name, open_clip name, hf-hub id or checkpoint folder
    pretrained: str | None  # open_clip pretrained tag or weights file
    key: str  # ModelRef.key(): what index manifests compare
    weights: str | None  # mmsearch.weights.fingerprint of the weights (None: fixed by a registry tag)

    def cache_key(self) -> str:
        """The cache folder name: the weights fingerprint, else a hash of the model key."""
        return self.weights or hashlib.sha1(self.key.encode()).hexdigest()[:16]


@dataclass
class ExportManifest:
    """The contents of ``mmsearch_export.json``."""

    model: ModelRecord
    dim: int  # embedding size
    image: ImageConfig
    text: TextConfig
    graphs: dict[str, dict[str, str]] = field(default_factory=lambda: {"fp32": dict(FP32_GRAPHS)})  # precision ->
    # {"image": file, "text": file}; int8 pairs image.int8.onnx with the fp32 text graph
    calibration: dict | None = None  # int8: the pairs it was calibrated on and how many
    exporter: str = ""  # torch / onnx versions that wrote the graphs
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def precisions(self) -> list[str]:
        return list(self.graphs)

    def to_json(self) -> str:
        d = {"format": self.format, "format_version": self.format_version, "model": vars(self.model),
             "dim": self.dim, "image": self.image.to_dict(), "text": self.text.to_dict(),
             "graphs": self.graphs, "calibration": self.calibration, "exporter": self.exporter}
        return json.dumps(d, indent=2) + "\n"

    def save(self, folder: str | os.PathLike) -> None:
        atomic_write_bytes(Path(folder) / MANIFEST, self.to_json().encode())

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ExportManifest":
        """Read and check a folder's manifest; ModelLoadError (one line, what to do) when unusable."""
        path = Path(folder) / MANIFEST
        redo = "export it again with `mmsearch export MODEL --out DIR`"
        try:
            d = json.loads(path.read_text())
            if d.get("format") != FORMAT:
                raise ModelLoadError(f"{path} is not an mmsearch export manifest: {redo}")
            if d.get("format_version") != FORMAT_VERSION:
                raise ModelLoadError(f"{folder} is an export of format {d.get('format_version')}, this mmsearch "
                                     f"reads {FORMAT_VERSION}: {redo}")
            m = cls(model=ModelRecord(**d["model"]), dim=int(d["dim"]), image=ImageConfig.from_dict(d["image"]),
                    text=TextConfig.from_dict(d["text"]), graphs={p: dict(g) for p, g in d["graphs"].items()},
                    calibration=d.get("calibration"), exporter=d.get("exporter", ""))
        except FileNotFoundError:
            raise ModelLoadError(f"{folder} is not an exported model (no {MANIFEST}): {redo}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if isinstance(e, ModelLoadError):
                raise
            raise ModelLoadError(f"{path} is damaged ({type(e).__name__}: {str(e)[:80]}): {redo}") from None
        for files in m.graphs.values():
            missing = [f for f in [*files.values(), TOKENIZER_FILE] if not (Path(folder) / f).is_file()]
            if missing:
                raise ModelLoadError(f"exported model {folder} lacks {', '.join(missing)}: {redo}")
        return m


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding an export manifest."""
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def holds_export_of(folder: str | os.PathLike, record: ModelRecord) -> bool:
    """Whether ``folder`` holds a usable export (this format) of the weights ``record`` names."""
    if not is_export(folder):
        return False
    try:
        m = ExportManifest.load(folder)
    except ModelLoadError:
        return False  # an older format or a damaged folder: to be exported again
    return m.model.weights == record.weights and (record.weights is not None or m.model.key == record.key)


def cache_folder(record: ModelRecord) -> Path:
    """Where the cache keeps the export of these weights."""
    return cache_root() / "onnx" / record.cache_key()


def cached_export(record: ModelRecord) -> Path | None:
    """The cache folder holding a usable export of these weights, or None."""
    folder = cache_folder(record)
    return folder if holds_export_of(folder, record) else None
