"""The `mmsearch` command: a thin typer layer over the library (no logic lives here)."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import (
    DEFAULT_MODEL,
    INDEX_ENV_VAR,
    IndexSpec,
    ModelRef,
    TrainConfig,
    default_index_dir,
)
from .errors import MmsearchError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Search photos by meaning: `mmsearch index ./photos`, then `mmsearch query \"a dog on grass\"`.",
)

#: exit codes: 1 for a user's mistake (one `error:` line), 130 for Ctrl-C, EXIT_INTERNAL for a bug in mmsearch
EXIT_INTERNAL = 70  # sysexits.h EX_SOFTWARE
DEBUG_ENV_VAR = "MMSEARCH_DEBUG"


@dataclass
class _Globals:
    """The global options of the running command (set by the root callback before the command runs)."""

    debug: bool = False


_GLOBALS = _Globals()

# ---- options shared by several commands ----------------------------------------------------------
IndexOpt = Annotated[Optional[Path], typer.Option(
    "--index", envvar=INDEX_ENV_VAR, show_envvar=True, help="Index folder [default: ./indexes/default].")]
PretrainedOpt = Annotated[Optional[str], typer.Option("--pretrained", help="open_clip pretrained tag or weights file.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
BackendOpt = Annotated[str, typer.Option("--backend", help="auto (ONNX Runtime when the model has an export), onnx or torch.")]
LangOpt = Annotated[str, typer.Option(
    "--lang", help="Text tower: auto (English and undetermined text to the model's own tower, other languages to "
                   "its multilingual tower), en or multi.")]
PairsArg = Annotated[Path, typer.Argument(
    help="Flickr8k-style folder, or a .csv/.tsv/.parquet table with image,caption columns.")]


def _index_dir(index: Optional[Path]) -> Path:
    return index if index is not None else default_index_dir()


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _warn(bar, message: str) -> None:
    """A warning on stderr, above the progress bar when one is showing."""
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        typer.echo(message, err=True)


# ---- errors: a user's mistake is one line; a bug says so, with its traceback on --debug ----------
def _within(name, roots: list[Path]) -> bool:
    """Whether the path ``name`` is one of ``roots`` or lies under one (as written or with links resolved)."""
    if isinstance(name, int):  # a file descriptor
        return False
    forms = {os.path.abspath(os.fsdecode(name)), os.path.realpath(os.fsdecode(name))}
    for root in roots:
        for base in {os.path.abspath(root), os.path.realpath(root)}:
            if any(f == base or f.startswith(base.rstrip(os.sep) + os.sep) for f in forms):
                return True
    return False


def user_paths(params: dict) -> list[Path]:
    """The paths a command's user chose: its path arguments and options, the index folder in use
    ($MMSEARCH_INDEX or ./indexes/default without --index) and the cache ($MMSEARCH_CACHE or ~/.cache/mmsearch)."""
    from .exported import cache_root

    return [v for v in params.values() if isinstance(v, Path)] + [default_index_dir(), cache_root()]


def is_user_error(e: BaseException, paths: list[Path]) -> bool:
    """The rule for one-line errors: mmsearch's own errors (``MmsearchError``), a full disk, and OS
    errors (missing file, permission denied, not a folder, ...) about one of ``paths`` or anything
    under them. Everything else is a bug in mmsearch."""
    if isinstance(e, MmsearchError):
        return True
    if not isinstance(e, OSError):
        return False
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(_within(name, paths) for name in (e.filename, e.filename2) if name is not None)


def _report(e: Exception, paths: list[Path]) -> None:
    """Print ``e`` as one `error:` line (its traceback first with --debug) and exit."""
    if _GLOBALS.debug:
        typer.echo(traceback.format_exc(), err=True, nl=False)
    message = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {printable(os.fsdecode(e.filename))}" if isinstance(e.filename, (str, bytes)) else ""
        _fail(f"out of disk space ({e.strerror or os.strerror(e.errno)}){where}: free some space and run the "
              "command again")
    if is_user_error(e, paths):
        _fail(message)
    _fail(f"internal error: {type(e).__name__}: {message} (run with --debug or {DEBUG_ENV_VAR}=1 for the traceback)",
          code=EXIT_INTERNAL)


def handle_errors(fn):
    """Turn what a command raises into one `error: ...` line on stderr (see ``is_user_error``):
    exit code 1 for a user's mistake, EXIT_INTERNAL for a bug, 130 for Ctrl-C."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):  # typer's own exits and usage errors
            raise
        except BrokenPipeError:  # `mmsearch query ... | head`: the reader has all it wants
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0)
        except KeyboardInterrupt:
            _fail("interrupted; the index is unchanged since its last commit", code=130)
        except Exception as e:
            _report(e, user_paths(kwargs))

    return wrapper


class _Bar:
    """A progress bar on stderr, opened at the first report (never with --quiet); warnings print above it."""

    def __init__(self, desc: str, unit: str, quiet: bool) -> None:
        self.desc, self.unit, self.quiet, self.bar = desc, unit, quiet, None

    def update(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=self.unit, desc=self.desc, file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def warn(self, message: str) -> None:
        _warn(self.bar, message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- index -----------------------------------------------------------------------------------------
IndexTypeOpt = Annotated[Optional[str], typer.Option(
    "--index-type", help="auto, flat (exact), hnsw, ivfflat or ivfpq (IVF-PQ + exact re-rank) [default: the index's, else auto].")]
FactoryOpt = Annotated[Optional[str], typer.Option(
    "--index-factory", help="Force a faiss index_factory string, e.g. 'IVF4096,PQ32' or 'HNSW32'.")]
MemoryOpt = Annotated[Optional[str], typer.Option(
    "--memory", help="RAM budget for the index, e.g. 4G; picks IVF-PQ and its code size to fit [default: 4G].")]
TargetRecallOpt = Annotated[Optional[float], typer.Option(
    "--target-recall", min=0.01, max=1.0, help="Tune nprobe/efSearch to this recall@10 against exact search [default: 0.95].")]
BuildRerankOpt = Annotated[Optional[int], typer.Option(
    "--rerank", min=1, help="IVF-PQ: re-rank k x this many candidates with the exact vectors [default: 4, deeper if tuning needs it].")]
FrameIntervalOpt = Annotated[Optional[float], typer.Option(
    "--frame-interval", min=0.01, help="Seconds between sampled video frames (plus the first frame) [default: the index's, else 1].")]
SkipSimilarOpt = Annotated[Optional[float], typer.Option(
    "--skip-similar", min=0.0,
    help="Drop video frames this close to the last kept one (mean grey levels, e.g. 3; 0 = off) [default: the index's, else off].")]


def _spec_changes(index_type: Optional[str], factory: Optional[str], memory: Optional[str],
                  target_recall: Optional[float], rerank: Optional[int]) -> Optional[dict]:
    """The changes `mmsearch index` options make to the index's settings (None: keep them all)."""
    from .index import INDEX_TYPES, parse_size

    if index_type not in (None,) + INDEX_TYPES:
        _fail(f"unknown --index-type {index_type!r}: use {', '.join(INDEX_TYPES)}")
    if factory is not None and index_type is not None:
        _fail("give either --index-type or --index-factory, not both")
    if memory is not None:
        parse_size(memory)  # a bad size fails here, before any work
    options = {"index_type": index_type, "factory": factory, "memory": memory, "target_recall": target_recall,
               "rerank_factor": rerank}
    spec = {k: v for k, v in options.items() if v is not None} or None
    if factory is not None:
        spec["index_type"] = "auto"
    elif index_type is not None:
        spec["factory"] = None  # choosing a kind drops a factory string given before
    return spec


def _check_sources(folder: Optional[Path], texts: Optional[Path]) -> None:
    if folder is None and texts is None:
        _fail("nothing to index: give a FOLDER of images and/or --texts FILE")
    if folder is not None and not folder.exists():
        _fail(f"folder not found: {folder} (if it is gone for good, `mmsearch remove {folder}` drops its items)")
    if texts is not None and not texts.is_file():
        _fail(f"texts file not found: {texts}")


def _check_texts(texts: Optional[Path], column: Optional[str], index: Path) -> None:
    """A bad --texts file fails before anything is committed, not after the photos are."""
    if texts is not None:
        from .indexing import texts_records

        texts_records(texts, column, index)


def _echo_index_report(what: str, report) -> None:
    speed = f", {report.embedded_per_second:.1f} items/s" if report.embedded_per_second else ""
    typer.echo(
        f"{report.total} items in {report.index_path} ({report.index_kind or 'empty'}): {what} "
        f"{report.added} added, {report.updated} updated, {report.removed} removed, "
        + (f"{report.moved} moved (kept their vectors), " if report.moved else "")
        + (f"{report.copied} copied (same content as one embedded: vectors reused), " if report.copied else "")
        + (f"{report.duplicates} already indexed under another path (links, not stored again), "
           if report.duplicates else "") +
        f"{report.unchanged} unchanged, {len(report.skipped)} skipped in {report.seconds:.1f}s{speed}",
        err=True,
    )
    for note in report.index_notes:
        typer.echo(f"note: {note}", err=True)


@app.command()
@handle_errors
def index(
    folder: Optional[Path] = typer.Argument(None, help="Folder of images to index (recursive)."),
    texts: Optional[Path] = typer.Option(
        None, "--texts", help="Also index texts: a .txt file (one per line) or a .csv/.tsv/.parquet column."),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="Column of --texts table [default: text, else caption]."),
    index: IndexOpt = None,
    model: Optional[str] = typer.Option(
        None, "--model", help=f"open_clip model name, hf-hub: id or checkpoint folder [default: the index's, else {DEFAULT_MODEL}]."),
    pretrained: PretrainedOpt = None,
    index_type: IndexTypeOpt = None,
    factory: FactoryOpt = None,
    memory: MemoryOpt = None,
    target_recall: TargetRecallOpt = None,
    rerank: BuildRerankOpt = None,
    frame_interval: FrameIntervalOpt = None,
    skip_similar: SkipSimilarOpt = None,
    backend: str = typer.Option(
        "auto", "--backend", help="auto (ONNX Runtime when the model has an export; built-in models are exported on first use), onnx or torch."),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="fp32 or int8 (ONNX Runtime) [default: the index's, else the model's: int8 for mmsearch-lite2, else fp32]."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per forward pass."),
    commit_every: int = typer.Option(2048, "--commit-every", min=1, help="Save progress to disk every N images."),
    ray: bool = typer.Option(False, "--ray", help="Embed on a Ray cluster (pip install 'mmsearch[ray]'): "
                             "--ray-address's, else RAY_ADDRESS's, else one running on this machine, else a new local one."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Cluster to join (auto, ray://HOST:10001, local: a new one); implies --ray."),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", min=1, help="Embedding actors [default: one per cluster CPU]."),
    lang: LangOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Add new, re-embed changed and drop deleted images and videos of FOLDER (and texts of --texts) in the index."""
    from .config import IndexingConfig, RayOptions
    from .indexing import index_folder, index_texts

    spec = _spec_changes(index_type, factory, memory, target_recall, rerank)
    _check_backend(backend, precision)
    _check_sources(folder, texts)
    on_ray = None
    if ray or ray_address or ray_workers:
        from .scale import ray_module

        ray_module()  # not installed: one line now, before any work
        on_ray = RayOptions(address=ray_address, workers=ray_workers)
    config = IndexingConfig(batch_size=batch_size, commit_every=commit_every, frame_interval=frame_interval,
                            skip_similar=skip_similar, backend=backend, precision=precision, ray=on_ray,
                            lang=_check_lang(lang))
    where, ref = _index_dir(index), (ModelRef(model, pretrained) if model else None)
    _check_texts(texts, text_column, where)
    reports = []
    with _Bar("embedding", "file", quiet) as bar:
        if folder is not None:
            reports.append(("files", index_folder(folder, where, model=ref, spec=spec, config=config, on_progress=bar.update,
                                                  on_skip=lambda s: bar.warn(f"warning: skipped {printable(s.path)}: {printable(s.reason)}"))))
        if texts is not None:
            bar.close()  # the texts get a bar of their own
            reports.append(("texts", index_texts(texts, where, column=text_column, model=ref, spec=spec, config=config,
                                                 on_progress=bar.update)))
    for what, report in reports:
        _echo_index_report(what, report)


# ---- query -----------------------------------------------------------------------------------------
KINDS = ("auto", "all", "image", "video", "text")


def _check_lang(lang: str) -> str:
    from .lang import LANGS

    if lang not in LANGS:
        _fail(f"unknown --lang {lang!r}: use {', '.join(LANGS)}")
    return lang


def _check_backend(backend: str, precision: Optional[str]) -> None:
    from .encoder import BACKENDS
    from .exported import PRECISIONS

    if backend not in BACKENDS:
        _fail(f"unknown --backend {backend!r}: use {', '.join(BACKENDS)}")
    if precision is not None and precision not in PRECISIONS:
        _fail(f"unknown --precision {precision!r}: use {', '.join(PRECISIONS)}")


def _hit_json(h) -> dict:
    return {"rank": h.rank, "score": round(h.score, 6), "path": h.path, "kind": h.kind,
            **({"text": h.text} if h.kind == "text" else {}),
            **({"start": h.start, "end": h.end} if h.kind == "video" else {})}


def printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (``\\t``, ``\\n``, ``\\x1b``...), so a
    name cannot split a tab-separated line or send escape sequences to the terminal."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _hit_line(h) -> str:
    """`score<TAB>path` (images), `score<TAB>text` (texts), `score<TAB>path<TAB>start-end` (videos, seconds)."""
    if h.kind == "text":
        return f"{h.score:.4f}\t{printable(h.text)}"
    if h.kind == "video":
        return f"{h.score:.4f}\t{printable(h.path)}\t{h.start:g}-{h.end:g}"
    return f"{h.score:.4f}\t{printable(h.path)}"


def _searcher(index: Optional[Path], model: Optional[Path], backend: str, **options):
    """A Searcher over the index, with the exported folder ``model`` as its encoder when given."""
    from .search import Searcher

    _check_backend(backend, None)
    encoder = None
    if model is not None:
        from .exported import is_export

        if not is_export(model):
            _fail(f"--model {model} is not an exported model folder (no mmsearch_export.json): make one with "
                  "`mmsearch export MODEL --out DIR`; without --model the index's own model is used")
        from .encoder import Encoder
        from .store import Collection

        collection = Collection.open(_index_dir(index), load_index=True)  # for the index's precision
        encoder = Encoder(str(model), precision=collection.model.precision or "fp32")
        return Searcher(collection, encoder=encoder, backend=backend, **options)
    return Searcher(_index_dir(index), backend=backend, **options)


def _check_query(text: Optional[str], image: Optional[Path], batch: Optional[Path]) -> Optional[list[str]]:
    """The queries of --batch FILE (None without it), after checking that the query makes sense."""
    if sum(x is not None for x in (text, image, batch)) > 1:
        _fail("give one of: a text query, --image PATH or --batch FILE")
    if batch is None:
        if image is None and (text is None or not text.strip()):
            _fail("empty query: give some text to search for, or --image PATH")
        if image is not None and not image.is_file():
            _fail(f"query image not found: {image}")
        return None
    if not batch.is_file():
        _fail(f"queries file not found: {batch}")
    from .indexing import read_texts

    queries = [r.text for r in read_texts(batch)]
    if not queries:
        _fail(f"no queries in {batch}: it has no non-blank lines")
    return queries


def _echo_batch(searcher, queries: list[str], k: int, kind: str, as_json: bool) -> None:
    """Answer the queries 1024 at a time: `query<TAB>score<TAB>result` lines, or one JSON object a query."""
    for start in range(0, len(queries), 1024):
        chunk = queries[start:start + 1024]
        for q, hits in zip(chunk, searcher.search_texts(chunk, k, kind)):
            if as_json:
                typer.echo(json.dumps({"query": q, "hits": [_hit_json(h) for h in hits]}))
            else:
                for h in hits:
                    typer.echo(f"{q}\t{_hit_line(h)}")


@app.command()
@handle_errors
def query(
    text: Optional[str] = typer.Argument(None, help="What to look for, in words."),
    image: Optional[Path] = typer.Option(None, "--image", help="Find images similar to this one."),
    k: int = typer.Option(10, "-k", "--top-k", min=1, help="Number of results."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array of {rank, score, path, kind}."),
    kind: str = typer.Option(
        "auto", "--kind", help="image, video, text or all; auto = the other modality when the index has it (text -> photos and videos, image -> texts)."),
    batch: Optional[Path] = typer.Option(
        None, "--batch", help="Answer every line of this text file as a query (batched); prints query<TAB>score<TAB>result."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", min=1, help="IVF lists to visit [default: tuned at build]."),
    ef_search: Optional[int] = typer.Option(None, "--ef-search", min=1, help="HNSW search breadth [default: tuned at build]."),
    rerank: Optional[int] = typer.Option(None, "--rerank", min=1, help="IVF-PQ: re-rank k x this many candidates [default: the index's]."),
    plain: bool = typer.Option(False, "--plain", help="Rank by plain cosine, without the model's hubness correction."),
    per_video: int = typer.Option(3, "--per-video", min=1, help="At most this many spans (shots) of one video."),
    model: Optional[Path] = typer.Option(
        None, "--model", help="An exported model folder (`mmsearch export`) of the index's model [default: the index's model]."),
    backend: BackendOpt = "auto",
    lang: LangOpt = "auto",
    index: IndexOpt = None,
) -> None:
    """Print the best matches, best first: `score<TAB>path` for images, `score<TAB>path<TAB>start-end`
    for videos (seconds), `score<TAB>text` for texts."""
    queries = _check_query(text, image, batch)
    if kind not in KINDS:
        _fail(f"unknown --kind {kind!r}: use image, video, text, all or auto")
    searcher = _searcher(index, model, backend, nprobe=nprobe, ef_search=ef_search, rerank_factor=rerank,
                         hubness=not plain, per_video=per_video, lang=_check_lang(lang),
                         expect=[text] if text is not None else None)
    if queries is not None:
        return _echo_batch(searcher, queries, k, kind, as_json)
    hits = searcher.search_image(image, k, kind) if image is not None else searcher.search_text(text, k, kind)
    if as_json:
        typer.echo(json.dumps([_hit_json(h) for h in hits]))
    else:
        for h in hits:
            typer.echo(_hit_line(h))


@app.command()
@handle_errors
def info(
    index: IndexOpt = None,
    as_json: bool = typer.Option(False, "--json", help="Print the facts as JSON."),
) -> None:
    """What the index holds: model, count, dimension, index type, size on disk."""
    from .store import Collection

    facts = Collection.open(_index_dir(index)).facts()
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        if key == "disk_bytes":
            value = f"{value / 2**20:.2f} MiB ({value} bytes)"
        typer.echo(f"{key + ':':16s}{value}")


@app.command()
@handle_errors
def remove(
    paths: list[Path] = typer.Argument(..., help="Folders or files (or texts files) whose items should leave the index."),
    index: IndexOpt = None,
) -> None:
    """Drop the items of PATHS from the index, whether or not the files still exist; nothing is re-embedded."""
    from .indexing import remove_paths

    report = remove_paths(_index_dir(index), [str(p) for p in paths])
    typer.echo(f"{report.total} items in {report.index_path} ({report.index_kind or 'empty'}): "
               f"{report.removed} files removed in {report.seconds:.1f}s", err=True)


@app.command()
@handle_errors
def doctor(
    index: IndexOpt = None,
    fix: bool = typer.Option(False, "--repair", help="Repair what is wrong, re-embedding only what cannot be recovered."),
    as_json: bool = typer.Option(False, "--json", help="The report as JSON."),
) -> None:
    """Check the index against itself and its commit records (checksums); --repair mends it."""
    from dataclasses import asdict

    from . import doctor as dr

    folder = _index_dir(index)
    report = dr.repair(folder) if fix else dr.examine(folder)
    if as_json:
        typer.echo(json.dumps({**asdict(report), "healthy": report.healthy}, indent=2, ensure_ascii=True))
    else:
        _doctor_lines(report)
    if not report.healthy:
        left = report.found if report.remaining is None else report.remaining
        _fail(f"index {folder} has {len(left)} problem(s)" + ("" if fix else f": repair with `mmsearch doctor "
                                                               f"--index {folder} --repair`"))


def _doctor_lines(report) -> None:
    kept = f", {report.previous} kept to fall back to" if report.previous else ""
    typer.echo(f"index {printable(report.index)}: {report.generation or 'no generation'}, {report.count} items{kept}")
    for f in report.found:
        typer.echo(f"problem: {printable(f.where)}: {printable(f.problem)} (--repair: {f.fix})")
    for line in report.repaired:
        typer.echo(f"repaired: {printable(line)}")
    for path in report.lost:
        typer.echo(f"lost: {printable(path)} (not recovered: index it again)")
    if report.healthy:
        typer.echo("healthy")


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@app.command()
@handle_errors
def serve(
    index: IndexOpt = None,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; any other than this machine needs --token."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port (0: any free one, printed at start)."),
    token: Optional[str] = typer.Option(None, "--token", envvar="MMSEARCH_TOKEN",
                                        help="Require this bearer token on every request (the page asks for it once)."),
) -> None:
    """Serve the index: a JSON API (/api/search ...) and a search page, on one local origin."""
    if host not in LOCAL_HOSTS and not token:
        _fail(f"--host {host} makes the index reachable from other machines: give --token T (or MMSEARCH_TOKEN)")
    import socket

    import uvicorn

    from .serve.app import create_app

    app = create_app(_index_dir(index), token=token)  # loads the index and the model before listening
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: without, a kept-alive connection stalls ~40 ms per response
    # (the response goes out in two writes, and Nagle waits for the client's delayed ACK)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        _fail(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port")
    sock.listen(128)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    typer.echo(f"serving http://{shown}:{sock.getsockname()[1]}", err=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


@app.command()
@handle_errors
def frame(
    video: Path = typer.Argument(..., help="A video file."),
    at: float = typer.Option(..., "--at", min=0.0, help="Time in seconds (e.g. the start of a hit's span)."),
    out: Path = typer.Option(..., "--out", "-o", help="Image file to write (.jpg, .png, ...)."),
) -> None:
    """Write the frame shown at --at seconds of VIDEO to an image file, to look at a hit."""
    from .video import frame_at

    if not video.is_file():
        _fail(f"video not found: {video}")
    image = frame_at(str(video), at)
    if out.parent and not out.parent.exists():
        _fail(f"folder not found for --out: {out.parent}")
    try:
        image.save(out)
    except (KeyError, ValueError):
        _fail(f"cannot write {out}: give it an image extension such as .jpg or .png")
    typer.echo(f"wrote {out} ({image.width}x{image.height}, {video} at {at:g}s)", err=True)


def _load_pairs_or_fail(data: Path, split: Optional[str]):
    from .data import load_pairs

    pairs = load_pairs(data, split)
    for problem in pairs.problems():
        typer.echo(f"warning: {data}: {problem}", err=True)
    if len(pairs) == 0:
        _fail(f"no usable image-caption pairs in {data}")
    return pairs


@app.command("eval")
@handle_errors
def eval_(
    data: PairsArg,
    split: Optional[str] = typer.Option(None, "--split", help="train, dev or test (Flickr8k folders) [default: test]."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Model name, hf-hub: id or checkpoint folder."),
    pretrained: PretrainedOpt = None,
    as_json: bool = typer.Option(False, "--json", help="Print the recalls as JSON."),
    via_index: bool = typer.Option(False, "--via-index", help="Also answer text->image through a faiss index; report its ANN recall."),
    index_type: str = typer.Option("ivfpq", "--index-type", help="Index kind for --via-index: auto, flat or ivfpq."),
    plain: bool = typer.Option(False, "--plain", help="Rank by plain cosine only, without the model's hubness correction."),
    backend: BackendOpt = "auto",
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 or int8 (ONNX Runtime) [default: the model's, as new indexes get]."),
    lang: LangOpt = "auto",
    compare: Optional[str] = typer.Option(
        None, "--compare", help="A table's second caption column (the same photos described in another language), "
                                "searched alike [default: caption_en when the table has it]."),
    quiet: QuietOpt = False,
) -> None:
    """Recall@1/5/10 text->image and image->text on image-caption pairs, ranked as `mmsearch query`
    ranks (with the model's hubness correction, and by plain cosine beside it)."""
    from tqdm import tqdm

    from .encoder import get_encoder
    from .evaluate import evaluate

    _check_backend(backend, precision)
    pairs = _load_pairs_or_fail(data, split)
    other = _compare_pairs(data, compare)
    enc = get_encoder(model, pretrained=pretrained, backend=backend, precision=precision)
    bar = None if quiet else tqdm(total=len(pairs), unit="img", desc="embedding", file=sys.stderr, dynamic_ncols=True)
    try:
        r = evaluate(enc, pairs, via_index=IndexSpec(index_type=index_type) if via_index else None,
                     on_progress=(lambda done, total: bar.update(done - bar.n)) if bar else None, hubness=not plain,
                     lang=_check_lang(lang), compare=other)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        typer.echo(json.dumps(r))
        return
    _echo_eval(r)
    if via_index:
        v = r["via_index"]
        typer.echo(f"{'via ' + v['index']['kind']:12s} " + "  ".join(f"R@{k} {x:.3f}" for k, x in v["t2i"].items())
                   + "   ANN recall " + "  ".join(f"@{k} {x:.3f}" for k, x in v["ann_recall"].items()))


def _towers(counts: dict) -> str:
    return ", ".join(f"{n} by the {'multilingual' if t == 'multi' else 'English'} tower" for t, n in counts.items() if n)


def _echo_eval(r: dict) -> None:
    typer.echo(f"{r['model']} on {r['n_images']} images, {r['n_texts']} captions ({_towers(r['towers'])})")
    for key, name in (("t2i", "text->image"), ("i2t", "image->text")):
        line = f"{name:12s} " + "  ".join(f"R@{k} {v:.3f}" for k, v in r[key].items())
        if "plain" in r:
            line += "   (plain cosine: " + "  ".join(f"R@{k} {v:.3f}" for k, v in r["plain"][key].items()) + ")"
        typer.echo(line)
    for column, c in r.get("compare", {}).items():
        typer.echo(f"{column}: {c['n_texts']} captions ({_towers(c['towers'])})")
        typer.echo(f"{'text->image':12s} " + "  ".join(f"R@{k} {v:.3f}" for k, v in c["t2i"].items()))


def _compare_pairs(data: Path, column: Optional[str]):
    """(column, pairs) of the table's comparison column (--compare, else caption_en if present), or None."""
    from .data import load_table, read_table_columns

    if data.is_dir():
        if column is not None:
            _fail("--compare names a column of a pairs table, not of a Flickr8k folder")
        return None
    columns = read_table_columns(data)
    if column is None:
        column = "caption_en" if "caption_en" in columns else None
    elif column not in columns:
        _fail(f"{data} has no column {column!r} to compare (columns: {', '.join(columns)})")
    return (column, load_table(data, caption_column=column)) if column else None


class _TrainBars:
    """`mmsearch train`'s progress on stderr: a bar per feature cache being filled and the epochs' bar."""

    def __init__(self, epochs: int, quiet: bool) -> None:
        self.quiet, self.features = quiet, {}
        self.epochs = _Bar("training", "epoch", quiet)
        self.epochs.update(0, epochs)  # shown from the start

    def feature(self, name: str, done: int, total: int) -> None:
        self.features.setdefault(name, _Bar(f"features ({name})", "img", self.quiet)).update(done, total)

    def epoch(self, r: dict) -> None:
        if self.epochs.bar is not None:
            self.epochs.bar.update(1)
            self.epochs.bar.set_postfix(loss=f"{r['loss']:.3f}", val_t2i_R10=f"{r['val']['t2i'][10]:.3f}",
                                        val_i2t_R10=f"{r['val']['i2t'][10]:.3f}")

    def skipped(self, path: str, reason: str) -> None:
        bar = next((b.bar for b in self.features.values() if b.bar is not None), None) or self.epochs.bar
        _warn(bar, f"warning: skipped {printable(path)}: {printable(reason.removeprefix(path + ': '))}")

    def __enter__(self) -> "_TrainBars":
        return self

    def __exit__(self, *exc) -> None:
        for bar in [*self.features.values(), self.epochs]:
            bar.close()


def _train_val_pairs(data: Path, val: Optional[Path], split: str, val_split: str):
    """The training pairs and the validation pairs: those of --val, else the folder's --val-split."""
    if not data.is_dir() and val is None:
        _fail("a pairs table needs --val VALIDATION_TABLE (pairs kept out of training)")
    train_pairs = _load_pairs_or_fail(data, split if data.is_dir() else None)
    source = val if val is not None else data
    return train_pairs, _load_pairs_or_fail(source, val_split if source.is_dir() else None)


def _echo_trained(record: dict, out: Path) -> None:
    v = record["best_val"]
    typer.echo(f"wrote {out} (best epoch {record['best_epoch']} of {len(record['history'])}, {record['mode']}): "
               f"validation text->image R@1/5/10 {v['t2i'][1]:.3f}/{v['t2i'][5]:.3f}/{v['t2i'][10]:.3f}, "
               f"image->text {v['i2t'][1]:.3f}/{v['i2t'][5]:.3f}/{v['i2t'][10]:.3f} in {record['seconds']}s", err=True)
    typer.echo(f"use it: mmsearch index FOLDER --model {out}", err=True)


@app.command()
@handle_errors
def train(
    data: PairsArg,
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the trained open_clip checkpoint to."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation pairs (table) [default: the folder's dev split]."),
    split: str = typer.Option("train", "--split", help="Training split of a Flickr8k-style folder."),
    val_split: str = typer.Option("dev", "--val-split", help="Validation split of a Flickr8k-style folder."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Model to start from: name, hf-hub: id or checkpoint folder."),
    pretrained: PretrainedOpt = None,
    unlock_image: int = typer.Option(0, "--unlock-image", min=0, help="Train the last N layer groups of the image tower (0: locked)."),
    unlock_text: int = typer.Option(0, "--unlock-text", min=0, help="Train the last N layers of the text tower (0: locked); with the image tower locked they train on cached states."),
    epochs: int = typer.Option(TrainConfig.epochs, "--epochs", min=1, help="Most epochs; stops early without progress."),
    batch_size: int = typer.Option(TrainConfig.batch_size, "--batch-size", min=2, help="Pairs per step."),
    lr: float = typer.Option(TrainConfig.lr, "--lr", help="Peak learning rate."),
    patience: int = typer.Option(TrainConfig.patience, "--patience", min=1, help="Epochs without a better validation score before stopping."),
    seed: int = typer.Option(TrainConfig.seed, "--seed", help="Random seed (runs are deterministic on CPU)."),
    tower_lr_scale: float = typer.Option(TrainConfig.tower_lr_scale, "--tower-lr-scale", help="Unlocked tower layers learn at --lr times this."),
    captions_per_step: int = typer.Option(TrainConfig.captions_per_step, "--captions-per-step", min=1, help="Captions of each image per step (locked towers)."),
    flip: bool = typer.Option(TrainConfig.flip_views, "--flip/--no-flip", help="Also train on mirrored images (locked towers; caches their features too)."),
    zoom: bool = typer.Option(TrainConfig.zoom_views, "--zoom/--no-zoom", help="Also train on the images' centres, zoomed in (locked towers)."),
    query_bank: int = typer.Option(TrainConfig.query_bank, "--query-bank", min=0,
                                   help="Training images (one caption each) kept as the model's query bank for the hubness correction; 0: none."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Feature cache folder [default: ~/.cache/mmsearch/features]."),
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a model on image-caption pairs with InfoNCE; writes a checkpoint --model accepts."""
    from .train import train_model

    train_pairs, val_pairs = _train_val_pairs(data, val, split, val_split)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, seed=seed,
                      captions_per_step=captions_per_step, flip_views=flip, zoom_views=zoom,
                      tower_lr_scale=tower_lr_scale, query_bank=query_bank)
    with _TrainBars(epochs, quiet) as bars:
        record = train_model(train_pairs, val_pairs, out, model_name=model, pretrained=pretrained, cfg=cfg,
                             unlock_image=unlock_image, unlock_text=unlock_text, cache_dir=cache,
                             on_epoch=bars.epoch, on_progress=bars.feature, on_skip=bars.skipped)
    _echo_trained(record, out)


@app.command()
@handle_errors
def export(
    model: str = typer.Argument(DEFAULT_MODEL, help="Model to export: built-in name, open_clip name, hf-hub: id or checkpoint folder."),
    pretrained: PretrainedOpt = None,
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Folder to write [default: the cache, ~/.cache/mmsearch/onnx/<fingerprint>, or $MMSEARCH_CACHE/onnx/...]."),
    precision: str = typer.Option(
        "fp32", "--precision", help="int8: (re)make the int8 image graph from --calibrate (built-in models ship theirs)."),
    calibrate: Optional[Path] = typer.Option(
        None, "--calibrate", help="int8: image-caption pairs to calibrate on (a Flickr8k-style folder, its train split; or a table)."),
    calibrate_images: int = typer.Option(256, "--calibrate-images", min=8, help="int8: photos sampled to calibrate on."),
) -> None:
    """Export a model's two towers to ONNX (with its tokenizer, preprocessing, query bank, and the
    int8 image graph a built-in model ships), so indexing and queries run on ONNX Runtime without
    torch. Needs the torch extra."""
    from .config import ModelRef
    from .encoder import torch_installed
    from .exported import PRECISIONS, ExportManifest, cache_folder, holds_export_of
    from .weights import model_record

    if precision not in PRECISIONS:
        _fail(f"unknown --precision {precision!r}: use {', '.join(PRECISIONS)}")
    if calibrate is not None and precision != "int8":
        _fail("--calibrate makes int8 graphs: add --precision int8")
    if calibrate is not None and not calibrate.exists():
        _fail(f"calibration pairs not found: {calibrate}")
    if not torch_installed():
        _fail("exporting needs torch and open_clip: pip install 'mmsearch[torch]'")
    from .export import export_model

    ref = ModelRef(model, pretrained)
    record = model_record(ref)
    folder = out if out is not None else cache_folder(record)
    if not holds_export_of(folder, record):
        folder = export_model(ref, out=folder, record=record)
        typer.echo(f"exported {record.key} to {folder}", err=True)
    else:
        typer.echo(f"{record.key} is already exported at {folder}", err=True)
    has_int8 = "int8" in ExportManifest.load(folder).precisions  # the built-in models ship theirs
    if precision == "int8" and calibrate is None and not has_int8:
        _fail(f"{record.key} ships no int8 graph: --precision int8 needs --calibrate PAIRS, photos and captions "
              "to measure activation ranges on")
    if precision == "int8" and calibrate is not None:
        from .quantize import add_int8

        split = "train" if calibrate.is_dir() else None
        pairs = _load_pairs_or_fail(calibrate, split)
        source = f"{calibrate.resolve()}" + (f" ({split} split)" if split else "")
        add_int8(folder, pairs, source=source, n_images=calibrate_images)
        typer.echo(f"int8 graphs in {folder} calibrated on {min(calibrate_images, len(pairs))} photos of {source}",
                   err=True)
    typer.echo(str(folder))


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"mmsearch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    debug: bool = typer.Option(
        False, "--debug", envvar=DEBUG_ENV_VAR, show_envvar=True,
        help="On an error, print its full traceback (to report a bug: an `internal error` is one)."),
) -> None:
    """Search photos by meaning, offline."""
    _GLOBALS.debug = debug


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
