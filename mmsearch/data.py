"""Image-caption pair datasets: the Flickr8k folder layout (token file + official split files)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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

    def flat(self) -> tuple[list[str], list[int]]:
        """All captions in one list and, for each, the index of its image."""
        texts, owner = [], []
        for i, caps in enumerate(self.captions):
            texts.extend(caps)
            owner.extend([i] * len(caps))
        return texts, owner

    def subset(self, n: int) -> "Pairs":
        return Pairs(self.images[:n], self.captions[:n])


def load_flickr8k(root: str | Path, split: str) -> Pairs:
    """The images of one official split (train/dev/test) with their five captions each.

    Images listed in the split but missing on disk are left out (the original release has one).
    """
    root = Path(root)
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLIT_FILES)}")
    for name in (TOKEN_FILE, SPLIT_FILES[split]):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name} not found: pass a Flickr8k folder")
    caps: dict[str, list[str]] = {}
    for line in (root / TOKEN_FILE).read_text(encoding="utf-8").splitlines():
        if "\t" not in line:
            continue
        key, text = line.split("\t", 1)
        caps.setdefault(key.split("#", 1)[0], []).append(text.strip())
    names = [n.strip() for n in (root / SPLIT_FILES[split]).read_text().splitlines() if n.strip()]
    images, captions = [], []
    for name in names:
        path = root / "images" / name
        if name in caps and path.is_file():
            images.append(str(path.resolve()))
            captions.append(caps[name])
    return Pairs(images, captions)
