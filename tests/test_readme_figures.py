"""Every benchmark figure in the README is the one ``benchmarks/report.py`` renders from the records."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("section", ["headline", "benchmarks"])
def test_readme_section_is_rendered_from_the_records(report, section):
    readme = (ROOT / "README.md").read_text()
    begin, end = f"<!-- report:{section} -->\n", f"\n<!-- /report:{section} -->"
    assert begin in readme and end in readme, f"README.md has no {section} markers"
    shown = readme.split(begin, 1)[1].split(end, 1)[0]
    assert shown == report.render(section), (
        f"README.md's {section} section differs from the records: run `python benchmarks/report.py --readme`")


def test_update_readme_rewrites_only_between_the_markers(report, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro 0.123\n<!-- report:headline -->\nstale 9.99\n<!-- /report:headline -->\nafter 4.56\n")
    assert report.update_readme(readme) == ["headline"]
    text = readme.read_text()
    assert text.startswith("intro 0.123\n<!-- report:headline -->\n") and text.endswith(
        "\n<!-- /report:headline -->\nafter 4.56\n")
    assert "stale" not in text and report.render("headline") in text
