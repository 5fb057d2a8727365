"""The parameters of a built index (:class:`IndexParams`): its plan, the search settings tuning chose,
how it was built; and their JSON form, the ``index.params`` of a manifest."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .choice import Choice
from .plan import IndexPlan
from .tuning import Tuning


@dataclass(frozen=True)
class BuildSeconds:
    """Wall-clock seconds of each build step."""

    train: float
    add: float
    tune: float

    def to_json(self) -> dict[str, float]:
        return {"train": self.train, "add": self.add, "tune": self.tune}


# the keys IndexParams itself reads from a manifest, besides the plan's
_OWN = ("gpu_build", "nprobe", "ef_search", "rerank_factor", "tuning", "build_seconds", "legacy_refine", "choice")


@dataclass(frozen=True)
class IndexParams:
    """Everything about a faiss index that is not in the faiss file. A None field was not recorded
    (an index of another kind, or of an older version) and stays out of the JSON form."""

    plan: IndexPlan = IndexPlan()
    gpu_build: bool | None = None  # whether training and adding ran on the GPU
    nprobe: int | None = None  # IVF lists visited per query (tuned)
    ef_search: int | None = None  # HNSW search breadth (tuned)
    # candidates re-ranked exactly, as a multiple of k: the plan's, deepened when tuning needed it
    rerank_factor: int | None = None
    tuning: Tuning | None = None
    build_seconds: BuildSeconds | None = None
    legacy_refine: bool = False  # a format-1 file searched through faiss's IndexRefineFlat (see legacy.py)
    choice: Choice | None = None  # how an automatic IVF-PQ index chose its codes (mmsearch.index.choice)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as read
    # the key order of the manifest these were read from: written back in it (new keys last), as a dict would
    read_order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def of_plan(cls, plan: IndexPlan) -> "IndexParams":
        return cls(plan=plan, rerank_factor=plan.rerank_factor)

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``index.params``: the same keys in the same order as this version always wrote."""
        d = self.plan.to_json()
        if self.rerank_factor is not None:
            d["rerank_factor"] = self.rerank_factor  # in the plan's place when it has one
        for key, value in (("gpu_build", self.gpu_build), ("nprobe", self.nprobe), ("ef_search", self.ef_search),
                           ("tuning", self.tuning and self.tuning.to_json()),
                           ("build_seconds", self.build_seconds and self.build_seconds.to_json()),
                           ("legacy_refine", self.legacy_refine or None),
                           ("choice", self.choice and self.choice.to_json())):
            if value is not None:
                d[key] = value
        d.update(self.extra)
        if self.read_order:
            d = {**{k: d[k] for k in self.read_order if k in d}, **d}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "IndexParams":
        """Read a manifest's ``index.params`` (any format version; what is missing stays None)."""
        plan_keys = {f.name for f in fields(IndexPlan)}
        seconds = d.get("build_seconds")
        return cls(plan=IndexPlan.from_json(d), gpu_build=d.get("gpu_build"), nprobe=d.get("nprobe"),
                   ef_search=d.get("ef_search"), rerank_factor=d.get("rerank_factor"),
                   tuning=Tuning.from_json(d["tuning"]) if d.get("tuning") else None,
                   build_seconds=BuildSeconds(**seconds) if seconds else None,
                   legacy_refine=bool(d.get("legacy_refine", False)),
                   choice=Choice.from_json(d["choice"]) if d.get("choice") else None,
                   extra={k: v for k, v in d.items() if k not in plan_keys and k not in _OWN},
                   read_order=tuple(d))
