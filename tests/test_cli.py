"""The CLI as a user runs it: real photos in, ranked paths out; clear one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmsearch.cli import EXIT_INTERNAL, app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_index_query_json_image_info(photo_dir, pairs, tmp_path):
    folder, mapping = photo_dir
    idx = tmp_path / "idx"
    r = run("index", folder, "--index", idx, "-q")
    assert r.exit_code == 0, r.output
    assert "12 items" in r.stderr and "12 added" in r.stderr and "flat" in r.stderr

    # text -> image: the photo a caption was written for ranks first
    target = mapping[pairs.images[0]]
    r = run("query", pairs.captions[0][0], "--index", idx)
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 10
    scores = [float(line.split("\t")[0]) for line in lines]
    paths = [line.split("\t")[1] for line in lines]
    assert scores == sorted(scores, reverse=True)
    assert all(os.path.isabs(p) and p in mapping.values() for p in paths)
    assert target in paths[:3]

    # --json, and -k larger than the collection returns the whole collection, no padding
    r = run("query", "a dog", "-k", "50", "--json", "--index", idx)
    hits = json.loads(r.stdout)
    assert [h["rank"] for h in hits] == list(range(1, 13))
    assert sorted(h["path"] for h in hits) == sorted(mapping.values())
    assert set(hits[0]) >= {"rank", "score", "path"}

    # image -> image: a photo finds itself first
    query = mapping[pairs.images[4]]
    r = run("query", "--image", query, "-k", "3", "--index", idx)
    first_score, first_path = r.stdout.splitlines()[0].split("\t")
    assert first_path == query and float(first_score) > 0.99

    r = run("info", "--index", idx)
    assert r.exit_code == 0
    assert "mmsearch-lite" in r.stdout and "flat" in r.stdout and "MiB" in r.stdout
    facts = json.loads(run("info", "--index", idx, "--json").stdout)
    assert facts["count"] == 12 and facts["dim"] == 256 and facts["disk_bytes"] > 12 * 256 * 4


def test_env_var_chooses_the_index(photo_dir, tmp_path, monkeypatch):
    folder, _ = photo_dir
    monkeypatch.setenv("MMSEARCH_INDEX", str(tmp_path / "from-env"))
    assert run("index", folder, "-q").exit_code == 0
    assert (tmp_path / "from-env" / "manifest.json").is_file()
    assert run("query", "people", "-k", "2").stdout.count("\n") == 2


def test_default_index_folder_is_under_the_current_directory(photo_dir, tmp_path, monkeypatch):
    folder, _ = photo_dir
    monkeypatch.delenv("MMSEARCH_INDEX", raising=False)
    monkeypatch.chdir(tmp_path)
    assert run("index", folder, "-q").exit_code == 0
    assert (tmp_path / "indexes" / "default" / "manifest.json").is_file()


def test_ivfpq_and_flat_agree_on_an_easy_case(photo_dir, pairs, tmp_path):
    folder, mapping = photo_dir
    for kind in ("flat", "ivfpq"):
        r = run("index", folder, "--index", tmp_path / kind, "--index-type", kind, "-q")
        assert r.exit_code == 0 and kind in r.stderr, r.output
    for i in (0, 5, 9):
        q = mapping[pairs.images[i]]
        tops = [run("query", "--image", q, "-k", "1", "--index", tmp_path / kind).stdout.split("\t")[1].strip()
                for kind in ("flat", "ivfpq")]
        assert tops == [q, q]
    assert json.loads(run("info", "--json", "--index", tmp_path / "ivfpq").stdout)["index_type"] == "ivfpq"


def test_bad_files_are_skipped_with_one_warning_each(photo_dir, pairs, tmp_path):
    folder, _ = photo_dir
    real = Path(pairs.images[0]).read_bytes()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image at all")
    (folder / "cut.jpg").write_bytes(real[: len(real) // 2])
    (folder / "._IMG_0001.jpg").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)
    os.symlink(folder, folder / "trip" / "loop")
    r = run("index", folder, "--index", tmp_path / "idx")
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 5, r.stderr
    for name, reason in [("empty.jpg", "zero-byte"), ("notes.png", "not an image"), ("cut.jpg", "truncated"),
                         ("._IMG_0001.jpg", "AppleDouble"), ("loop", "symlink loop")]:
        assert any(name in w and reason in w for w in warnings), (name, warnings)
    assert "12 items" in r.stderr and "5 skipped" in r.stderr


def test_too_large_image_is_skipped(photo_dir, tmp_path):
    from PIL import Image

    folder, _ = photo_dir
    Image.new("1", (12000, 9000)).save(folder / "huge.png")  # 108 MP, a few kB on disk
    r = run("index", folder, "--index", tmp_path / "idx", "-q")
    assert r.exit_code == 0
    assert any("huge.png" in line and "too large" in line for line in r.stderr.splitlines())
    assert "12 items" in r.stderr


# ---- errors: exit code 1, one line, no traceback (real processes, as a user sees them) ---------
def mmsearch(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "MMSEARCH_INDEX"}
    return subprocess.run([sys.executable, "-m", "mmsearch.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def assert_one_line_error(p, *words):
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_errors_are_one_line(tmp_path, built_index):
    idx, mapping = built_index
    assert_one_line_error(mmsearch("query", "a dog", "--index", tmp_path / "nope"), "no index", "mmsearch index")
    assert_one_line_error(mmsearch("query", "", "--index", idx), "empty query")
    assert_one_line_error(mmsearch("query", "   ", "--index", idx), "empty query")
    assert_one_line_error(mmsearch("query", "--index", idx), "empty query")
    assert_one_line_error(mmsearch("index", tmp_path / "missing-folder", "--index", tmp_path / "i"),
                          "folder not found", "missing-folder")
    assert_one_line_error(mmsearch("query", "--image", tmp_path / "nope.jpg", "--index", idx), "nope.jpg")
    assert_one_line_error(mmsearch("info", "--index", tmp_path / "nope"), "no index")
    (tmp_path / "not-index").mkdir()
    assert_one_line_error(mmsearch("info", "--index", tmp_path / "not-index"), "no mmsearch index")
    assert not (tmp_path / "nope").exists() and not (tmp_path / "i").exists()


def test_query_on_an_empty_index_is_an_error(tmp_path):
    (tmp_path / "no-photos").mkdir()
    (tmp_path / "no-photos" / "readme.txt").write_text("nothing to see")
    p = mmsearch("index", tmp_path / "no-photos", "--index", tmp_path / "idx", "-q")
    assert p.returncode == 0 and "0 items" in p.stderr, p.stderr
    assert_one_line_error(mmsearch("query", "a dog", "--index", tmp_path / "idx"), "empty", "mmsearch index")


def test_help_is_fast_and_light():
    code = ("import sys, mmsearch.cli; heavy = [m for m in ('torch', 'open_clip', 'faiss') if m in sys.modules];"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    p = mmsearch("--help")
    assert p.returncode == 0 and "--debug" in p.stdout and "MMSEARCH_DEBUG" in p.stdout


def test_batch_queries_match_single_queries(built_index, pairs, tmp_path):
    """`mmsearch query --batch FILE`: one answer per line, the same as asking one by one."""
    idx, mapping = built_index
    queries = [pairs.captions[i][0] for i in range(3)]
    qfile = tmp_path / "queries.txt"
    qfile.write_text("\n".join(queries) + "\n\n", encoding="utf-8")  # a blank line is skipped
    r = run("query", "--batch", qfile, "-k", "3", "--index", idx)
    assert r.exit_code == 0, r.output
    rows = [line.split("\t") for line in r.stdout.strip().splitlines()]
    assert [q for q, _, _ in rows] == [q for q in queries for _ in range(3)]
    for q in queries:
        single = run("query", q, "-k", "3", "--index", idx).stdout.strip().splitlines()
        assert [f"{s}\t{p}" for qq, s, p in rows if qq == q] == single
    assert rows[0][2] == mapping[pairs.images[0]]  # the photo the first caption was written for
    r = run("query", "--batch", qfile, "-k", "2", "--json", "--index", idx)
    answers = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [a["query"] for a in answers] == queries and all(len(a["hits"]) == 2 for a in answers)
    r = run("query", "a dog", "--batch", qfile, "--index", idx)
    assert r.exit_code == 1 and "give one of" in r.stderr


def test_user_mistakes_found_in_the_library_are_one_line(tmp_path):
    """Bad tables and paths are the user's mistake (exit code 1), not a crash of mmsearch."""
    (tmp_path / "latin1.csv").write_bytes("image,caption\na.jpg,caf\xe9\n".encode("latin-1"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    (tmp_path / "notes.txt").write_text("not a folder")
    assert_one_line_error(mmsearch("eval", tmp_path / "latin1.csv"), "latin1.csv is not UTF-8 text")
    assert_one_line_error(mmsearch("eval", tmp_path / "bad.parquet"), "bad.parquet: not a readable parquet table")
    assert_one_line_error(mmsearch("eval", tmp_path / "latin1.csv", "--split", "dev"), "--split applies")
    assert_one_line_error(mmsearch("index", tmp_path / "notes.txt", "--index", tmp_path / "i"), "not a folder")
    assert_one_line_error(mmsearch("frame", tmp_path / "notes.txt", "--at", "1", "-o", tmp_path / "f.png"),
                          "not a readable video")


# ---- bugs: one `internal error` line and exit code 70; --debug / MMSEARCH_DEBUG=1 show the traceback ----
INTERNAL_HINT = "(run with --debug or MMSEARCH_DEBUG=1 for the traceback)"


def _raising(exc: BaseException):
    def broken_load_pairs(*args, **kwargs):
        raise exc

    return broken_load_pairs


@pytest.mark.parametrize("bug", [KeyError("images"), ZeroDivisionError("division by zero"),
                                 ValueError("not a user's mistake"), FileNotFoundError("no file named")])
def test_a_bug_is_one_internal_error_line_without_traceback(bug, tmp_path, monkeypatch):
    from mmsearch import data

    monkeypatch.setattr(data, "load_pairs", _raising(bug))
    r = run("eval", tmp_path)
    assert r.exit_code == EXIT_INTERNAL and EXIT_INTERNAL != 1
    assert r.stderr.splitlines() == [f"error: internal error: {type(bug).__name__}: {bug} {INTERNAL_HINT}"]


def test_debug_and_its_env_var_show_the_traceback(tmp_path, monkeypatch):
    from mmsearch import data

    monkeypatch.setattr(data, "load_pairs", _raising(ZeroDivisionError("boom")))
    for args, env in ((["--debug"], None), ([], "1"), ([], "0")):
        if env is not None:
            monkeypatch.setenv("MMSEARCH_DEBUG", env)
        r = run(*args, "eval", tmp_path)
        assert r.exit_code == EXIT_INTERNAL
        lines = r.stderr.strip().splitlines()
        assert lines[-1] == f"error: internal error: ZeroDivisionError: boom {INTERNAL_HINT}"
        if env == "0":
            assert len(lines) == 1
        else:
            assert lines[0] == "Traceback (most recent call last):" and "in broken_load_pairs" in r.stderr
            assert "ZeroDivisionError: boom" in lines[-2]
    # a user's mistake keeps exit code 1, with its traceback under --debug
    monkeypatch.undo()
    r = run("--debug", "eval", tmp_path / "nosuch")
    assert r.exit_code == 1 and "Traceback" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "nosuch not found" in r.stderr


def test_os_errors_are_the_users_only_about_the_users_paths(tmp_path, monkeypatch):
    """An OS error about a path the user gave (or under it, also through a link) or a full disk is
    one line, exit code 1; an OS error about any other path, or about none, is a bug."""
    import errno

    from mmsearch import data

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    given = tmp_path / "link"
    cases = [
        (PermissionError(errno.EACCES, "Permission denied", str(given)), 1),
        (PermissionError(errno.EACCES, "Permission denied", str(given / "pairs.csv")), 1),
        (IsADirectoryError(errno.EISDIR, "Is a directory", str(tmp_path / "real" / "sub")), 1),
        (OSError(errno.ENOSPC, "No space left on device"), 1),
        (PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "real-other")), EXIT_INTERNAL),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/proc/self/not-the-users"), EXIT_INTERNAL),
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), EXIT_INTERNAL),
    ]
    for error, code in cases:
        monkeypatch.setattr(data, "load_pairs", _raising(error))
        r = run("eval", given)
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == code and len(lines) == 1 and lines[0].startswith("error: "), (error, r.stderr)
        assert ("internal error" in lines[0]) == (code == EXIT_INTERNAL), (error, lines)
        assert error.strerror in lines[0]


def test_a_bug_in_a_real_process(tmp_path):
    """What a user sees: the exit code, no traceback, and the traceback with MMSEARCH_DEBUG=1."""
    code = ("import sys; from mmsearch import data, cli\n"
            "def broken(*args, **kwargs): return {}['no such key']\n"
            "data.load_pairs = broken; sys.argv = ['mmsearch', 'eval', '.']; cli.main()")
    env = {k: v for k, v in os.environ.items() if k != "MMSEARCH_DEBUG"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert p.returncode == EXIT_INTERNAL and "Traceback" not in p.stderr
    assert p.stderr.splitlines() == [f"error: internal error: KeyError: 'no such key' {INTERNAL_HINT}"]
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "MMSEARCH_DEBUG": "1"},
                       cwd=tmp_path, timeout=120)
    assert p.returncode == EXIT_INTERNAL and p.stderr.startswith("Traceback") and "in broken" in p.stderr
