"""Every relative link and ``#anchor`` in README.md and docs/*.md resolves, with GitHub's heading slugs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def prose(text: str) -> str:
    """The text without fenced code blocks, whose lines may look like headings or links."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lower case, without punctuation or symbols
    (letters, digits, ``_``, ``-`` and spaces stay), spaces as ``-``."""
    text = CODE_SPAN.sub(lambda m: m.group(0).strip("`"), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; repeated headings get -1, -2, … as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(prose(path.read_text())):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    """The link targets of a Markdown file, outside code blocks, code spans and HTML comments."""
    text = re.sub(r"<!--.*?-->", "", CODE_SPAN.sub("", prose(path.read_text())), flags=re.S)
    return [m.group(1) for m in LINK.finditer(text)]


def broken_links(files: list[Path]) -> list[str]:
    """``FILE: TARGET (why)`` for each relative link whose file or anchor does not exist."""
    bad = []
    for path in files:
        for target in links(path):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                bad.append(f"{path.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{path.name}: {target} (no heading with that anchor in {dest.name})")
    return bad


def test_docs_exist_and_link_to_each_other():
    names = {p.name for p in DOCS}
    assert {"cli.md", "library.md", "index.md", "training.md", "video.md", "hubness.md", "onnx.md",
            "benchmarks.md"} <= names
    readme_targets = {t.partition("#")[0] for t in links(ROOT / "README.md")}
    unlinked = [p.name for p in DOCS[1:] if f"docs/{p.name}" not in readme_targets]
    assert not unlinked, f"README.md links to no {unlinked}"
    for doc in DOCS[1:]:
        assert any(t.partition("#")[0] == "../README.md" for t in links(doc)), f"{doc.name} has no link back to the README"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(path):
    assert broken_links([path]) == []


def test_slugs_follow_github():
    assert slug("Quick start (fresh machine, no internet needed)") == "quick-start-fresh-machine-no-internet-needed"
    assert slug("Texts in the index (image→text)") == "texts-in-the-index-imagetext"
    assert slug("Choosing a modality (`--kind`)") == "choosing-a-modality---kind"
    assert slug("int8, the built-in models' default") == "int8-the-built-in-models-default"
    assert slug("mmsearch_lite **bold** [link](x.md)") == "mmsearch_lite-bold-link"


def test_the_checker_finds_broken_links(tmp_path):
    (tmp_path / "a.md").write_text(
        "# Title\n\n## Same\n\n## Same\n\n```\n# not a heading\n[x](inside-code.md)\n```\n\n"
        "[ok](#title) [ok](#same-1) [ok](b.md#part-two) [ok](https://example.com/#nope) `[x](in-a-span.md)`\n"
        "`<!-- a comment in a span -->` [ok](#same) <!-- [x](in-a-comment.md) -->\n"
        "[bad](#not-a-heading) [bad](missing.md) [bad](b.md#nope) ![bad](img.png)\n")
    (tmp_path / "b.md").write_text("# B\n\n## Part two\n")
    assert broken_links([tmp_path / "a.md"]) == [
        "a.md: #not-a-heading (no heading with that anchor in a.md)",
        "a.md: missing.md (no such file)",
        "a.md: b.md#nope (no heading with that anchor in b.md)",
        "a.md: img.png (no such file)",
    ]
