"""Image-caption pair datasets: the Flickr8k folder layout (token file + official split files)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import BadArgumentError, DataError, PathNotFoundError

SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
TOKEN_FILE = "Flickr8k.token.txt"


@dataclass
class Pairs:
    """Images with their captions: ``captions[i]`` are the captions of ``images[i]``."""

    images: list[str]  # absolute image paths
    captions: list[list[str]]
    missing_images: list[str] = field(default_factory=list)  # listed but not on disk: left out
    empty_captions: int = 0  # blank captions left out
    uncaptioned: list[str] = field(default_factory=list)  # images with no (non-blank) caption: left out
    blank_paths: int = 0  # table rows with no image path: left out

    def problems(self) -> list[str]:
        """One line per kind of problem found while reading, for the caller to show."""
        out = []
        if self.missing_images:
            first = ", ".join(self.missing_images[:3])
            out.append(f"{len(self.missing_images)} image(s) not found, skipped (first: {first})")
        if self.blank_paths:
            out.append(f"{self.blank_paths} row(s) without an image path skipped")
        if self.empty_captions:
            out.append(f"{self.empty_captions} empty caption(s) skipped")
        if self.uncaptioned:
            first = ", ".join(self.uncaptioned[:3])
            out.append(f"{len(self.uncaptioned)} image(s) without a caption skipped (first: {first})")
        return out

    def flat(self) -> tuple[list[str], list[int]]:
        """All captions in one list and, for each, the index of its image."""
        texts, owner = [], []
        for i, caps in enumerate(self.captions):
            texts.extend(caps)
            owner.extend([i] * len(caps))
        return texts, owner

    def subset(self, n: int) -> "Pairs":
        return Pairs(self.images[:n], self.captions[:n])

    def __len__(self) -> int:
        return len(self.images)


def load_flickr8k(root: str | Path, split: str) -> Pairs:
    """The images of one official split (train/dev/test) with their five captions each.

    Images listed in the split but missing on disk (the original release has one), blank captions
    and images without any caption are left out and reported by ``Pairs.problems()``.
    """
    root = Path(root)
    if split not in SPLIT_FILES:
        raise BadArgumentError(f"unknown split {split!r}: use one of {', '.join(SPLIT_FILES)}")
    for name in (TOKEN_FILE, SPLIT_FILES[split]):
        if not (root / name).is_file():
            raise PathNotFoundError(f"{root / name} not found: pass a Flickr8k folder")
    caps: dict[str, list[str]] = {}
    empty = 0
    for line in _read_text(root / TOKEN_FILE).splitlines():
        if "\t" not in line:
            continue
        key, text = line.split("\t", 1)
        caps.setdefault(key.split("#", 1)[0], [])
        if text.strip():
            caps[key.split("#", 1)[0]].append(text.strip())
        else:
            empty += 1
    names = [n.strip() for n in _read_text(root / SPLIT_FILES[split]).splitlines() if n.strip()]
    images, captions, missing, uncaptioned = [], [], [], []
    for name in names:
        path = root / "images" / name
        if not caps.get(name):
            uncaptioned.append(str(path))
            continue
        if not path.is_file():
            missing.append(str(path))
            continue
        images.append(str(path.resolve()))
        captions.append(caps[name])
    return Pairs(images, captions, missing, empty, uncaptioned)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None


TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".parquet": None}


def _read_columns(path: Path) -> tuple[dict[str, str], Callable[[str], list]]:
    """(lower-case name -> column name, getter of a column's values) of a csv/tsv/parquet table."""
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path}: unsupported table type {suffix or '(none)'}: use .csv, .tsv or .parquet")
    if not path.is_file():
        raise PathNotFoundError(f"table not found: {path}")
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        def unreadable(e: Exception) -> DataError:
            reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
            return DataError(f"{path}: not a readable parquet table ({reason})")

        try:
            table = pq.read_table(path)
        except (OSError, ValueError, pa.ArrowException) as e:  # pyarrow.ArrowInvalid is a ValueError
            raise unreadable(e) from None
        columns = {c.lower(): c for c in table.column_names}

        def get(c: str) -> list:
            try:
                return table.column(columns[c]).to_pylist()
            except (KeyError, ValueError, pa.ArrowException) as e:  # e.g. strings that are not UTF-8, a name twice
                raise unreadable(e) from None

        return columns, get
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: tables saved by Excel start with a BOM
            rows = list(csv.DictReader(f, delimiter=TABLE_SUFFIXES[suffix]))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable {suffix[1:]} table ({e})") from None
    columns = {(c or "").strip().lower(): c for c in (rows[0].keys() if rows else [])}
    return columns, lambda c: [r[columns[c]] for r in rows]


def read_table_columns(path: str | Path) -> list[str]:
    """The column names of a CSV, TSV or parquet table."""
    return list(_read_columns(Path(path))[0])


def read_table_column(path: str | Path, column: str | None = None) -> list:
    """The values of one column (default: "text", else "caption") of a csv/tsv/parquet table."""
    path = Path(path)
    columns, get = _read_columns(path)
    name = (column or next((c for c in ("text", "caption") if c in columns), "text")).lower()
    if name not in columns:
        raise DataError(f"{path}: no column {name!r} (columns: {', '.join(columns) or 'none'}); "
                         "name one with --text-column")
    return get(name)


def load_table(path: str | Path, image_column: str = "image", caption_column: str = "caption") -> Pairs:
    """Image-caption pairs from a CSV, TSV or parquet table with ``image`` and ``caption`` columns.

    Image paths are absolute or relative to the table's folder; rows of the same image are grouped.
    Rows whose image is missing or whose caption is blank are left out and counted.
    """
    path = Path(path)
    columns, get = _read_columns(path)
    need = [c for c in (image_column, caption_column) if c not in columns]
    if need:
        raise DataError(f"{path}: no column {', '.join(map(repr, need))} (columns: {', '.join(columns) or 'none'}); "
                         f"a pairs table needs '{image_column}' and '{caption_column}'")
    by_image: dict[str, list[str]] = {}
    missing: dict[str, None] = {}  # ordered set
    empty = blank = 0
    exists: dict[str, bool] = {}
    for row, (image, caption) in enumerate(zip(get(image_column), get(caption_column)), start=1):
        if image is not None and not isinstance(image, str):
            raise DataError(f"{path}: row {row}: column {image_column!r} must hold image paths (text), "
                             f"not {type(image).__name__}")
        image = (image or "").strip()
        if not image:
            blank += 1
            continue
        full = str((path.parent / image).resolve())
        if full not in exists:
            exists[full] = Path(full).is_file()
        if not exists[full]:
            missing[full] = None
            continue
        if not str(caption or "").strip():
            empty += 1
            continue
        by_image.setdefault(full, []).append(str(caption).strip())
    return Pairs(list(by_image), list(by_image.values()), list(missing), empty, blank_paths=blank)


def load_pairs(source: str | Path, split: str | None = None) -> Pairs:
    """Pairs from a Flickr8k-style folder (``split`` picks train/dev/test) or a pairs table."""
    source = Path(source)
    if not source.exists():
        raise PathNotFoundError(f"{source} not found: pass a Flickr8k-style folder or a .csv/.tsv/.parquet pairs table")
    if source.is_dir():
        if not (source / TOKEN_FILE).is_file():
            raise PathNotFoundError(f"{source} has no {TOKEN_FILE}: pass a Flickr8k-style folder or a .csv/.tsv/.parquet table")
        return load_flickr8k(source, split or "test")
    if split is not None:
        raise BadArgumentError(f"--split applies to Flickr8k-style folders, not to the table {source}")
    return load_table(source)
