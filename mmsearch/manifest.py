"""``<index>/manifest.json``: one definition of every field an index's manifest holds.

The manifest is the commit point of an index (see ``mmsearch.store``): it names the generation
folder that holds the items, the embeddings and the faiss index, and records what a later run needs
to update the index the same way (the model and its weights, the index settings, the video
sampling, the files that failed). ``Manifest.from_json`` reads every manifest written since format
version 1; ``to_json`` writes the current format. Fields this version does not know are kept as they
were (``extra``), so an older mmsearch updating a newer index does not drop them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .config import DEFAULT_FRAME_INTERVAL, DEFAULT_INDEX_MEMORY, IndexSpec
from .errors import IndexFormatError, repair_hint
from .exported import ModelRecord
from .index import parse_size

FORMAT = "mmsearch-index"
FORMAT_VERSION = 2  # 2: IVF indexes hold ids themselves, re-ranked from embeddings.npy; tuned nprobe/efSearch
READABLE_VERSIONS = (1, 2)  # version 1 indexes are searched as they are and rebuilt on their next update
FILES = {"items": "items.parquet", "embeddings": "embeddings.npy", "faiss": "index.faiss"}
GENERATION_NAME = re.compile(r"^gen-\d{6}$")  # committed generation folders


@dataclass(frozen=True)
class IndexedModel(ModelRecord):
    """The model whose vectors the index holds: what ``ModelRecord`` says, plus what the vectors are."""

    dim: int | None = None  # None until the model has been loaded once
    precision: str | None = None  # "fp32" or "int8"; None in indexes made before int8 existed (fp32)

    @classmethod
    def from_record(cls, record: ModelRecord, dim: int | None = None, precision: str | None = None) -> "IndexedModel":
        return cls(record.name, record.pretrained, record.key, record.weights, dim, precision)


@dataclass(frozen=True)
class Failure:
    """A file that could not be used; it is not retried until its size or mtime changes."""

    size: int
    mtime_ns: int
    reason: str

    def same_file(self, size: int, mtime_ns: int) -> bool:
        return self.size == size and self.mtime_ns == mtime_ns


@dataclass(frozen=True)
class Sampling:
    """How a video's frames are sampled: one every ``frame_interval`` seconds, dropping a frame that
    differs from the last kept one by less than ``skip_similar`` grey levels (0: keep all)."""

    frame_interval: float = DEFAULT_FRAME_INTERVAL
    skip_similar: float = 0.0


@dataclass(frozen=True)
class FileSum:
    """A generation file as its commit wrote it: size and CRC-32 of its bytes (``mmsearch doctor``
    compares the file on disk with it; CRC-32 reads at ~2 GB/s, a fraction of the commit's write)."""

    size: int
    crc32: str  # 8 hex digits


@dataclass
class FaissInfo:
    """The faiss index of the generation: its kind and its parameters (as ``VectorIndex.params``)."""

    kind: str | None = None  # None while the index holds no vector
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    model: IndexedModel
    next_id: int = 0  # the next item id to hand out; ids are never reused
    failed: dict[str, Failure] = field(default_factory=dict)  # path -> why it failed
    index_spec: IndexSpec | None = None  # the settings the faiss index is built with (format 1: None)
    video_sampled: dict[str, Sampling] = field(default_factory=dict)  # video path -> how its frames were sampled
    video_sampling: Sampling | None = None  # the sampling of the last run: later runs keep it
    video_modes: dict[str, str] = field(default_factory=dict)  # video path -> "seek" or "decode" (how it was sampled)
    hubness: dict | None = None  # QueryBank.settings() the items' hub values were measured with
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    generation: int = 0  # 0: nothing committed yet
    generation_dir: str | None = None
    count: int = 0
    counts_by_kind: dict[str, int] = field(default_factory=dict)
    dim: int | None = None
    index: FaissInfo = field(default_factory=FaissInfo)
    files: dict[str, str] = field(default_factory=lambda: dict(FILES))
    created: str | None = None
    updated: str | None = None
    roots: list[str] = field(default_factory=list)  # folders indexed (real paths): `serve` sends files from under them only
    index_type: str | None = None  # format 1 kept only this of the index settings
    checksums: dict[str, FileSum] = field(default_factory=dict)  # generation file name -> as committed (older: {})
    previous: str | None = None  # the generation committed before this one, kept for `mmsearch doctor --repair`
    reembed: list[str] = field(default_factory=list)  # folders a repair went back from, still to be indexed again
    extra: dict[str, Any] = field(default_factory=dict)  # fields of a newer format, kept as they were

    # ---- derived facts ---------------------------------------------------------------------------
    @property
    def precision(self) -> str | None:
        """The precision the vectors were embedded at (indexes before int8 existed: fp32); None for
        an index that has never held a vector (its first run picks the model's default)."""
        return self.model.precision or ("fp32" if self.count else None)

    @property
    def spec(self) -> IndexSpec:
        """The index settings this index is built with, memory budget in bytes."""
        return normalise_spec(self.index_spec or IndexSpec(index_type=self.index_type or "auto"))

    # ---- JSON --------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "manifest") -> "Manifest":
        """The manifest of a parsed manifest.json (any readable format version)."""
        if data.get("format") != FORMAT:
            raise IndexFormatError(f"{where} is not an mmsearch index manifest")
        try:
            m = cls._from_json(dict(data))
            m._check_types()
            return m
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            folder = where.rsplit("/", 1)[0] if "/" in where else "DIR"
            raise IndexFormatError(f"{where} is damaged ({type(e).__name__}: {e}): {repair_hint(folder)}") from e

    def _check_types(self) -> None:
        """The schema of the plain fields (a manifest edited or damaged by hand fails here, not later)."""
        def want(name: str, ok: bool) -> None:
            if not ok:
                raise TypeError(f"{name} is {getattr(self, name)!r}")

        for name in ("next_id", "generation", "count", "format_version"):
            want(name, type(getattr(self, name)) is int and getattr(self, name) >= 0)
        for name in ("generation_dir", "previous"):  # a folder inside the index, never a path elsewhere
            want(name, getattr(self, name) is None or bool(GENERATION_NAME.match(str(getattr(self, name)))))
        want("dim", self.dim is None or (type(self.dim) is int and self.dim >= 0))
        want("counts_by_kind", isinstance(self.counts_by_kind, dict))
        want("files", isinstance(self.files, dict))
        for name in ("roots", "reembed"):
            want(name, isinstance(getattr(self, name), list) and all(isinstance(r, str) for r in getattr(self, name)))
        for name in ("created", "updated", "index_type"):
            want(name, getattr(self, name) is None or isinstance(getattr(self, name), str))
        want("generation_dir", self.generation_dir is not None or self.count == 0)
        want("model", all(v is None or isinstance(v, str) for k, v in vars(self.model).items() if k != "dim"))
        want("index", isinstance(self.index.params, dict) and (self.index.kind is None or isinstance(self.index.kind, str)))
        want("hubness", self.hubness is None or _hub_settings(self.hubness))
        want("index_spec", self.index_spec is None or _spec_types(self.index_spec))
        want("video_sampling", self.video_sampling is None or _sampling(self.video_sampling))
        want("video_modes", isinstance(self.video_modes, dict)
             and all(isinstance(p, str) and m in ("seek", "decode") for p, m in self.video_modes.items()))
        want("video_sampled", all(isinstance(p, str) and _sampling(s) for p, s in self.video_sampled.items()))
        want("failed", all(isinstance(p, str) and type(f.size) is int and type(f.mtime_ns) is int
                           and isinstance(f.reason, str) for p, f in self.failed.items()))

    @classmethod
    def _from_json(cls, d: dict[str, Any]) -> "Manifest":
        known_model = {f.name for f in fields(IndexedModel)}
        model = d.pop("model")
        spec = d.pop("index_spec", None)
        known_spec = {f.name for f in fields(IndexSpec)}
        sampling = d.pop("video_sampling", None)
        index = d.pop("index", None) or {}
        sums = d.pop("checksums", None) or {}
        m = cls(
            model=IndexedModel(**{"weights": None, **{k: v for k, v in model.items() if k in known_model}}),
            failed={p: Failure(**f) for p, f in d.pop("failed", {}).items()},
            index_spec=IndexSpec(**{k: v for k, v in spec.items() if k in known_spec}) if spec is not None else None,
            video_sampled={p: Sampling(**s) for p, s in d.pop("video_sampled", {}).items()},
            video_sampling=Sampling(**sampling) if sampling else None,
            index=FaissInfo(index.get("kind"), dict(index.get("params") or {})),
            checksums={str(name): FileSum(int(f["size"]), str(f["crc32"])) for name, f in sums.items()},
        )
        simple = {f.name for f in fields(cls)} - {"model", "failed", "index_spec", "video_sampled",
                                                  "video_sampling", "index", "extra", "checksums"}
        for name in simple & d.keys():
            setattr(m, name, d.pop(name))
        m.extra = d
        return m

    def to_json(self) -> dict[str, Any]:
        """The manifest as manifest.json stores it."""
        out: dict[str, Any] = {
            "model": asdict(self.model),
            "next_id": self.next_id,
            "failed": {p: asdict(f) for p, f in self.failed.items()},
            "index_spec": _spec_json(self.index_spec) if self.index_spec is not None else None,
            "video_sampled": {p: asdict(s) for p, s in self.video_sampled.items()},
            "video_sampling": asdict(self.video_sampling) if self.video_sampling is not None else None,
            "hubness": self.hubness,
            "format": self.format,
            "format_version": self.format_version,
            "generation": self.generation,
            "generation_dir": self.generation_dir,
            "count": self.count,
            "counts_by_kind": self.counts_by_kind,
            "dim": self.dim,
            "index": {"kind": self.index.kind, "params": self.index.params},
            "files": self.files,
            "created": self.created,
            "updated": self.updated,
        }
        if self.roots:
            out["roots"] = self.roots
        if self.index_type is not None:
            out["index_type"] = self.index_type
        if self.checksums:
            out["checksums"] = {name: asdict(f) for name, f in self.checksums.items()}
        if self.previous is not None:
            out["previous"] = self.previous
        if self.reembed:
            out["reembed"] = self.reembed
        if self.video_modes:
            out["video_modes"] = self.video_modes
        if self.index_spec is None:
            del out["index_spec"]
        return {**out, **self.extra}

    def dumps(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2) + "\n").encode()

    def copy(self, **changes) -> "Manifest":
        return replace(self, **changes)


def _number(x, low: float = 0.0) -> bool:
    return type(x) in (int, float) and math.isfinite(x) and x >= low


def _sampling(s: Sampling) -> bool:
    return _number(s.frame_interval) and s.frame_interval > 0 and _number(s.skip_similar)


#: IndexSpec fields added later: written only when set away from their default, so a manifest of an
#: older release reads and writes back unchanged
_LATER_SPEC_FIELDS = ("choose_sample",)


def _spec_json(spec: IndexSpec) -> dict:
    d, default = asdict(spec), IndexSpec()
    return {k: v for k, v in d.items() if k not in _LATER_SPEC_FIELDS or v != getattr(default, k)}


def _spec_types(spec: IndexSpec) -> bool:
    """Each setting of the type its default has (None allowed where the default is None; memory: "4G" or bytes)."""
    for f in fields(IndexSpec):
        v, default = getattr(spec, f.name), f.default
        if f.name == "memory":
            ok = v is None or type(v) in (int, str)
        elif default is None:
            ok = v is None or type(v) is (str if f.name == "factory" else int)
        elif type(default) is float:
            ok = _number(v)
        else:
            ok = type(v) is type(default)
        if not ok:
            return False
    return True


def _hub_settings(h) -> bool:
    """QueryBank.settings() as the manifest stores it: per modality, k >= 1, beta >= 0, a threshold."""
    return isinstance(h, dict) and all(
        m in ("text", "image") and isinstance(s, dict) and type(s.get("k")) is int and s["k"] >= 1
        and _number(s.get("beta")) and _number(s.get("threshold"), -math.inf) for m, s in h.items())


def normalise_spec(spec: IndexSpec) -> IndexSpec:
    """``spec`` with its memory budget in bytes, so "4G" and the default compare equal."""

    return replace(spec, memory=parse_size(spec.memory) or DEFAULT_INDEX_MEMORY)
