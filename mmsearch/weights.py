"""What a model's weights are, and what was made from them.

The weights fingerprint (which changes when the weights behind a model reference change), the check
that an index's vectors came from the weights a model has now, the model record that index
manifests and exports keep, the built-in models' shipped int8 graphs, and where a model's query bank
is kept. One module, so that ``models`` (the built-in models), ``hubness`` (the correction, numpy
only) and ``encoder`` depend on it and never on each other.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._util import atomic_write_bytes
from .config import ModelRef
from .errors import ModelLoadError, ModelMismatchError
from .exported import ModelRecord, cache_root
from .hubness import QueryBank
from .models import BUILTINS, builtin
from .multilingual import head_info

BANK_FILE = "query_bank.safetensors"  # inside an open_clip checkpoint folder written by `mmsearch train`


_FILE_HASHES: dict[tuple, str] = {}  # (path, size, mtime, inode) -> content hash, so each file is read once per process


def _file_hash(path: Path) -> str:
    """sha1 of a file's contents, remembered per process and, across processes, in the cache
    (``hashes/``, keyed by path, size, mtime and inode): hashing 35 MB of heads would cost a cold query 70 ms."""
    import hashlib

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _FILE_HASHES:
        return _FILE_HASHES[key]
    memo = cache_root() / "hashes" / hashlib.sha1(repr(key).encode()).hexdigest()
    try:
        value = memo.read_text().strip()
    except OSError:
        value = ""
    if len(value) != 40:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        value = h.hexdigest()
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(memo, value.encode())
        except OSError:  # a read-only home: hash again next time
            pass
    _FILE_HASHES[key] = value
    return value


def fingerprint(name: str, pretrained: str | None = None) -> str | None:
    """A short string that changes when the weights behind a model reference change: a hash of the
    contents of a built-in model's shipped heads (they change between mmsearch versions), or of the
    weight files and open_clip config of a checkpoint folder / weights file (retrained in place; a
    copy of the folder keeps it). None for names whose weights a tag fixes (open_clip registry, hf-hub)."""
    import hashlib

    if name in BUILTINS and pretrained is None:
        heads = builtin(name).heads_file
        return _file_hash(heads)[:16] if heads.is_file() else None
    files = []
    for x in (name, pretrained):
        p = Path(x) if x else None
        if p is not None and p.is_dir():
            # weights and architecture; not the query bank (derived from them) or training records
            files += [f for f in sorted(p.iterdir()) if f.is_file() and f.name != BANK_FILE and (
                f.suffix in (".safetensors", ".bin", ".pt", ".pth") or f.name == "open_clip_config.json")]
        elif p is not None and p.is_file():
            files.append(p)
    if not files:
        return None
    return hashlib.sha1(repr([(f.name, _file_hash(f)) for f in files]).encode()).hexdigest()[:16]


def shipped_int8(name: str, weights: str | None) -> tuple[Path, dict] | None:
    """(graph, record) of the int8 image graph a built-in model ships for these weights, else None."""
    import json

    if name not in BUILTINS:
        return None
    graph = builtin(name).int8_file
    try:
        record = json.loads(graph.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return (graph, record) if graph.is_file() and record.get("weights") == weights else None


def shipped_multilingual(name: str, weights: str | None) -> Path | None:
    """The multilingual query head a built-in model ships for these weights (mmsearch.multilingual), else None."""
    if name not in BUILTINS or weights is None:
        return None
    head = builtin(name).multi_file
    if not head.is_file():
        return None
    info = head_info(head)
    # unreadable: returned all the same, so that using it says the file is damaged (QueryHead.load)
    return head if info is None or info.get("weights") == weights else None


def default_precision(name: str, weights: str | None) -> str:
    """The precision a model embeds at unless told otherwise (see ``Builtin.default_precision``)."""
    if name in BUILTINS and builtin(name).default_precision == "int8" and shipped_int8(name, weights):
        return "int8"
    return "fp32"


def check_weights(record, now: str | None, index_path) -> None:
    """Refuse an index whose vectors came from other weights than the model has ``now``
    (``fingerprint``): new vectors would not be comparable with them. ``record`` is the manifest's
    model record (an ``IndexedModel``); one without a fingerprint for a built-in model predates the
    heads shipped now."""
    was, name = record.weights, record.name
    if was is None and name in BUILTINS and record.pretrained is None and not BUILTINS[name].unrecorded_weights_match:
        was = "from an earlier mmsearch"
    if was and now and was != now:
        raise ModelMismatchError(
            f"index {index_path} was embedded with other weights of {record.key} than it has now (retrained, "
            f"or a new mmsearch release): index into a new --index folder (or delete {index_path} and index again)"
        )


def model_record(ref: ModelRef) -> ModelRecord:
    """What an index manifest and an export record about a model reference."""
    name = os.path.abspath(ref.name) if os.path.isdir(ref.name) else ref.name  # usable from any cwd
    return ModelRecord(name=name, pretrained=ref.pretrained, key=ref.key(),
                       weights=fingerprint(ref.name, ref.pretrained))


# ---- where a model's bank lives ------------------------------------------------------------------
def bank_path(ref) -> Path | None:
    """Where the query bank of a model reference (``ModelRef``) is kept: beside a built-in model's
    heads, or inside a checkpoint folder. None for other models (no bank can ship with them)."""
    if ref.name in BUILTINS and ref.pretrained is None:
        return builtin(ref.name).bank_file
    if os.path.isdir(ref.name):
        return Path(ref.name) / BANK_FILE
    return None


def load_query_bank(ref, path: Path | None = None, weights: str | None = None) -> QueryBank | None:
    """The model's query bank (from ``path`` if given, e.g. inside an exported folder, else where
    ``bank_path`` says), None when it has none; an error when the bank was embedded with other
    weights than the model has now (``weights``, else its fingerprint): its corrections would be wrong."""
    path = path if path is not None else bank_path(ref)
    if path is None or not path.is_file():
        return None
    bank = QueryBank.load(path)
    now = weights if weights is not None else fingerprint(ref.name, ref.pretrained)
    if bank.weights and now and bank.weights != now:
        raise ModelLoadError(f"query bank {path} was built for other weights of {ref.name} than it has now: "
                             "delete it, or rebuild it with `mmsearch train`")
    return bank
