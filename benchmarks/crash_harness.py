"""Crash harness (issue 16): kill -9 `mmsearch index`, `mmsearch remove` and `mmsearch doctor --repair` at
random moments, then check that every kill left a usable index that lost nothing committed.

    python benchmarks/crash_harness.py [--kills 200] [--seed 0] [--photos 48]

Each scenario (``SCENARIOS``: first runs, runs that add photos, a video, a --texts file, removes, repairs
of a damaged index) starts from a template index that unkilled runs build once (and, for a repair,
damage: its items before the damage are what the repair must not lose). Its operation then runs unkilled
(``--reference-runs`` times, each on a fresh copy of the template) to time it and to record the items it
ends with. Each kill takes a fresh copy of the template, starts the operation in a new process group and
sends SIGKILL to the group at a seeded random moment (``schedule``): uniform over the unkilled run's
duration, plus some in its first 5 %, some around its end, and some 0-5 ms after the k-th change of the
index folder (the steps of a commit last milliseconds). After each kill:

1. an independent check of the index folder, reading files with json, pyarrow, numpy and faiss only
   (none of mmsearch's code): manifest.json parses and names an existing generation holding the files a
   generation holds; items, embeddings and the faiss index agree (rows = count, unique ids, the faiss
   index holds exactly the items' ids, every vector finite, of unit norm, and found by itself in the
   faiss index); the folder holds nothing else than leftovers a sweep removes (a partial generation,
   an unreferenced generation, a manifest temp file, each holding nothing but a generation's files);
2. `mmsearch query` answers (exit 0, with hits) or, killed before the first commit of a first run,
   says in one `error:` line that there is no index;
3. no committed item is lost: every item the index held before the killed operation, that the
   operation keeps, is still there, under its id; there is no item that is neither from before nor
   from after the operation; a remove (one commit) is all or nothing;
   A repair killed before it changed anything leaves the index as damaged as it was (counted apart); one
   killed after going back to an earlier generation but before re-embedding what the damage cost lacks
   those items (counted apart) until the re-run, which must embed them again;
4. the operation runs again to completion and ends with the unkilled run's items, old ids kept,
   leftovers swept (a remove killed after its commit: the re-run's one-line error that the index holds
   none of those items, counted apart).

Each kill is classified by what it left on disk (no manifest yet / a partial generation folder / an
unreferenced generation, newer than the manifest's or older / a manifest temp file / clean) and by how
far its operation got (nothing committed / some commits / complete). The models run from one warm export
cache (MMSEARCH_CACHE, filled by a warm-up run before anything is timed). Writes
benchmarks/results/crash_harness.json. A scenario is a few lines: a ``Scenario`` in ``SCENARIOS``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
FLICKR = DATA / "flickr8k"
VIDEO = DATA / "videos" / "cup.mp4"  # 8 s: 9 frames at the default interval
RESULTS = ROOT / "benchmarks" / "results"
QUERY = "a dog running on the grass"

# ---- what an index folder may hold (store.py's layout, restated here so the check does not use it) ----
MANIFEST = "manifest.json"
GEN_RE = re.compile(r"^gen-(\d{6})$")
PARTIAL_RE = re.compile(r"^\.gen-\d{6}\.partial$")
MANIFEST_TMP_RE = re.compile(r"^\.manifest\.json\..+\.tmp$")
MARKER = ".mmsearch-generation"
GEN_FILES = ("items.parquet", "embeddings.npy", "index.faiss", MARKER, MANIFEST)  # MANIFEST: the generation's copy
FINISHED = "nothing: the run had finished"  # the classification of a kill that came too late
NO_INDEX_RE = re.compile(r"^error: .*\bno (mmsearch )?index\b")  # `mmsearch query` on a folder without a manifest


# ---- the data and the commands -------------------------------------------------------------------------
#: the photo sets, as fractions of ``--photos``: (start, end) in the Flickr8k test list
SLICES = {"first": (0, 1), "grow": (1, 1.5), "grow-more": (1.5, 2), "clips": (2, 2.25), "clips-more": (2.25, 2.5),
          "other": (2.5, 2.75)}


@dataclass
class Workspace:
    """The temp folder the harness works in: photo folders (symlinks), texts files, one model cache."""

    root: Path
    cache: Path  # MMSEARCH_CACHE of every run
    n: int  # photos in the first folder (--photos)
    texts: int  # lines of the captions file (--texts)
    commit_every: int  # --commit-every and --batch-size of every `mmsearch index` run
    names: list[str] = field(default_factory=list)  # Flickr8k test photos, in list order

    @property
    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("MMSEARCH_DEBUG", "MMSEARCH_INDEX")}
        return {**env, "MMSEARCH_CACHE": str(self.cache), "PYTHONPATH": str(ROOT)}

    def photos(self, part: str) -> list[str]:
        a, b = SLICES[part]
        return self.names[int(a * self.n):int(b * self.n)]

    def folder(self, name: str) -> Path:
        return self.root / "data" / name

    def link(self, folder: Path, part: str) -> None:
        """Symlink the photos of ``part`` into ``folder`` (read in place, never copied)."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.photos(part):
            (folder / name).symlink_to(FLICKR / "images" / name)

    def paths(self, name: str, *parts: str) -> set[str]:
        return {str(self.folder(name) / p) for part in parts for p in self.photos(part)}

    def lines(self, path: Path) -> set[str]:
        """The item paths of a texts file (``file#line``)."""
        n = len([x for x in path.read_text().splitlines() if x.strip()])
        return {f"{path}#{i}" for i in range(1, n + 1)}

    def index_args(self, idx: Path, *args) -> list[str]:
        c = str(self.commit_every)
        return ["index", *map(str, args), "--index", str(idx), "--commit-every", c, "--batch-size", c, "-q"]

    def start(self, argv: list[str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "mmsearch.cli", *argv], cwd=ROOT, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-m", "mmsearch.cli", *argv], cwd=ROOT, env=self.env,
                           capture_output=True, text=True, check=False)
        if check and p.returncode:
            raise RuntimeError(f"mmsearch {' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
        return p

    def shown(self, argv: list[str]) -> str:
        return "mmsearch " + " ".join(str(a).replace(str(self.root), "<tmp>") for a in argv)


def make_workspace(root: Path, n: int, texts: int, cache: Path | None) -> Workspace:
    names = (FLICKR / "Flickr_8k.testImages.txt").read_text().split()
    captions = [line.split("\t", 1)[1] for line in (FLICKR / "Flickr8k.token.txt").read_text().splitlines()]
    ws = Workspace(root, cache or root / "cache", n, texts, max(2, n // 6), names)
    (root / "data").mkdir(parents=True)
    ws.folder("captions.txt").write_text("\n".join(captions[:texts]) + "\n")
    ws.folder("notes.txt").write_text("\n".join(captions[texts:texts + 20]) + "\n")
    ws.link(ws.folder("first"), "first")
    warm = root / "warm"
    ws.link(warm, "other")  # the first use exports the model into the cache (~20 s): not timed, not killed
    ws.run(["index", str(warm), "--index", str(root / "warm-index"), "-q"])
    ws.run(["query", QUERY, "--index", str(root / "warm-index")])
    return ws


@dataclass
class Scenario:
    """One operation to kill: ``command`` gives its mmsearch arguments for the index ``idx``; ``before``
    (unkilled runs, None for a first run) builds the index it starts from, then changes the sources it
    reads; ``expected`` gives the paths of the items it must end with."""

    name: str
    command: Callable[[Workspace, Path], list[str]]
    expected: Callable[[Workspace], set[str]]
    before: Callable[[Workspace, Path], None] | None = None
    atomic: bool = False  # one commit: after a kill the index holds the items of before or of after
    done_error: str | None = None  # a re-run may fail with this error once the killed run had committed
    damage: Callable[[Path], None] | None = None  # applied to the template after ``before`` (doctor --repair)
    reembeds: Callable[[Workspace], set[str]] | None = None  # paths a repair embeds again (lost to the damage):
    # missing after a kill until the re-run embeds them, under new ids


def _grown(ws: Workspace, idx: Path) -> None:
    ws.link(ws.folder("grow"), "grow")
    ws.run(ws.index_args(idx, ws.folder("grow")))
    ws.link(ws.folder("grow"), "grow-more")


def _with_video(ws: Workspace, idx: Path) -> None:
    ws.link(ws.folder("clips"), "clips")
    ws.run(ws.index_args(idx, ws.folder("clips")))
    ws.link(ws.folder("clips") / "new", "clips-more")
    (ws.folder("clips") / "new" / VIDEO.name).symlink_to(VIDEO)


def _two_folders_and_notes(index_type: str) -> Callable[[Workspace, Path], None]:
    def build(ws: Workspace, idx: Path) -> None:
        if not ws.folder("other").is_dir():
            ws.link(ws.folder("other"), "other")
        ws.run(ws.index_args(idx, ws.folder("first"), "--texts", ws.folder("notes.txt"), "--index-type", index_type))
        ws.run(ws.index_args(idx, ws.folder("other")))
    return build


def _first_folder(ws: Workspace, idx: Path) -> None:
    ws.run(ws.index_args(idx, ws.folder("first")))


def _two_commits(ws: Workspace, idx: Path) -> None:
    """An index of two folders, one commit each, so that the first commit is kept to fall back to."""
    for name, part in (("fix-a", "first"), ("fix-b", "clips-more")):
        if not ws.folder(name).is_dir():
            ws.link(ws.folder(name), part)
        ws.run(ws.index_args(idx, ws.folder(name)))


def _current(idx: Path) -> Path:
    return idx / json.loads((idx / MANIFEST).read_text())["generation_dir"]


def _flip_faiss(idx: Path) -> None:
    f = _current(idx) / "index.faiss"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _truncate_embeddings(idx: Path) -> None:
    f = _current(idx) / "embeddings.npy"
    f.write_bytes(f.read_bytes()[:1000])


def _doctor(ws: Workspace, idx: Path) -> list[str]:
    return ["doctor", "--index", str(idx), "--repair"]


def _fixed(ws: Workspace) -> set[str]:
    return ws.paths("fix-a", "first") | ws.paths("fix-b", "clips-more")


SCENARIOS = [
    Scenario("index, first run",
             lambda ws, idx: ws.index_args(idx, ws.folder("first")),
             lambda ws: ws.paths("first", "first")),
    Scenario("index, first run of photos and --texts, ivfflat (retrained as it grows)",
             lambda ws, idx: ws.index_args(idx, ws.folder("first"), "--texts", ws.folder("captions.txt"),
                                           "--index-type", "ivfflat"),
             lambda ws: ws.paths("first", "first") | ws.lines(ws.folder("captions.txt"))),
    Scenario("index, photos added",
             lambda ws, idx: ws.index_args(idx, ws.folder("grow")),
             lambda ws: ws.paths("grow", "grow", "grow-more"), before=_grown),
    Scenario("index, a video and photos added",
             lambda ws, idx: ws.index_args(idx, ws.folder("clips")),
             lambda ws: (ws.paths("clips", "clips") | {str(ws.folder("clips") / "new" / p) for p in ws.photos("clips-more")}
                         | {str(ws.folder("clips") / "new" / VIDEO.name)}), before=_with_video),
    Scenario("index --texts, texts added",
             lambda ws, idx: ws.index_args(idx, "--texts", ws.folder("captions.txt")),
             lambda ws: ws.paths("first", "first") | ws.lines(ws.folder("captions.txt")), before=_first_folder),
    Scenario("remove, a folder",
             lambda ws, idx: ["remove", str(ws.folder("other")), "--index", str(idx)],
             lambda ws: ws.paths("first", "first") | ws.lines(ws.folder("notes.txt")),
             before=_two_folders_and_notes("flat"), atomic=True, done_error="holds no items"),
    Scenario("remove, a folder and a texts file, hnsw (rebuilt to remove)",
             lambda ws, idx: ["remove", str(ws.folder("other")), str(ws.folder("notes.txt")), "--index", str(idx)],
             lambda ws: ws.paths("first", "first"),
             before=_two_folders_and_notes("hnsw"), atomic=True, done_error="holds no items"),
    Scenario("doctor --repair, index.faiss damaged (rebuilt from the embeddings)", _doctor, _fixed,
             before=_two_commits, damage=_flip_faiss),
    Scenario("doctor --repair, manifest.json deleted (restored from the generation's copy)", _doctor, _fixed,
             before=_two_commits, damage=lambda idx: (idx / MANIFEST).unlink()),
    Scenario("doctor --repair, embeddings.npy truncated (back to the previous commit, the rest re-embedded)",
             _doctor, _fixed, before=_two_commits, damage=_truncate_embeddings,
             reembeds=lambda ws: ws.paths("fix-b", "clips-more")),
]


# ---- the independent check of an index folder --------------------------------------------------------
@dataclass
class Disk:
    """What an index folder holds, read with json, pyarrow, numpy and faiss only."""

    manifest: dict | None = None  # None: no manifest.json
    keys: Counter = field(default_factory=Counter)  # item key (path, with the time of a video frame) -> rows
    ids: dict = field(default_factory=dict)  # item key -> id
    leftovers: list[str] = field(default_factory=list)  # what a sweep removes
    untidy: list[str] = field(default_factory=list)  # more leftovers than one killed run leaves
    errors: list[str] = field(default_factory=list)  # what makes the index unusable

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"]) if self.manifest else 0

    def classification(self) -> str:
        current = self.generation
        if self.manifest is None:
            return "no manifest yet"
        if any(PARTIAL_RE.match(x) for x in self.leftovers):
            return "partial generation folder"
        gens = [int(m[1]) for m in map(GEN_RE.match, self.leftovers) if m]
        if gens:
            return "unreferenced generation, " + ("newer (killed before its manifest)" if max(gens) > current
                                                   else "older (killed before the sweep)")
        if self.leftovers:
            return "manifest temp file"
        return "clean"


def read_disk(idx: Path) -> Disk:
    disk = Disk()
    if not (idx / MANIFEST).is_file():
        _check_entries(idx, (), disk)
        return disk
    try:
        disk.manifest = m = json.loads((idx / MANIFEST).read_text())
        gen = str(m["generation_dir"])
        if m.get("format") != "mmsearch-index" or gen != f"gen-{int(m['generation']):06d}":
            disk.errors.append(f"manifest names generation {gen!r} (number {m.get('generation')})")
    except (OSError, ValueError, KeyError, TypeError) as e:
        disk.errors.append(f"manifest.json unreadable: {e}")
        return disk
    _check_entries(idx, (gen, m.get("previous")), disk)
    if not (idx / gen).is_dir():
        disk.errors.append(f"the manifest's generation {gen} is missing")
        return disk
    try:
        _check_generation(idx / gen, m, disk)
    except Exception as e:  # noqa: BLE001 - an unreadable file is an unusable index, whatever the library raises
        disk.errors.append(f"{gen}: {type(e).__name__}: {e}")
    return disk


def _ours(folder: Path) -> bool:
    """A leftover folder a sweep may delete: it holds nothing but a generation's files (or their temps)."""
    return all(x.name in GEN_FILES or any(x.name.startswith(f".{f}.") and x.name.endswith(".tmp") for f in GEN_FILES)
               for x in folder.iterdir())


def _check_entries(idx: Path, kept: tuple, disk: Disk) -> None:
    """Only the manifest, the lock, the current generation (and the previous one the manifest names, kept
    to fall back to) and sweepable leftovers, one of each kind."""
    if not idx.exists():
        return
    kinds = Counter()
    for x in sorted(idx.iterdir()):
        if x.name in (MANIFEST, ".lock", *kept):
            continue
        kind = next((k for k, r in (("generation", GEN_RE), ("partial", PARTIAL_RE), ("manifest temp", MANIFEST_TMP_RE))
                     if r.match(x.name)), None)
        if kind is None or (x.is_dir() and not _ours(x)):
            disk.errors.append(f"unexpected {x.name} in the index folder")
            continue
        kinds[kind] += 1
        disk.leftovers.append(x.name)
    disk.untidy += [f"{n} {k} leftovers" for k, n in kinds.items() if n > 1]


def _check_generation(gen: Path, m: dict, disk: Disk) -> None:
    count, files = int(m["count"]), set(m.get("files", {}).values())
    have = {x.name for x in gen.iterdir()}
    need = {"items.parquet", "embeddings.npy", MARKER, MANIFEST} | ({"index.faiss"} if count else set())
    if not files >= need - {MARKER, MANIFEST} or have != need:
        disk.errors.append(f"{gen.name} holds {sorted(have)}, the manifest lists {sorted(files)}, expected {sorted(need)}")
    table = pq.read_table(gen / "items.parquet")
    ids = np.asarray(table.column("id").to_numpy(), np.int64)
    paths, kinds = table.column("path").to_pylist(), table.column("kind").to_pylist()
    t = table.column("t").to_numpy() if "t" in table.column_names else np.full(len(ids), np.nan)
    keys = [p if k != "video" else f"{p}@{x:.3f}" for p, k, x in zip(paths, kinds, t)]
    disk.keys, disk.ids = Counter(keys), dict(zip(keys, ids.tolist()))
    disk.errors += _checksum_errors(gen, m)
    emb = np.load(gen / "embeddings.npy")
    problems = [
        (len(ids) != count, f"{len(ids)} items, manifest count {count}"),
        (emb.shape != (count, int(m["dim"])) or emb.dtype != np.float32, f"embeddings {emb.dtype} {emb.shape}"),
        (len(np.unique(ids)) != len(ids), "item ids not unique"),
        (len(ids) and int(ids.max()) >= int(m["next_id"]), f"ids up to {ids.max() if len(ids) else 0}, next_id {m['next_id']}"),
        (dict(Counter(kinds)) != m.get("counts_by_kind", {}), f"kinds {dict(Counter(kinds))} vs {m.get('counts_by_kind')}"),
        (not np.isfinite(emb).all(), "embeddings not finite"),
        (len(emb) and np.abs(np.linalg.norm(emb, axis=1) - 1).max() > 1e-3, "embeddings not unit-norm"),
    ]
    disk.errors += [why for bad, why in problems if bad]
    if count and not disk.errors:
        _check_faiss(gen / "index.faiss", ids, emb, disk)


def _checksum_errors(gen: Path, m: dict) -> list[str]:
    """Each file's size and CRC-32 as the manifest recorded them at the commit."""
    out = []
    for name, want in (m.get("checksums") or {}).items():
        data = (gen / name).read_bytes() if (gen / name).is_file() else None
        if data is None or len(data) != want["size"] or f"{zlib.crc32(data):08x}" != want["crc32"]:
            out.append(f"{gen.name}/{name} differs from its commit's checksum")
    return out


def _faiss_ids(index) -> np.ndarray:
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    lists = ivf.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(ivf.nlist)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _check_faiss(path: Path, ids: np.ndarray, emb: np.ndarray, disk: Disk) -> None:
    """The faiss index holds exactly the items' ids, and each item's vector (searched exhaustively)."""
    import faiss

    index = faiss.read_index(str(path))
    stored = _faiss_ids(index)
    if index.ntotal != len(ids) or index.d != emb.shape[1] or not np.array_equal(np.sort(stored), np.sort(ids)):
        disk.errors.append(f"faiss index: {index.ntotal} vectors of dimension {index.d}, ids differ from the items'")
        return
    try:
        faiss.extract_index_ivf(index).nprobe = 1 << 20  # every list
    except RuntimeError:
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = max(256, len(ids))
    scores, found = index.search(np.ascontiguousarray(emb), 1)
    row = {int(i): r for r, i in enumerate(ids)}
    same = [found[r, 0] in row and np.allclose(emb[row[int(found[r, 0])]], emb[r], atol=1e-4) for r in range(len(ids))]
    if not all(same) or scores[:, 0].min() < 0.999:
        disk.errors.append(f"faiss index: {len(ids) - sum(same)} vectors do not find themselves")


def query_problem(ws: Workspace, idx: Path, committed: bool) -> str | None:
    """None when `mmsearch query` does what it should on this folder, else what went wrong."""
    p = ws.run(["query", QUERY, "--index", str(idx), "--json", "-k", "5"], check=False)
    err = p.stderr.strip().splitlines()
    if not committed:
        return None if p.returncode == 1 and len(err) == 1 and NO_INDEX_RE.match(err[0]) else (
            f"query on a folder without a manifest: exit {p.returncode}, {p.stderr.strip()[-300:]!r}")
    try:
        hits = json.loads(p.stdout) if p.returncode == 0 else []
    except ValueError:
        hits = []
    return None if hits else f"query: exit {p.returncode}, {len(hits)} hits, {p.stderr.strip()[-300:]!r}"


# ---- references and kills --------------------------------------------------------------------------------
@dataclass
class Reference:
    """A scenario run unkilled: its template, how long it takes, what it ends with."""

    scenario: Scenario
    template: Path  # the index before the operation (absent for a first run)
    before: Disk  # read_disk(template)
    seconds: float  # median wall time of the unkilled runs (those not watched, if any)
    after: Disk  # what an unkilled run ends with
    commits: int  # generations an unkilled run writes
    changes: int  # changes of the index folder seen during the first unkilled run (its commits' steps)
    damaged: bool = False  # the template was damaged after ``before`` was read (a repair's starting point)


def prepare(ws: Workspace, s: Scenario, runs: int) -> Reference:
    template = ws.root / "templates" / re.sub(r"\W+", "-", s.name)
    if s.before is not None:
        s.before(ws, template)
    before = read_disk(template)  # intact: what a repair must not lose
    if s.damage is not None:
        s.damage(template)
    walls, changes, after = [], [], None
    for i in range(runs):
        idx = ws.root / "reference" / str(i)
        fresh_copy(template, idx)
        t0 = time.perf_counter()
        p = ws.start(s.command(ws, idx))
        if i == 0:  # watching costs CPU: the other runs are only timed
            changes.append(watch(p, idx))
        _, err = p.communicate()
        walls.append(time.perf_counter() - t0)
        if p.returncode:
            raise RuntimeError(f"{s.name}: {ws.shown(s.command(ws, idx))} failed: {err.strip()}")
        after = read_disk(idx)
        shutil.rmtree(idx)
    paths = {k.split("@")[0] for k in after.keys}
    if after.errors or paths != s.expected(ws):
        raise RuntimeError(f"{s.name}: the unkilled run ends with {len(paths)} paths, expected {len(s.expected(ws))}; "
                           f"{after.errors}")
    return Reference(s, template, before, statistics.median(walls[1:] or walls), after,
                     after.generation - before.generation, changes[0], s.damage is not None)


def watch(p: subprocess.Popen, idx: Path) -> int:
    """Wait for ``p``, counting the changes of the index folder (its entries, a partial generation's
    files, the manifest's inode), looked at every 0.5 ms as ``kill_at`` looks: the steps of its commits."""
    seen, changes = _snapshot(idx), 0
    while p.poll() is None:
        time.sleep(0.0005)
        now = _snapshot(idx)
        changes, seen = changes + (now != seen), now
    return changes


def _snapshot(idx: Path) -> tuple:
    try:
        names = tuple(sorted(os.listdir(idx)))
        partial = tuple(sorted(x for n in names if PARTIAL_RE.match(n) for x in os.listdir(idx / n)))
        return names, partial, os.stat(idx / MANIFEST).st_ino if MANIFEST in names else 0
    except FileNotFoundError:  # changing under our feet
        return ()


def fresh_copy(template: Path, idx: Path) -> None:
    shutil.rmtree(idx, ignore_errors=True)
    if template.exists():
        shutil.copytree(template, idx)


@dataclass
class Kill:
    """One kill and what it left."""

    scenario: str
    draw: str  # how the moment was drawn (``DRAWS``)
    at: float  # seconds from the start to the kill
    fraction: float  # of the unkilled run's wall time
    finished_first: bool  # the run ended before the kill landed
    classification: str = ""
    progress: str = ""  # nothing committed / some commits / complete
    problems: dict = field(default_factory=dict)  # unusable, lost_items, ... (see ``check_kill``)
    notes: dict = field(default_factory=dict)  # facts that are not failures
    listing: list[str] = field(default_factory=list)  # the folder after the kill, when something is wrong

    @property
    def failed(self) -> bool:
        return any(self.problems.values())


@dataclass
class Moment:
    """When to kill: ``at`` seconds after the start, or, with ``change``, ``at`` seconds after the
    ``change``-th change of the index folder is seen (looked at every 0.5 ms)."""

    draw: str  # which of ``DRAWS``
    at: float
    change: int | None = None


def kill_at(ws: Workspace, argv: list[str], when: Moment, idx: Path) -> tuple[bool, float, str]:
    """Run ``argv`` and SIGKILL its process group at ``when``: (whether it finished first, seconds from
    its start to the kill, how it failed if it finished with an error)."""
    t0 = time.perf_counter()
    p = ws.start(argv)
    if when.change is not None:
        seen, changes = _snapshot(idx), 0
        while changes < when.change and p.poll() is None:
            time.sleep(0.0005)
            now = _snapshot(idx)
            changes, seen = changes + (now != seen), now
        time.sleep(when.at)
    else:
        time.sleep(max(0.0, t0 + when.at - time.perf_counter()))
    finished, elapsed = p.poll() is not None, time.perf_counter() - t0
    if not finished:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            finished = True
    _, err = p.communicate()
    failed = f"exit {p.returncode}: {err.strip()[-300:]}" if finished and p.returncode else ""
    return finished, elapsed, failed


def trial(ws: Workspace, ref: Reference, when: Moment, idx: Path) -> Kill:
    s = ref.scenario
    fresh_copy(ref.template, idx)
    finished, elapsed, failed = kill_at(ws, s.command(ws, idx), when, idx)
    k = Kill(s.name, when.draw, round(elapsed, 4), round(elapsed / ref.seconds, 4), finished)
    disk = read_disk(idx)
    k.classification = FINISHED if finished else disk.classification()
    k.progress = ("nothing committed" if disk.generation == ref.before.generation else
                  "complete" if disk.keys == ref.after.keys else "some commits")
    check_kill(ws, ref, idx, disk, k)
    k.problems["unkilled_run_failed"] = failed
    if k.failed:
        k.listing = sorted(str(p.relative_to(idx)) for p in idx.rglob("*")) if idx.exists() else []
    shutil.rmtree(idx, ignore_errors=True)
    return k


def check_kill(ws: Workspace, ref: Reference, idx: Path, disk: Disk, k: Kill) -> None:
    """Checks 1-4 of the module's docstring; ``k.problems`` counts what failed."""
    s, before, after = ref.scenario, ref.before, ref.after
    if ref.damaged and _untouched(idx, ref.template):  # a repair killed before it changed anything: as damaged
        k.notes["left_as_it_was"] = True  # as before it started; the re-run below must repair it
        disk = replace(before, leftovers=disk.leftovers)  # its "leftovers" are the damage, not the kill's
    elif disk.manifest is None and before.manifest is not None:
        disk.errors.append("manifest.json is gone")
    problem = None if k.notes.get("left_as_it_was") else query_problem(ws, idx, committed=disk.manifest is not None)
    pending = s.reembeds(ws) if s.reembeds else set()
    kept = Counter({key: n for key, n in (before.keys & after.keys).items() if key.split("@")[0] not in pending})
    if pending:  # lost to the damage, not to the kill: they must be back once the re-run completes
        k.notes["awaiting_reembedding"] = len(pending - set(disk.keys))
    k.problems = {
        "unusable": disk.errors + ([problem] if problem else []),
        "lost_items": sum((kept - disk.keys).values()),
        "extra_items": sum((disk.keys - (before.keys | after.keys)).values()),
        "not_all_or_nothing": s.atomic and disk.keys not in (before.keys, after.keys),
        "ids_changed": sum(1 for key in kept if key in disk.ids and disk.ids[key] != before.ids[key]),
        "untidy": disk.untidy,
    }
    p = ws.run(s.command(ws, idx), check=False)
    already = bool(s.done_error) and s.done_error in p.stderr and disk.keys == after.keys
    again = read_disk(idx)
    k.problems |= {
        "rerun_failed": f"exit {p.returncode}: {p.stderr.strip()[-300:]}" if p.returncode and not already else "",
        "rerun_unusable": again.errors,
        "rerun_items_differ": sum(((again.keys - after.keys) + (after.keys - again.keys)).values()),
        "rerun_ids_changed": sum(1 for key in kept if again.ids.get(key) != before.ids[key]),
        "leftovers_after_rerun": again.leftovers if not already else [],
    }
    if already:  # the killed run had committed: the re-run says so in one line, and sweeps nothing yet
        k.notes = {"rerun_said_done": p.stderr.strip(), "leftovers_until_the_next_write": again.leftovers}


def _untouched(idx: Path, template: Path) -> bool:
    """``idx`` holds the template's manifest and generations byte for byte (new leftovers aside)."""
    for x in template.iterdir():
        files = [x] if x.is_file() else list(x.iterdir())
        for f in files:
            twin = idx / f.relative_to(template)
            if not twin.is_file() or twin.read_bytes() != f.read_bytes():
                return False
    return (idx / MANIFEST).exists() == (template / MANIFEST).exists()


DRAWS = {"uniform": 0.6, "first 5 %": 0.1, "last 10 %": 0.1, "after a folder change": 0.2}  # shares of the kills


def schedule(rng: random.Random, kills: int, refs: list[Reference]) -> list[tuple[Reference, Moment]]:
    """The scenarios in turn (shuffled), each with a moment to kill it: uniform over the unkilled run's
    wall time, or in its first 5 %, or in 90-105 % of it (the last commit, the sweep, the exit), or
    0-5 ms after the k-th change of the index folder an unkilled run makes (k uniform; a commit lasts
    milliseconds, so uniform draws rarely land in one, and its moment varies with the load). Each kill
    takes the same random numbers whatever the measured times: the seed fixes the draws, the timings
    scale them."""
    order = [refs[i % len(refs)] for i in range(kills)]
    rng.shuffle(order)
    out = []
    for ref in order:
        draw = rng.choices(list(DRAWS), weights=list(DRAWS.values()))[0]
        d = ref.seconds
        if draw == "after a folder change" and ref.changes:
            out.append((ref, Moment(draw, rng.uniform(0, 0.005), 1 + int(rng.random() * ref.changes))))
        elif draw == "first 5 %":
            out.append((ref, Moment(draw, rng.uniform(0, 0.05 * d))))
        elif draw == "last 10 %":
            out.append((ref, Moment(draw, rng.uniform(0.9 * d, 1.05 * d))))
        else:
            out.append((ref, Moment("uniform", rng.uniform(0, d))))
    return out


# ---- the run and its record ----------------------------------------------------------------------------
PROBLEMS = ("unkilled_run_failed", "unusable", "lost_items", "extra_items", "not_all_or_nothing", "ids_changed", "untidy", "rerun_failed",
            "rerun_unusable", "rerun_items_differ", "rerun_ids_changed", "leftovers_after_rerun")


def run_harness(kills: int = 200, seed: int = 0, photos: int = 48, texts: int = 300, reference_runs: int = 3,
                workdir: str | None = None, cache: Path | None = None,
                log: Callable[[str], None] = lambda line: None) -> dict:
    """Kill the scenarios' operations ``kills`` times in all; returns the record (see ``record``)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmsearch-crash-", dir=workdir) as tmp:
        ws = make_workspace(Path(os.path.realpath(tmp)), photos, texts, cache)
        refs = []
        for s in SCENARIOS:
            refs.append(prepare(ws, s, reference_runs))
            log(f"{s.name}: {refs[-1].seconds:.2f} s unkilled, {refs[-1].commits} commits, "
                f"{sum(refs[-1].after.keys.values())} items, {refs[-1].changes} folder changes")
        done = []
        for i, (ref, when) in enumerate(schedule(random.Random(seed), kills, refs)):
            done.append(trial(ws, ref, when, ws.root / "trial"))
            k = done[-1]
            log(f"{i + 1}/{kills} {k.scenario}, {k.draw} at {k.at:.3f} s ({100 * k.fraction:.0f} %): {k.classification}, "
                f"{k.progress}" + (f"; FAILED {json.dumps({p: v for p, v in k.problems.items() if v})}" if k.failed else ""))
        return record(ws, refs, done, seed, time.perf_counter() - t0)


def _total(done: list[Kill], problem: str) -> int:
    return sum(v if isinstance(v, int) and not isinstance(v, bool) else int(bool(v))
               for v in (k.problems[problem] for k in done))


def record(ws: Workspace, refs: list[Reference], done: list[Kill], seed: int, seconds: float) -> dict:
    fractions = {}
    for k in done:
        fractions.setdefault(k.classification, []).append(k.fraction)
    command = f"python benchmarks/crash_harness.py --kills {len(done)} --seed {seed} --photos {ws.n} --texts {ws.texts}"
    return {
        "what": "SIGKILL of `mmsearch index` (first runs; photos, a video, a --texts file added), `mmsearch remove` "
                "and `mmsearch doctor --repair` (of a damaged faiss index, a deleted manifest, truncated embeddings), "
                "each in a fresh process group, at seeded random moments over the whole run; after each kill an "
                "independent check of the index folder, a query, the items before the kill, and the operation run "
                "again to completion",
        "command": command,
        "seed": seed,
        "kills": len(done),
        "photos": ws.n,
        "commit_every": ws.commit_every,
        "scenarios": {r.scenario.name: {"command": ws.shown(r.scenario.command(ws, ws.root / "index")),
                                        "unkilled_seconds": round(r.seconds, 3), "commits": r.commits,
                                        "folder_changes_seen": r.changes,
                                        "items_before": sum(r.before.keys.values()),
                                        "items_after": sum(r.after.keys.values()),
                                        "kills": sum(k.scenario == r.scenario.name for k in done)} for r in refs},
        "kills_per_classification": dict(Counter(k.classification for k in done).most_common()),
        "kills_per_draw": {d: dict(Counter(k.classification for k in done if k.draw == d).most_common()) for d in DRAWS},
        "kill_fraction_per_classification": {c: [round(min(f), 3), round(statistics.median(f), 3), round(max(f), 3)]
                                             for c, f in fractions.items()},
        "kills_per_progress": dict(Counter(k.progress for k in done).most_common()),
        "unusable_indexes": _total(done, "unusable"),
        "lost_items": _total(done, "lost_items"),
        "problems": {p: _total(done, p) for p in PROBLEMS},
        "reruns_that_said_done": sum("rerun_said_done" in k.notes for k in done),
        "repairs_killed_before_changing_anything": sum(bool(k.notes.get("left_as_it_was")) for k in done),
        "repairs_killed_before_re_embedding": sum(bool(k.notes.get("awaiting_reembedding")) for k in done),
        "leftovers_until_the_next_write": sum(bool(k.notes.get("leftovers_until_the_next_write")) for k in done),
        "failures": [k.__dict__ for k in done if k.failed][:20],
        "total_seconds": round(seconds, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f} at the end",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=200, help="kills in all, spread over the scenarios")
    ap.add_argument("--seed", type=int, default=0, help="seeds the order of the scenarios and the kill times")
    ap.add_argument("--photos", type=int, default=48, help="photos of a first run (the other sets are fractions of it)")
    ap.add_argument("--texts", type=int, default=300, help="lines of the --texts file (256 a batch)")
    ap.add_argument("--reference-runs", type=int, default=3, help="unkilled runs per scenario, to time it")
    ap.add_argument("--workdir", default=None, help="where the temp folder goes [default: the system's]")
    ap.add_argument("--out", default=str(RESULTS / "crash_harness.json"))
    args = ap.parse_args()
    rec = run_harness(args.kills, args.seed, args.photos, args.texts, args.reference_runs, args.workdir,
                      log=lambda line: print(line, file=sys.stderr, flush=True))
    sys.path.insert(0, str(ROOT))
    from mmsearch._util import atomic_write_text

    atomic_write_text(args.out, json.dumps(rec, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in rec.items() if k != "failures"}, indent=2, ensure_ascii=False))
    if rec["unusable_indexes"] or rec["lost_items"] or any(rec["problems"].values()):
        raise SystemExit(f"{len(rec['failures'])} kills failed: see {args.out}")


if __name__ == "__main__":
    main()
