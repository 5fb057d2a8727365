"""``mmsearch doctor``: check an index folder against itself and against what its commits recorded,
and repair it, re-embedding only what cannot be recovered.

Each commit (``mmsearch.store.commit``) records the size and CRC-32 of every file of its generation
in the manifest, writes a copy of that manifest into the generation, and keeps the generation
committed before it. The checks, for the generation the manifest names:

- the manifest parses and fits its schema; the generation folder exists;
- each file matches the size and checksum its commit recorded (indexes older than checksums: the
  structural checks below only);
- the items table reads, has the manifest's row count and unique ids below ``next_id``;
- the embeddings are ``(count, dim)`` float32, finite and unit-norm;
- the faiss index loads, holds exactly the items' ids, and finds a sample of stored vectors;
- the hub values match the model's query bank (recomputed for a sample);
- no generation or partial folder is left that the manifest does not name.

The repairs, cheapest first: a damaged manifest is restored from the newest generation whose copy
and files are intact; a damaged faiss index is rebuilt from ``embeddings.npy``; wrong hub values
are measured again; damaged items or embeddings fall back to the previous generation; leftovers are
swept. Items the fallback lacks are re-embedded by indexing the index's folders again, and the
report says what could not be recovered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._util import atomic_write_bytes
from .config import IndexingConfig, ModelRef
from .errors import IndexFormatError, IndexNotFoundError, MmsearchError
from .hubness import QUERY_OF
from .index import VectorIndex, VectorLookup
from .indexing import IndexReport, index_folder
from .manifest import Manifest
from .store import (
    EMBEDDINGS,
    FAISS,
    ITEMS,
    MANIFEST,
    MANIFEST_TMP_RE,
    Items,
    _read_embeddings,
    _read_items,
    commit,
    file_sum,
    kept,
    made_by_us,
    read_manifest,
    sweep,
    write_lock,
    write_manifest,
)
from .weights import load_query_bank

SAMPLE = 64  # stored vectors searched, and hub values recomputed, per check
CHUNK = 1 << 16  # embedding rows checked at a time (memory stays flat at any size)


@dataclass
class Finding:
    """One thing wrong with an index, and what ``--repair`` does about it."""

    where: str  # "manifest.json", "gen-000004/index.faiss", ".gen-000005.partial", ...
    problem: str
    fix: str


@dataclass
class Health:
    """What one generation is worth: its parts that are intact (None: damaged) and what is wrong."""

    manifest: Manifest
    items: Items | None = None
    embeddings: np.ndarray | None = None
    faiss_ok: bool = False
    hubs_ok: bool = True
    findings: list[Finding] = field(default_factory=list)

    @property
    def data_ok(self) -> bool:
        """The items and their vectors are intact: everything else can be rebuilt from them."""
        return self.items is not None and self.embeddings is not None

    @property
    def ok(self) -> bool:
        return self.data_ok and self.faiss_ok and self.hubs_ok


@dataclass
class DoctorReport:
    """What ``examine`` found and, after ``repair``, what was done and what is still wrong."""

    index: str
    generation: str | None = None  # the generation the manifest names (after a repair: the new one)
    count: int = 0
    previous: str | None = None  # the generation kept to fall back to, when it is intact
    found: list[Finding] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)  # what was done, one line each
    lost: list[str] = field(default_factory=list)  # paths whose vectors could not be recovered
    reembedded: int = 0  # items (photos, video frames, texts) embedded again by the repair
    remaining: list[Finding] | None = None  # still wrong after the repair (None: no repair ran)

    @property
    def healthy(self) -> bool:
        return not (self.found if self.remaining is None else self.remaining)


def examine(path: str | Path) -> DoctorReport:
    """Check the index at ``path`` (read-only; waits for no writer: one at work is an error)."""
    path = _index_folder(path)
    with write_lock(path):
        return Doctor(path).examine()


def repair(path: str | Path, encoder=None, on_progress=None) -> DoctorReport:
    """Check the index at ``path`` and repair what is wrong (see the module's doc). ``encoder`` (else
    the index's model, loaded only if something must be re-embedded) embeds what was lost."""
    path = _index_folder(path)
    with write_lock(path):
        doctor = Doctor(path)
        report = doctor.examine()
        doctor.repair()
    if read_manifest(path).reembed:  # index_folder takes the lock itself
        doctor.reembed(encoder, on_progress)
    with write_lock(path):
        after = Doctor(path)
        final = after.examine()
        report.remaining, report.generation, report.count = final.found, final.generation, final.count
        report.previous = final.previous
        if report.lost and after.current is not None and after.current.items is not None:
            report.lost = sorted(set(report.lost) - set(after.current.items.path))  # re-embedded since
        return report


def _index_folder(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise IndexNotFoundError(f"no index at {path}: build one with `mmsearch index FOLDER --index {path}`")
    if not (path / MANIFEST).exists() and not any(made_by_us(p) for p in path.iterdir()):
        raise IndexNotFoundError(f"{path} holds no mmsearch index: build one with `mmsearch index FOLDER --index {path}`")
    return path


class Doctor:
    """One check (and repair) of one index folder; the caller holds its write lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.report = DoctorReport(str(path.resolve()))
        self.current: Health | None = None  # the generation the manifest names, if the manifest reads
        self.roots_to_reindex: list[str] = []

    # ---- checking ----------------------------------------------------------------------------------
    def examine(self) -> DoctorReport:
        r = self.report
        try:
            manifest = read_manifest(self.path)
        except (IndexFormatError, IndexNotFoundError) as e:
            r.found.append(Finding(MANIFEST, _why(e), "restored from the newest intact generation's copy"))
            manifest = None
        if manifest is not None:
            self.current = check_generation(self.path, manifest)
            r.found += self.current.findings
            r.generation, r.count = manifest.generation_dir, manifest.count
            if manifest.reembed:  # a repair went back to an earlier generation and stopped before re-embedding
                r.found.append(Finding(MANIFEST, f"files under {', '.join(manifest.reembed)} are still to be "
                                                 "embedded again after a repair", "indexed again"))
            prev = _copy_of(self.path, manifest.previous) if manifest.previous else None
            if prev is not None and check_generation(self.path, prev).data_ok:
                r.previous = manifest.previous
        r.found += self._leftovers(manifest)
        return r

    def _leftovers(self, manifest: Manifest | None) -> list[Finding]:
        if manifest is None:  # which generations to keep is decided by the repair
            return []
        keep = kept(manifest)
        out = []
        for child in sorted(self.path.iterdir()):
            if child.name not in keep and made_by_us(child):
                out.append(Finding(child.name, "a generation no manifest names (left by a killed run)", "removed"))
            elif MANIFEST_TMP_RE.match(child.name):
                out.append(Finding(child.name, "a manifest temp file (left by a killed run)", "removed"))
        return out

    # ---- repairing ---------------------------------------------------------------------------------
    def repair(self) -> None:
        """Make the manifest name an intact generation, without re-embedding; leave the folders to
        index again (when items were lost) in ``roots_to_reindex``."""
        if self.current is None:
            self.current = self._restore_manifest()
        cur = self.current
        if not cur.data_ok:
            self._fall_back(cur)
        elif not (cur.faiss_ok and cur.hubs_ok):
            self._rebuild(cur)
        now = read_manifest(self.path)
        gone = sweep(self.path, keep=kept(now))
        self.report.repaired += [f"removed {name} (no manifest named it)" for name in gone]
        self.roots_to_reindex = [r for r in now.reembed if Path(r).is_dir()]

    def _restore_manifest(self) -> Health:
        """The newest generation whose manifest copy and data are intact becomes current again."""
        gens = sorted((p for p in self.path.iterdir() if made_by_us(p) and not p.name.startswith(".")),
                      key=lambda p: p.name, reverse=True)
        copies = [m for m in (_copy_of(self.path, g.name) for g in gens) if m is not None]
        for m in copies:
            h = check_generation(self.path, m)
            if h.data_ok:
                atomic_write_bytes(self.path / MANIFEST, (self.path / m.generation_dir / MANIFEST).read_bytes())
                self.report.repaired.append(f"restored {MANIFEST} from {m.generation_dir}/{MANIFEST}")
                self.report.generation, self.report.count = m.generation_dir, m.count
                return h
        if not copies:
            raise IndexFormatError(
                f"index {self.path} cannot be repaired: its manifest is damaged and no generation holds a copy "
                f"(made before mmsearch kept one); build it again with `mmsearch index FOLDER --index NEW_FOLDER`")
        m = copies[0]  # no intact data anywhere: start from the newest description of the index
        atomic_write_bytes(self.path / MANIFEST, (self.path / m.generation_dir / MANIFEST).read_bytes())
        self.report.repaired.append(f"restored {MANIFEST} from {m.generation_dir}/{MANIFEST}")
        return check_generation(self.path, m)

    def _rebuild(self, cur: Health) -> None:
        """Items and vectors are intact: measure hub values again and/or rebuild the faiss index."""
        m, items, emb = cur.manifest, cur.items, np.array(cur.embeddings, dtype=np.float32)
        if not cur.hubs_ok:
            bank = _bank(m)
            rows = _measurable(items, bank)
            items.hub[:] = np.nan
            if len(rows):
                items.hub[rows] = bank.hubs(emb[rows], [items.kind[r] for r in rows])
            m = m.copy(hubness=bank.settings() if bank is not None else None)
            self.report.repaired.append(f"measured the hub values of {len(rows)} items again")
        if not len(items):
            vindex = None
        elif cur.faiss_ok:  # intact: reused as it is
            vindex = VectorIndex.load(self.path / m.generation_dir / FAISS, m.index.kind, m.index.params)
        else:
            vindex = VectorIndex.build(emb, items.id, m.spec)
            self.report.repaired.append(f"rebuilt the {vindex.kind} index from {EMBEDDINGS} ({len(items)} vectors)")
        self._commit(items, emb, vindex, m)

    def _fall_back(self, cur: Health) -> None:
        """Items or vectors are damaged: go back to the previous generation if it is intact, else to
        an empty index; the index's folders are indexed again afterwards to re-embed what was lost."""
        m = cur.manifest
        copy = _copy_of(self.path, m.previous) if m.previous else None
        prev = check_generation(self.path, copy) if copy is not None else None
        if prev is not None and prev.data_ok:
            base, items, emb = prev.manifest, prev.items, np.array(prev.embeddings, dtype=np.float32)
            self.report.repaired.append(f"went back to {m.previous}, the generation committed before "
                                        f"{m.generation_dir} ({len(items)} items)")
        else:
            base, items, emb = m, Items.empty(), np.zeros((0, m.dim or 0), np.float32)
            prev = None
            self.report.repaired.append(f"no intact generation to go back to: {m.generation_dir}'s items are dropped")
        if cur.items is not None:
            self.report.lost = sorted(set(cur.items.path) - set(items.path))
        roots = sorted(set(base.roots) | set(m.roots))
        # the folders to index again are recorded in the commit: a repair killed before it re-embeds goes on next time
        base = base.copy(next_id=max(base.next_id, m.next_id), roots=roots, failed=m.failed, reembed=roots)
        self._rebuild(Health(base, items, emb, faiss_ok=prev is not None and prev.faiss_ok,
                             hubs_ok=prev is None or prev.hubs_ok))

    def _commit(self, items: Items, emb: np.ndarray, vindex, manifest: Manifest) -> None:
        committed = commit(self.path, items, emb, vindex, manifest)
        self.report.generation, self.report.count = committed.generation_dir, committed.count
        self.report.repaired.append(f"committed {committed.generation_dir} ({committed.count} items)")

    def reembed(self, encoder=None, on_progress=None) -> None:
        """Index the index's folders again: what the repair lost is embedded, nothing else changes
        that would not change on any `mmsearch index` run."""
        for root in self.roots_to_reindex:
            r: IndexReport = index_folder(root, self.path, encoder=encoder, config=IndexingConfig(),
                                          on_progress=on_progress)
            self.report.reembedded += r.embedded
        with write_lock(self.path):
            write_manifest(self.path, read_manifest(self.path).copy(reembed=[]))
        if self.report.reembedded:
            self.report.repaired.append(f"re-embedded {self.report.reembedded} items (photos, video frames) under "
                                        f"{', '.join(self.roots_to_reindex)}")


def check_generation(path: Path, m: Manifest) -> Health:
    """The health of the generation manifest ``m`` names."""
    h = Health(m)
    if m.generation_dir is None:  # nothing committed yet, or an emptied index
        h.items, h.embeddings, h.faiss_ok = Items.empty(), np.zeros((0, m.dim or 0), np.float32), True
        return h
    gen = path / m.generation_dir
    if not gen.is_dir():
        h.findings.append(Finding(m.generation_dir, "the generation folder the manifest names is missing", FALL_BACK))
        return h
    damaged = _bad_sums(gen, m)
    h.items = _check_part(gen, ITEMS, damaged.get(ITEMS), _read_items, lambda x: _items_problem(x, m), h.findings)
    h.embeddings = _check_part(gen, EMBEDDINGS, damaged.get(EMBEDDINGS), _read_embeddings,
                               lambda x: _vectors_problem(x, m), h.findings)
    if h.data_ok:
        h.faiss_ok = _check_faiss(gen, m, h, damaged.get(FAISS))
        h.hubs_ok = _check_hubs(m, h)
    return h


def _bad_sums(gen: Path, m: Manifest) -> dict[str, str]:
    """File name -> how it differs from what its commit recorded."""
    out = {}
    for name, want in m.checksums.items():
        f = gen / name
        if not f.is_file():
            out[name] = "missing"
        elif f.stat().st_size != want.size:
            out[name] = f"{f.stat().st_size} bytes, {want.size} when committed"
        elif file_sum(f).crc32 != want.crc32:
            out[name] = "its bytes changed since the commit (checksum differs)"
    return out


FALL_BACK = "the previous generation, else an empty index, and its folders indexed again"


def _check_part(gen: Path, name: str, damage: str | None, read, problem_of, findings: list[Finding]):
    """One data file of a generation, read with ``read`` and judged by ``problem_of``; None (and a
    finding) when its checksum, its reading or its contents say it is damaged."""
    problem, value = damage, None
    if problem is None:
        try:
            value = read(gen / name)
        except (OSError, MmsearchError) as e:
            problem = _why(e)
        if value is not None:
            problem = problem_of(value)
    if problem is not None:
        findings.append(Finding(f"{gen.name}/{name}", problem, FALL_BACK))
        return None
    return value


def _items_problem(items: Items, m: Manifest) -> str | None:
    """What reading the table does not check already (types, nulls, repeated ids, kinds: store._read_items)."""
    if len(items) != m.count:
        return f"{len(items)} rows, the manifest says {m.count}"
    if len(items) and (items.id.min() < 0 or items.id.max() >= m.next_id):
        return "item ids outside those the index handed out"
    return None


def _vectors_problem(emb: np.ndarray, m: Manifest) -> str | None:
    if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape[0] != m.count or (m.count and emb.shape[1] != m.dim):
        return f"{emb.dtype} {emb.shape}, the manifest says float32 ({m.count}, {m.dim})"
    for start in range(0, len(emb), CHUNK):
        block = np.asarray(emb[start:start + CHUNK], dtype=np.float64)
        if not np.isfinite(block).all():
            return f"row {start + int(np.flatnonzero(~np.isfinite(block).all(1))[0])} is not finite"
        norms = np.linalg.norm(block, axis=1)
        if np.abs(norms - 1).max() > 1e-3:
            return f"row {start + int(np.argmax(np.abs(norms - 1)))} is not unit-norm"
    return None


def _check_faiss(gen: Path, m: Manifest, h: Health, damage: str | None) -> bool:
    where, fix = f"{gen.name}/{FAISS}", f"rebuilt from {EMBEDDINGS}"
    if not m.count:
        return True
    problem = damage
    if problem is None and not m.index.kind:
        problem = "the manifest names no faiss index for a non-empty index"
    if problem is None:
        try:
            lookup = VectorLookup(h.embeddings, h.items.id)
            problem = _faiss_problem(VectorIndex.load(gen / FAISS, m.index.kind, m.index.params, mmap=True,
                                                      vectors=lookup), h)
        except (OSError, MmsearchError) as e:
            problem = _why(e)
    if problem is not None:
        h.findings.append(Finding(where, problem, fix))
    return problem is None


def _faiss_problem(vindex, h: Health) -> str | None:
    if vindex.ntotal != len(h.items):
        return f"holds {vindex.ntotal} vectors, the items table {len(h.items)}"
    if not np.array_equal(vindex.ids(), np.sort(h.items.id)):
        return "holds other ids than the items table"
    rows = np.random.default_rng(0).choice(len(h.items), min(SAMPLE, len(h.items)), replace=False)
    scores, ids = vindex.search(np.asarray(h.embeddings[rows], np.float32), min(10, len(h.items)))
    found = (ids == h.items.id[rows, None]) | (scores >= 1 - 1e-4)  # itself, or an exact duplicate of it
    if found.any(1).mean() < 0.9:
        return f"finds {found.any(1).mean():.0%} of a sample of its own vectors"
    return None


def _check_hubs(m: Manifest, h: Health) -> bool:
    try:
        bank = _bank(m)
    except MmsearchError:
        return True  # the model's bank is unusable: indexing says so; nothing to compare with here
    if bank is None or not len(h.items):
        return True
    digests = lambda s: {k: v.get("digest") for k, v in (s or {}).items()}
    problem = None
    if digests(m.hubness) != digests(bank.settings()):
        problem = "hub values were measured with another query bank than the model's"
    else:
        rows = _measurable(h.items, bank)[:SAMPLE]
        want = bank.hubs(np.asarray(h.embeddings[rows], np.float32), [h.items.kind[r] for r in rows])
        if not np.allclose(h.items.hub[rows], want, atol=1e-3, equal_nan=False):
            problem = "hub values differ from the query bank's measure"
    if problem is not None:
        h.findings.append(Finding(f"{m.generation_dir}/{ITEMS}", problem, "measured again"))
    return problem is None


def _bank(m: Manifest):
    return load_query_bank(ModelRef(m.model.name, m.model.pretrained))


def _measurable(items: Items, bank) -> np.ndarray:
    """Rows whose hub value the bank measures (it holds the modality that searches them)."""
    if bank is None:
        return np.zeros(0, np.int64)
    return np.flatnonzero([QUERY_OF.get(k) in bank.sides for k in items.kind])


def _copy_of(path: Path, generation: str) -> Manifest | None:
    """The manifest a generation's commit wrote into it; None if missing or unreadable."""
    f = path / generation / MANIFEST
    try:
        return Manifest.from_json(json.loads(f.read_text(encoding="utf-8")), str(f))
    except (OSError, ValueError, MmsearchError, AttributeError):
        return None


def _why(e: Exception) -> str:
    """An error's message without its advice (the doctor gives its own)."""
    return str(e).split(": check and repair it with", 1)[0].split(": rebuild", 1)[0]
