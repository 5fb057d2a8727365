"""Fuzzing with hypothesis (issue 16, "Proof, not anecdotes"): random and mutated bytes as the photos
and videos of an indexed folder, as the index's manifest.json and items table, as an exported model's
query bank and as a --texts file; random Unicode and control characters in queries and file names.

The property, for every case: the command ends with exit 0 and a result, or exit 1/2 with exactly one
`error: ...` line on stderr (warnings above it allowed), never a traceback or an internal error; and
the index is usable afterwards (a query works, `mmsearch info` reports the count it should), unless
the fuzzed artifact is the index itself, where one error line is the other allowed outcome.

One small index (a few real photos) is built once per module through the library with the shared
encoder; each example works on a copy of it. The CLI runs in-process (typer's CliRunner) and loads
the index's model once per process (``get_encoder`` keeps it), so a command takes milliseconds.
Examples are derandomized and no example database is kept: every run tries the same cases.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.config import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from mmsearch.indexing import index_folder
from mmsearch.store import Collection, read_manifest
from tests.conftest import VIDEOS, flickr8k

runner = CliRunner()
N_BASE = 4  # photos in the module's index

#: MMSEARCH_FUZZ_SCALE=20 runs twenty times the examples, with fresh random ones: a deeper search
#: than CI's, which runs the same few every time
SCALE = float(os.environ.get("MMSEARCH_FUZZ_SCALE", "1"))
FUZZ = settings(deadline=None, derandomize=SCALE == 1, database=None, print_blob=SCALE != 1,
                suppress_health_check=list(HealthCheck))


def examples(n: int) -> int:
    return max(1, round(n * SCALE))


# ---- the index every example copies ----------------------------------------------------------------
class Base:
    """The module's index: ``photos`` is the indexed folder (examples put a file in it and take it out
    again), ``index`` is never written to (examples copy it), ``root`` is scratch space."""

    def __init__(self, root: Path, photos: Path, index: Path, captions: list[str]) -> None:
        c = Collection.open(index)
        self.root, self.photos, self.index, self.captions = root, photos, index, captions
        self.count, self.paths = c.count, frozenset(c.items.path)

    def __repr__(self) -> str:  # hypothesis prints it with each failing example
        return f"Base({self.root})"


@pytest.fixture(scope="module")
def base(tmp_path_factory, pairs, encoder):
    root = tmp_path_factory.mktemp("fuzz")
    photos = root / "photos"
    photos.mkdir()
    for src in pairs.images[:N_BASE]:
        shutil.copyfile(src, photos / Path(src).name)
    index_folder(photos, root / "index", encoder=encoder)
    b = Base(root, photos, root / "index", [cap for caps in pairs.captions[:N_BASE] for cap in caps])
    expect_usable(b.index, b.count)  # loads the CLI's model once, before the first example
    yield b
    assert sorted(p.name for p in photos.iterdir()) == sorted(Path(p).name for p in b.paths)  # nothing left over


@contextlib.contextmanager
def scratch(b: Base):
    """A fresh folder for one example, removed afterwards."""
    folder = Path(tempfile.mkdtemp(dir=b.root, prefix="ex-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def index_copy(b: Base):
    """A copy of the module's index for one example."""
    with scratch(b) as folder:
        shutil.copytree(b.index, folder / "index")
        yield folder / "index"


# ---- running the CLI and checking the property ----------------------------------------------------
def cli(*args):
    args = [os.fspath(a) if isinstance(a, Path) else a for a in args]
    return runner.invoke(app, args), args


def clean(result) -> bool:
    """The property: exit 0 (True), or exit 1/2 with one `error:` line as the last line of stderr
    (False); a traceback, an internal error (exit 70) or an exception escaping the command fails."""
    r, args = result
    escaped = r.exception is not None and not isinstance(r.exception, SystemExit)
    if escaped or r.exit_code not in (0, 1, 2) or "Traceback" in r.output:
        debug = runner.invoke(app, ["--debug", *args])
        pytest.fail(f"mmsearch {args!r}: exit {r.exit_code}, {r.exception!r}\n{r.stderr}\n--debug:\n{debug.stderr}")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    if r.exit_code == 0:
        assert not any(line.startswith("error") for line in lines), (args, r.stderr)
        return True
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], (args, r.stderr)
    assert all(line.startswith(("warning: ", "note: ")) for line in lines[:-1]), (args, r.stderr)
    assert "internal error" not in errors[0], (args, r.stderr)
    return False


def ok(result) -> str:
    """The command's stdout; it must have succeeded."""
    r, args = result
    assert clean(result), f"mmsearch {args!r} failed: {r.stderr}"
    return r.stdout


def info_count(index: Path) -> int:
    return json.loads(ok(cli("info", "--json", "--index", index)))["count"]


def expect_usable(index: Path, count: int) -> None:
    """A query answers (plain and JSON) and `info` reports ``count``, as the items table holds."""
    assert ok(cli("query", "--index", index, "-k", "3", "--", "a dog")).strip()
    hits = json.loads(ok(cli("query", "--json", "--index", index, "-k", "50", "--", "a dog")))
    c = Collection.open(index)
    assert hits and {h["path"] for h in hits} <= set(c.items.path)
    assert info_count(index) == count == c.count


# ---- mutations -----------------------------------------------------------------------------------
#: one edit of a byte string: (what, where (a number folded into the length), in which region, bytes)
EDIT = st.tuples(st.sampled_from(("flip", "truncate", "insert", "delete", "smash")), st.integers(0, 2**31),
                 st.sampled_from(("head", "tail", "any")), st.binary(min_size=1, max_size=16))
EDITS = st.lists(EDIT, min_size=1, max_size=4)
SMASH = (0x00, 0xFF, 0x7F, 0x80)  # bytes that blow up length and count fields


def mutate(data: bytes, edits) -> bytes:
    """``data`` with the edits applied; positions favour the first and last 2 KB (headers, footers)."""
    b = bytearray(data)
    for what, at, region, blob in edits:
        n = len(b)
        window = min(n, 2048) if region != "any" else n
        pos = at % (window + 1)
        if region == "tail":
            pos = n - pos
        if what == "flip" and n:
            b[min(pos, n - 1)] ^= blob[0] or 0x80
        elif what == "truncate":
            del b[pos:]
        elif what == "insert":
            b[pos:pos] = blob
        elif what == "delete":
            del b[pos:pos + len(blob) * (1 + blob[0])]  # up to 4 KB
        elif what == "smash":
            b[pos:pos + len(blob)] = bytes(SMASH[x % 4] for x in blob)
    return bytes(b)


def _image_bytes(fmt: str, **save) -> bytes:
    from PIL import Image

    photo = Image.open(first_photo())
    small = photo.convert("RGB").resize((48, 32))
    if fmt == "GIF":  # animated, with a palette
        out = io.BytesIO()
        small.save(out, "GIF", save_all=True, append_images=[small.rotate(90)], duration=100, loop=0)
        return out.getvalue()
    if save.pop("alpha", False):
        small.putalpha(128)
    out = io.BytesIO()
    small.save(out, fmt, **save)
    return out.getvalue()


@cache
def first_photo() -> Path:
    return min((flickr8k() / "images").glob("*.jpg"))


@cache
def media_seed(name: str) -> bytes:
    """Real media to mutate: a Flickr8k JPEG as it is, that photo made small in other formats, and
    two real video clips."""
    if name == "photo.jpg":
        return first_photo().read_bytes()
    if name in ("clip.mp4", "clip.avi"):
        return (VIDEOS / {"clip.mp4": "airplane_then_field.mp4", "clip.avi": "tree.avi"}[name]).read_bytes()
    fmt, save = {"alpha.png": ("PNG", {"alpha": True}), "anim.gif": ("GIF", {}), "photo.webp": ("WEBP", {}),
                 "photo.tiff": ("TIFF", {"compression": "tiff_deflate"}), "photo.bmp": ("BMP", {})}[name]
    return _image_bytes(fmt, **save)


MEDIA_SEEDS = ("photo.jpg", "alpha.png", "anim.gif", "photo.webp", "photo.tiff", "photo.bmp", "clip.mp4", "clip.avi")
EXTENSIONS = sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS | {".JPG", ".Mp4"})

#: (seed, edits, magic + random bytes or None, extension or None for the seed's own)
MEDIA = st.tuples(st.sampled_from(MEDIA_SEEDS), EDITS,
                  st.one_of(st.none(), st.tuples(st.booleans(), st.binary(max_size=600))),
                  st.one_of(st.none(), st.none(), st.sampled_from(EXTENSIONS)))


def media_case(case) -> tuple[str, bytes]:
    seed, edits, random, ext = case
    data = media_seed(seed)
    if random is not None:  # random bytes, perhaps behind the seed's first bytes (its format's magic)
        keep_magic, blob = random
        data = (data[:16] if keep_magic else b"") + blob
    else:
        data = mutate(data, edits)
    return "fuzzed" + (ext or Path(seed).suffix), data


# ---- media inside an indexed folder ---------------------------------------------------------------
@settings(FUZZ, max_examples=examples(45))
@given(case=MEDIA)
def test_fuzzed_media_in_an_indexed_folder(base, case):
    """A damaged photo or video in the folder never stops `mmsearch index`: it is indexed or skipped
    with a warning, the run after it agrees, the other items stay, and queries (also by that file) work."""
    name, data = media_case(case)
    target = base.photos / name
    with index_copy(base) as idx:
        target.write_bytes(data)
        try:
            r = cli("index", base.photos, "--index", idx, "-q")
            ok(r)
            c = Collection.open(idx)
            mine = [p for p in c.items.path if p not in base.paths]
            assert base.paths <= set(c.items.path) and set(mine) <= {str(target)}, mine
            assert mine or f"warning: skipped {target}: " in r[0].stderr, r[0].stderr  # never dropped silently
            ok(cli("index", base.photos, "--index", idx, "-q"))  # the next run: the file's outcome is remembered
            assert Collection.open(idx).count == c.count
            expect_usable(idx, c.count)
            clean(cli("query", "--index", idx, "--image", target, "-k", "2"))
            if Path(name).suffix.lower() in VIDEO_EXTENSIONS:
                out = idx.parent / "frame.jpg"
                if clean(cli("frame", target, "--at", "1", "-o", out)):
                    assert out.stat().st_size > 0
        finally:
            target.unlink()


# ---- the index's own files ------------------------------------------------------------------------
JSON_LEAF = st.one_of(
    st.sampled_from([None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 2**80, 1e308, -0.0, float("nan"),
                     float("inf"), "", "0", "gen-000001", "../photos", "x" * 300, [], {}]),
    st.integers(), st.floats(), st.text(max_size=12))
JSON = st.recursive(JSON_LEAF, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                                                         max_size=3), max_leaves=6)
WRONG_TYPES = st.sampled_from([None, True, 0, -1, 2**63, 2**80, 1e308, float("nan"), "", "x", "../photos", [], [1],
                                {}, {"x": 1}])


def edit_json(data, doc):
    """``doc`` with one to three of its nodes (drawn from the document as it is) replaced or deleted."""
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        nodes = list(_nodes(doc))
        at = data.draw(st.sampled_from(nodes), label="node")
        value = data.draw(st.one_of(WRONG_TYPES, JSON), label="value")
        if not at:
            doc = value
            continue
        parent = doc
        for key in at[:-1]:
            parent = parent[key]
        if data.draw(st.integers(0, 3), label="delete?") == 0:
            del parent[at[-1]]
        else:
            parent[at[-1]] = value
    return doc


def _nodes(doc, at=()):
    yield at
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in children:
        yield from _nodes(value, at + (key,))


def edit_table(data, table):
    """``table`` (pyarrow) with one or two of its columns or rows changed as a damaged or foreign
    items table could have them: a column dropped, emptied, of another type, one value changed, rows
    missing, repeated or reordered."""
    import pyarrow as pa

    for _ in range(data.draw(st.integers(1, 2), label="edits")):
        what = data.draw(st.sampled_from(("drop", "nulls", "retype", "value", "rows")), label="what")
        if what == "rows":
            n = table.num_rows
            rows = data.draw(st.sampled_from([list(range(n - 1)), [0, *range(n)], list(range(n))[::-1], []] if n
                                             else [[]]), label="rows")
            table = table.take(pa.array(rows, pa.int64()))
            continue
        if not table.num_columns or (what == "value" and not table.num_rows):
            continue
        name = data.draw(st.sampled_from(table.column_names), label="column")
        i = table.column_names.index(name)
        values = table.column(name).to_pylist()
        if what == "drop":
            table = table.remove_column(i)
            continue
        if what == "nulls":
            column = pa.nulls(table.num_rows, table.column(name).type)
        elif what == "retype":
            kind = data.draw(st.sampled_from(("string", "int", "float", "binary")), label="type")
            column = _retyped(values, kind)
        else:
            row = data.draw(st.integers(0, max(0, table.num_rows - 1)), label="row")
            value = data.draw(st.one_of(WRONG_TYPES, JSON_LEAF), label="value")
            values[row] = value
            try:
                column = pa.array(values, table.column(name).type)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                column = pa.array([None if v is None else str(v) for v in values], pa.string())
        table = table.set_column(i, name, column)
    return table


def _retyped(values: list, kind: str):
    import pyarrow as pa

    n = len(values)
    if kind == "string":
        return pa.array([str(v) for v in values], pa.string())
    if kind == "int":
        return pa.array(range(-1, n - 1), pa.int64())
    if kind == "float":
        return pa.array([float("nan")] * n, pa.float64())
    return pa.array([b"\xff" * 3] * n, pa.binary())


def damaged_index_commands(b: Base, idx: Path) -> None:
    """Every command that reads the index answers or says in one line what is wrong."""
    clean(cli("info", "--index", idx))
    clean(cli("info", "--json", "--index", idx))
    for fmt in ([], ["--json"]):
        if clean(cli("query", *fmt, "--index", idx, "-k", "3", "--", "a dog")) and fmt:
            json.loads(cli("query", *fmt, "--index", idx, "-k", "3", "--", "a dog")[0].stdout)
    clean(cli("index", b.photos, "--index", idx, "-q"))
    clean(cli("query", "--index", idx, "--", "a dog"))


@settings(FUZZ, max_examples=examples(30))
@given(edits=EDITS)
def test_fuzzed_manifest_bytes(base, edits):
    """Bytes of manifest.json flipped, cut, inserted, deleted (mostly JSON no more, sometimes other values)."""
    with index_copy(base) as idx:
        manifest = idx / "manifest.json"
        manifest.write_bytes(mutate(manifest.read_bytes(), edits))
        damaged_index_commands(base, idx)


@settings(FUZZ, max_examples=examples(40), phases=[Phase.explicit, Phase.generate],
          report_multiple_bugs=False)
@given(data=st.data())
def test_fuzzed_manifest_values(base, data):
    """manifest.json still JSON, with fields deleted or of other values and types."""
    with index_copy(base) as idx:
        manifest = idx / "manifest.json"
        manifest.write_text(json.dumps(edit_json(data, json.loads(manifest.read_text()))))
        damaged_index_commands(base, idx)


@settings(FUZZ, max_examples=examples(30))
@given(edits=EDITS)
def test_fuzzed_items_table(base, edits):
    """Bytes of the current generation's items.parquet flipped, cut, inserted, deleted."""
    with index_copy(base) as idx:
        items = idx / read_manifest(idx).generation_dir / "items.parquet"
        items.write_bytes(mutate(items.read_bytes(), edits))
        damaged_index_commands(base, idx)


@settings(FUZZ, max_examples=examples(30), phases=[Phase.explicit, Phase.generate],
          report_multiple_bugs=False)
@given(data=st.data())
def test_fuzzed_items_table_values(base, data):
    """items.parquet still parquet, with columns dropped, emptied, retyped or changed, rows lost or repeated."""
    import pyarrow.parquet as pq

    with index_copy(base) as idx:
        items = idx / read_manifest(idx).generation_dir / "items.parquet"
        pq.write_table(edit_table(data, pq.read_table(items)), items)
        damaged_index_commands(base, idx)


@pytest.mark.parametrize("field, value", [
    (("generation_dir",), 5),  # store.Collection.open: Path / int
    (("generation_dir",), "x"),  # `index`: pyarrow's FileNotFoundError from store.read_items, outside the index's files
    (("hubness",), [1]),  # hubness.corrections: list.get
    (("hubness", "text", "beta"), "x"),  # hubness.damping: float("x")
    (("roots",), 5),  # indexing.IndexWriter._roots: set(5)
    (("video_sampling",), {"frame_interval": "x"}),  # indexing.IndexWriter._read: float("x")
    (("model", "pretrained"), []),  # encoder.get_encoder: an unhashable cache key
], ids=["generation_dir-int", "generation_dir-elsewhere", "hubness-list", "beta-string", "roots-int",
        "frame_interval-string", "pretrained-list"])
def test_a_manifest_field_of_the_wrong_type_is_one_error_line(base, field, value):
    with index_copy(base) as idx:
        doc = json.loads((idx / "manifest.json").read_text())
        parent = doc
        for key in field[:-1]:
            parent = parent[key]
        parent[field[-1]] = value
        (idx / "manifest.json").write_text(json.dumps(doc))
        damaged_index_commands(base, idx)


def _set_column(table, name, values, type_=None):
    import pyarrow as pa

    return table.set_column(table.column_names.index(name), name, pa.array(values, type_))


@pytest.mark.parametrize("damage", [
    lambda t: t.slice(0, 3),  # a row fewer than embeddings: exact.VectorLookup's assertion
    lambda t: _set_column(t, "id", [i + 100 for i in t.column("id").to_pylist()]),  # ids the faiss index lacks
    lambda t: _set_column(t, "id", [0, 0, 1, 2]),  # an id twice
    lambda t: _set_column(t, "path", [None, *t.column("path").to_pylist()[1:]]),  # cli.printable(None)
    lambda t: _set_column(t, "kind", [k.encode() for k in t.column("kind").to_pylist()]),  # bytes in the JSON output
], ids=["row-missing", "ids-unknown", "id-twice", "path-null", "kind-binary"])
def test_an_items_table_that_disagrees_with_the_index_is_one_error_line(base, damage):
    import pyarrow.parquet as pq

    with index_copy(base) as idx:
        items = idx / read_manifest(idx).generation_dir / "items.parquet"
        pq.write_table(damage(pq.read_table(items)), items)
        damaged_index_commands(base, idx)


# ---- the query bank of an exported model ----------------------------------------------------------
BANK = "query_bank.safetensors"


@contextlib.contextmanager
def exported_with_bank(folder: Path, export: Path, bank: bytes):
    """A copy of the exported model folder ``export`` (as `mmsearch export` writes it; its graphs
    hard-linked) at ``folder``, with ``bank`` as its query bank. The CLI keeps one encoder per model
    folder for the process: this one's is dropped afterwards."""
    from mmsearch import encoder as encoders

    folder.mkdir()
    for f in export.iterdir():
        if f.name != BANK:
            try:
                os.link(f, folder / f.name)
            except OSError:  # another file system
                os.symlink(f, folder / f.name)
    (folder / BANK).write_bytes(bank)
    try:
        yield folder
    finally:
        for key in [k for k in encoders._CACHE if k[0] == str(folder)]:
            del encoders._CACHE[key]


def bank_parts(export: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of the exported model's query bank."""
    from safetensors import safe_open
    from safetensors.numpy import load

    with safe_open(str(export / BANK), "numpy") as f:
        meta = f.metadata()
    return load((export / BANK).read_bytes()), meta


def index_with_bank(b: Base, export: Path, bank: bytes, idx: Path) -> str | None:
    """`mmsearch index --model EXPORTED` (nothing new to embed: the items' hubness is measured again
    with the bank) answers or says in one line what is wrong (returned); the index stays usable."""
    with exported_with_bank(idx.parent / "exported", export, bank) as exported:
        result = cli("index", b.photos, "--index", idx, "--model", exported, "-q")
        error = None if clean(result) else result[0].stderr
    expect_usable(idx, b.count)
    return error


@settings(FUZZ, max_examples=examples(12))
@given(how=st.sampled_from(("bytes", "sides")), edits=EDITS, data=st.data())
def test_fuzzed_query_bank_of_an_exported_model(base, encoder, how, edits, data):
    """A damaged query_bank.safetensors in an exported model folder (where a user can damage it:
    `mmsearch export --out DIR`, or the export in ~/.cache/mmsearch/onnx) that `mmsearch index
    --model DIR` measures the items' hubness with."""
    from safetensors.numpy import save

    if how == "bytes":
        bank = mutate((encoder.export_folder / BANK).read_bytes(), edits)
    else:
        tensors, meta = bank_parts(encoder.export_folder)
        meta["sides"] = json.dumps(edit_json(data, json.loads(meta["sides"])))
        bank = save(tensors, metadata=meta)
    with index_copy(base) as idx:
        index_with_bank(base, encoder.export_folder, bank, idx)


def _side(name, value):
    def edit(tensors, meta):
        sides = json.loads(meta["sides"])
        sides["text"][name] = value
        meta["sides"] = json.dumps(sides)
    return edit


def _vectors(change):
    def edit(tensors, meta):
        for m in tensors:
            tensors[m] = change(tensors[m])
    return edit


@pytest.mark.parametrize("damage", [
    _side("k", 0),  # was np.partition's ValueError while measuring hubness
    _side("k", "20"),  # was a TypeError
    _side("beta", "x"),  # was accepted, then written into the manifest: every later query an internal error
    _side("beta", -1.0),  # would lift scores, which the exact re-ranking assumes never happens
    _side("threshold", None),  # was accepted, then every query an internal error
    _vectors(lambda v: v[0]),  # one vector, not a matrix: was an IndexError
    _vectors(lambda v: v[:, :255]),  # another model's dimension: was a matmul ValueError
    _vectors(lambda v: v * np.float16("nan")),
], ids=["k-0", "k-string", "beta-string", "beta-negative", "threshold-null", "vectors-1d", "vectors-255d",
        "vectors-nan"])
def test_a_damaged_query_bank_is_one_error_line_and_leaves_the_index_as_it_was(base, encoder, damage):
    from safetensors.numpy import save

    tensors, meta = bank_parts(encoder.export_folder)
    damage(tensors, meta)
    with index_copy(base) as idx:
        manifest = (idx / "manifest.json").read_bytes()
        error = index_with_bank(base, encoder.export_folder, save(tensors, metadata=meta), idx)
        assert error and "query bank" in error, error
        assert (idx / "manifest.json").read_bytes() == manifest


# ---- a --texts file --------------------------------------------------------------------------------
TEXT_FORMATS = (".txt", ".csv", ".tsv", ".parquet")


def texts_seed(b: Base, ext: str) -> bytes:
    lines = list(b.captions[:8]) + ["", "  a line of spaces  ", "un chien sur l'herbe, 草地上的狗"]
    if ext == ".txt":
        return "\n".join(lines).encode()
    if ext == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = io.BytesIO()
        pq.write_table(pa.table({"text": lines, "n": list(range(len(lines)))}), out)
        return out.getvalue()
    import csv

    out = io.StringIO()
    w = csv.writer(out, delimiter="," if ext == ".csv" else "\t")
    w.writerows([["id", "text"]] + [[str(i), t] for i, t in enumerate(lines)])
    return out.getvalue().encode()


TEXT_LINES = st.lists(st.text(st.characters(codec="utf-8"), max_size=40), max_size=12)
#: (format, edits of a real captions file, or random bytes, or random lines)
TEXTS = st.tuples(st.sampled_from(TEXT_FORMATS),
                  st.one_of(st.tuples(st.just("edits"), EDITS), st.tuples(st.just("bytes"), st.binary(max_size=400)),
                            st.tuples(st.just("lines"), TEXT_LINES)))


@settings(FUZZ, max_examples=examples(30))
@given(case=TEXTS)
@example(case=(".parquet", ("edits", [("smash", 1660747, "head", b"\x01")])))  # text that is not UTF-8: was a traceback
def test_fuzzed_texts_file(base, case):
    """`mmsearch index --texts FILE` adds the texts or says in one line why not (then nothing is
    committed); `mmsearch query --batch FILE` answers or says why not; the index stays usable."""
    ext, (how, what) = case
    if how == "edits":
        data = mutate(texts_seed(base, ext), what)
    elif how == "bytes":
        data = what
    else:
        data = "\n".join(what).encode("utf-8", "surrogatepass")
    with index_copy(base) as idx:
        texts = idx.parent / f"texts{ext}"
        texts.write_bytes(data)
        added = clean(cli("index", "--texts", texts, "--index", idx, "-q"))
        c = Collection.open(idx)
        assert base.paths <= set(c.items.path)
        new = [k for p, k in zip(c.items.path, c.items.kind) if p not in base.paths]
        assert all(k == "text" for k in new) and (added or not new)  # a refused file commits nothing
        for fmt in ([], ["--json"]):
            r = cli("query", "--batch", texts, *fmt, "--index", idx, "-k", "2")
            if clean(r) and fmt:
                assert all("query" in json.loads(line) for line in r[0].stdout.splitlines())
        expect_usable(idx, c.count)


def test_a_texts_table_naming_a_column_twice_is_one_error_line(base):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with index_copy(base) as idx:
        texts = idx.parent / "texts.parquet"
        pq.write_table(pa.table([pa.array(["a dog"]), pa.array(["a cat"])], names=["text", "text"]), texts)
        assert not clean(cli("index", "--texts", texts, "--index", idx, "-q"))  # was pyarrow's KeyError
        expect_usable(idx, base.count)


# ---- queries ----------------------------------------------------------------------------------------
#: any character a query can hold, controls and the surrogate escapes of bytes that are not UTF-8 included
QUERY_CHARS = st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from("\t\n\r\x0b\x0c\x1b\x7f\x85\u2028\ufeff"),
                        st.integers(0x80, 0xFF).map(lambda b: chr(0xDC00 + b)))


@settings(FUZZ, max_examples=examples(60))
@given(text=st.one_of(st.text(QUERY_CHARS, max_size=60), st.text(QUERY_CHARS, min_size=200, max_size=2000)),
       k=st.integers(1, 12))
@example(text="", k=1)
@example(text=" \t\n\u3000", k=1)
@example(text="-k", k=1)
@example(text="a dog " * 2000, k=3)
def test_fuzzed_queries(base, text, k):
    """Any text is a query (or, if it is blank, one error line); the JSON output parses and names
    only indexed files, and plain output keeps one result a line."""
    answered = clean(cli("query", "--index", base.index, "-k", str(k), "--", text))
    assert answered == bool(text.strip())
    if answered:
        r, _ = cli("query", "--json", "--index", base.index, "-k", str(k), "--", text)
        hits = json.loads(r.stdout)
        assert len(hits) == min(k, base.count) and {h["path"] for h in hits} <= base.paths


# ---- file names -------------------------------------------------------------------------------------
#: one path component as bytes (Linux names are bytes: any but "/" and NUL, at most 255)
NAME_BYTES = st.one_of(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="/\x00"), min_size=1,
                               max_size=40).map(lambda s: s.encode("utf-8")),
                       st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")))
NAMES = st.lists(st.tuples(NAME_BYTES, st.sampled_from([b".jpg", b".JPG", b".png", b".jpeg"]), st.booleans()),
                 min_size=1, max_size=3, unique_by=lambda t: t[0] + t[1])


@settings(FUZZ, max_examples=examples(25))
@given(names=NAMES, folder=st.one_of(st.none(), NAME_BYTES))
@example(names=[(b"caf\xe9 \xff", b".jpg", False), (b"tab\there\nnew\x1b[31mred", b".png", True)], folder=b"\xff\xfe")
@example(names=[(b"x" * 251, b".jpg", False)], folder=None)
def test_fuzzed_file_names(base, names, folder):
    """Photos under any names (and in a folder of any name) are indexed, come back through --json as
    the exact bytes of their paths, keep one result a line in plain output, and can be removed."""
    names = [(n, ext, png) for n, ext, png in names if n not in (b".", b"..") and len(n + ext) <= 255]
    with index_copy(base) as idx:
        where = os.fsencode(idx.parent / "named")
        if folder not in (None, b".", b".."):
            where = os.path.join(where, folder)
        os.makedirs(where)
        made = []
        for name, ext, png in names:
            path = os.path.join(where, name + ext)
            with open(path, "wb") as f:
                f.write(media_seed("alpha.png") if png else media_seed("photo.jpg"))
            if not name.startswith(b"._"):  # AppleDouble files are skipped, by name
                made.append(path)
        top = os.fsdecode(os.fsencode(idx.parent / "named"))
        ok(cli("index", top, "--index", idx, "-q"))
        count = base.count + len(made)
        hits = json.loads(ok(cli("query", "--json", "--index", idx, "-k", "50", "--", "a dog")))
        assert sorted(os.fsencode(h["path"]) for h in hits if h["path"] not in base.paths) == sorted(made)
        plain = ok(cli("query", "--index", idx, "-k", "50", "--", "a dog")).splitlines()
        assert len(plain) == count and all(line.count("\t") == 1 and line.replace("\t", "").isprintable()
                                           for line in plain)
        ids = sorted(Collection.open(idx).items.id.tolist())
        ok(cli("index", top, "--index", idx, "-q"))  # the next run finds the same names: nothing changes
        assert sorted(Collection.open(idx).items.id.tolist()) == ids
        if made:
            ok(cli("remove", top, "--index", idx))
        expect_usable(idx, base.count)
