"""The `mmsearch` command: a thin typer layer over the library (no logic lives here)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .config import DEFAULT_MODEL, INDEX_ENV_VAR, IndexSpec, ModelRef, default_index_dir
from .errors import MmsearchError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Search photos by meaning: `mmsearch index ./photos`, then `mmsearch query \"a dog on grass\"`.",
)

IndexOpt = typer.Option(
    None, "--index", envvar=INDEX_ENV_VAR, show_envvar=True,
    help="Index folder [default: ./indexes/default].",
)


def _index_dir(index: Optional[Path]) -> Path:
    return index if index is not None else default_index_dir()


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def handle_errors(fn):
    """Expected failures become one `error: ...` line on stderr and exit code 1, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (MmsearchError, OSError) as e:
            _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
        except KeyboardInterrupt:
            _fail("interrupted; the index is unchanged since its last commit", code=130)

    return wrapper


@app.command()
@handle_errors
def index(
    folder: Path = typer.Argument(..., help="Folder to index (recursive)."),
    index: Optional[Path] = IndexOpt,
    model: Optional[str] = typer.Option(
        None, "--model", help=f"open_clip model name, hf-hub: id or checkpoint folder [default: the index's, else {DEFAULT_MODEL}]."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="open_clip pretrained tag or weights file."),
    index_type: Optional[str] = typer.Option(
        None, "--index-type", help="auto, flat (exact) or ivfpq (IVF-PQ + exact re-rank) [default: the index's, else auto]."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per forward pass."),
    commit_every: int = typer.Option(2048, "--commit-every", min=1, help="Save progress to disk every N images."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Add new, re-embed changed and drop deleted images of FOLDER in the index."""
    from dataclasses import replace

    from tqdm import tqdm

    from .config import IndexingConfig
    from .indexing import index_folder

    if index_type not in (None, "auto", "flat", "ivfpq"):
        _fail(f"unknown --index-type {index_type!r}: use auto, flat or ivfpq")
    if not folder.exists():
        _fail(f"folder not found: {folder}")
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if quiet:
            return
        if bar is None:
            bar = tqdm(total=total, unit="img", desc="embedding", file=sys.stderr, dynamic_ncols=True)
        bar.update(done - bar.n)

    def skip(s) -> None:
        (bar.write if bar is not None else lambda m: typer.echo(m, err=True))(f"warning: skipped {s.path}: {s.reason}")

    ref = ModelRef(model, pretrained) if model else None
    try:
        report = index_folder(
            folder, _index_dir(index), model=ref, spec=IndexSpec(index_type=index_type) if index_type else None,
            config=replace(IndexingConfig(), batch_size=batch_size, commit_every=commit_every),
            on_progress=progress, on_skip=skip,
        )
    finally:
        if bar is not None:
            bar.close()
    speed = f", {report.embedded_per_second:.1f} img/s" if report.embedded_per_second else ""
    typer.echo(
        f"{report.total} items in {report.index_path} ({report.index_kind or 'empty'}): "
        f"{report.added} added, {report.updated} updated, {report.removed} removed, "
        f"{report.unchanged} unchanged, {len(report.skipped)} skipped in {report.seconds:.1f}s{speed}",
        err=True,
    )


@app.command()
@handle_errors
def query(
    text: Optional[str] = typer.Argument(None, help="What to look for, in words."),
    image: Optional[Path] = typer.Option(None, "--image", help="Find images similar to this one."),
    k: int = typer.Option(10, "-k", "--top-k", min=1, help="Number of results."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array of {rank, score, path}."),
    index: Optional[Path] = IndexOpt,
) -> None:
    """Print the best matches: `score<TAB>path` lines, best first."""
    from .search import Searcher

    if image is None and (text is None or not text.strip()):
        _fail("empty query: give some text to search for, or --image PATH")
    if image is not None and text is not None:
        _fail("give either a text query or --image, not both")
    if image is not None and not image.is_file():
        _fail(f"query image not found: {image}")
    searcher = Searcher(_index_dir(index))
    hits = searcher.search_image(image, k) if image is not None else searcher.search_text(text, k)
    if as_json:
        typer.echo(json.dumps([{"rank": h.rank, "score": round(h.score, 6), "path": h.path, "kind": h.kind}
                               for h in hits]))
    else:
        for h in hits:
            typer.echo(f"{h.score:.4f}\t{h.path}")


@app.command()
@handle_errors
def info(
    index: Optional[Path] = IndexOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the facts as JSON."),
) -> None:
    """What the index holds: model, count, dimension, index type, size on disk."""
    from .store import Collection

    c = Collection.open(_index_dir(index))
    m = c.manifest
    facts = {
        "index": str(c.path.resolve()),
        "model": m["model"]["key"],
        "count": m["count"],
        "counts_by_kind": m.get("counts_by_kind", {}),
        "dim": m["dim"],
        "index_type": m["index"]["kind"],
        "index_params": m["index"]["params"],
        "disk_bytes": c.disk_bytes(),
        "format_version": m["format_version"],
        "created": m["created"],
        "updated": m["updated"],
    }
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        if key == "disk_bytes":
            value = f"{value / 2**20:.2f} MiB ({value} bytes)"
        typer.echo(f"{key + ':':16s}{value}")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"mmsearch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Search photos by meaning, offline."""


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
