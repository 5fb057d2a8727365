"""Every figure in README.md and docs/*.md sits in a section ``benchmarks/report.py`` renders from the records."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BEGIN = re.compile(r"^<!-- report:([\w-]+) -->$", re.M)  # a marker is a line of its own


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_files_are_the_ones_report_rewrites(report):
    assert report.marked_files() == FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_marked_section_is_rendered_from_the_records(report, path):
    text = path.read_text()
    for name in BEGIN.findall(text):
        assert name in report.SECTIONS, f"{path.name}: unknown report section {name!r}"
        begin, end = f"<!-- report:{name} -->\n", f"\n<!-- /report:{name} -->"
        assert text.count(begin) == text.count(end), f"{path.name}: unbalanced {name} markers"
        for shown in (part.split(end, 1)[0] for part in text.split(begin)[1:]):
            assert shown == report.render(name), (
                f"{path.name}'s {name} section differs from the records: run `python benchmarks/report.py --write`")


def test_every_section_is_shown_somewhere_and_renders_something(report):
    used = {name for path in FILES for name in BEGIN.findall(path.read_text())}
    assert set(report.SECTIONS) == used
    assert all(report.render(name).strip() for name in report.SECTIONS)
    assert {"headline", "quickstart"} <= set(BEGIN.findall((ROOT / "README.md").read_text()))


def test_readme_first_query_is_the_recorded_output(report):
    """The first query's lines are the quick-start record's, and the command is the README's own."""
    quick = report.load("quickstart.json")
    block = report.render("quickstart")
    assert quick["query"]["argv"][:3] == ["mmsearch", "query", "a dog running on the grass"]
    assert '$ mmsearch query "a dog running on the grass"\n' in block
    for line in quick["query"]["stdout"]:
        score, path = line.split("\t")
        assert f"{score}\t/…/shared/data/{path}\n" in block + "\n"
    readme = (ROOT / "README.md").read_text()
    assert "mmsearch index ../shared/data/flickr8k/images && mmsearch query \"a dog running on the grass\"" in readme


def test_update_file_rewrites_only_between_the_markers(report, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro 0.123\n<!-- report:headline -->\nstale 9.99\n<!-- /report:headline -->\nmid 7.89\n"
                   "<!-- report:index-cross-modal -->\n<!-- /report:index-cross-modal -->\n"
                   "<!-- report:headline -->\nstale again\n<!-- /report:headline -->\nafter 4.56\n")
    assert report.update_file(doc) == ["headline", "index-cross-modal", "headline"]
    text = doc.read_text()
    assert text.startswith("intro 0.123\n<!-- report:headline -->\n") and text.endswith(
        "\n<!-- /report:headline -->\nafter 4.56\n")
    assert "stale" not in text and "\nmid 7.89\n" in text
    assert text.count(report.render("headline")) == 2 and report.render("index-cross-modal") in text
    assert report.update_readme is report.update_file  # the older name still works
    assert report.update_file(doc) == ["headline", "index-cross-modal", "headline"] and doc.read_text() == text


def test_update_file_refuses_an_unknown_section(report, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- report:no-such-section -->\n<!-- /report:no-such-section -->\n")
    with pytest.raises(KeyError, match="no-such-section"):
        report.update_file(doc)
    assert doc.read_text() == "<!-- report:no-such-section -->\n<!-- /report:no-such-section -->\n"
