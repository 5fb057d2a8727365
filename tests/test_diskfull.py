"""A real full disk (issue 16): the index lives on a small tmpfs, and a filler file leaves too little
room for a later commit, which then fails part way through writing its generation (the items table,
the embeddings, the faiss index) or at the commit point (the manifest). What must hold:

- one `error:` line that says the disk is full (ENOSPC), never a traceback or an internal error;
- the previous generation intact: the same manifest, `info` reports the old count, a query answers;
- no `.gen-*.partial` folder and no temp file left behind;
- once space is freed, the next run commits everything.

As root the tmpfs is mounted here (and unmounted in a finally); otherwise the scenario runs in a
child process inside a new user and mount namespace (`unshare -rm`), where mounting is allowed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmsearch.cli import app

runner = CliRunner()
TMPFS_SIZE = 4 << 20
PAGE = 4096  # tmpfs charges whole pages per file
NO_MOUNT = 77  # the child's exit code when it cannot mount a tmpfs either
STAGES = ("items", "embeddings", "faiss", "manifest")  # the file a commit is writing when the disk fills


def cli(*args) -> object:
    return runner.invoke(app, [os.fspath(a) for a in args])


def _pages(folder: Path) -> dict[str, int]:
    return {f.name: -(-f.stat().st_size // PAGE) for f in folder.iterdir()}


def generation_pages(first: list[str], more: list[str], scratch: Path) -> dict[str, int]:
    """Pages each file of the second commit's generation takes, measured on an ordinary disk."""
    key = (tuple(first), tuple(more))
    if key in _MEASURED:
        return _MEASURED[key]
    photos, index = scratch / "photos", scratch / "index"
    photos.mkdir(parents=True)
    for src in first:
        shutil.copy(src, photos)
    assert cli("index", photos, "--index", index, "-q").exit_code == 0
    for src in more:
        shutil.copy(src, photos)
    assert cli("index", photos, "--index", index, "-q").exit_code == 0
    _MEASURED[key] = _pages(index / json.loads((index / "manifest.json").read_text())["generation_dir"])
    return _MEASURED[key]


_MEASURED: dict[tuple, dict[str, int]] = {}


ORDER = (".mmsearch-generation", "items.parquet", "embeddings.npy", "index.faiss")  # as a commit writes them
#: what the --debug traceback of a commit failing at each stage shows (mmsearch/store.py's names)
WRITER = {"items": "ITEMS", "embeddings": "np.save", "faiss": "write_index", "manifest": "MANIFEST"}


def headroom(stage: str, pages: dict[str, int]) -> int:
    """Bytes to leave free so that the commit fails part way through writing ``stage``'s file (the
    manifest: once the generation is complete)."""
    if stage == "manifest":
        return PAGE * sum(pages.values())
    i = ORDER.index({"items": "items.parquet", "embeddings": "embeddings.npy", "faiss": "index.faiss"}[stage])
    return PAGE * (sum(pages[name] for name in ORDER[:i]) + pages[ORDER[i]] - 1)


def fill(mount: Path, leave: int) -> Path:
    st = os.statvfs(mount)
    filler = mount / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize - leave))
    return filler


def scenario(mount: Path, first: list[str], more: list[str], stage: str, scratch: Path, strict: bool = False) -> None:
    """Index ``first`` into an index on the tmpfs at ``mount``, fill it, index ``more`` too: the
    commit fails while writing ``stage``'s file. ``strict``: the failed commit also leaves no
    complete but uncommitted generation behind (it would hold space on a full disk)."""
    pages = generation_pages(first, more, scratch / "probe")
    photos, index = scratch / "photos", mount / "index"
    photos.mkdir()
    for src in first:
        shutil.copy(src, photos)
    r = cli("index", photos, "--index", index, "-q")
    assert r.exit_code == 0, r.output
    manifest = (index / "manifest.json").read_bytes()
    generation = json.loads(manifest)["generation_dir"]
    for src in more:
        shutil.copy(src, photos)
    filler = fill(mount, headroom(stage, pages))

    r = cli("index", photos, "--index", index, "-q")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "Traceback" not in r.output, (stage, r.output)
    assert lines[0].startswith("error: ") and "out of disk space" in lines[0] and "No space left on device" in lines[0], lines
    debug = cli("--debug", "index", photos, "--index", index, "-q")  # the same again (nothing changed): where it fails
    assert debug.exit_code == 1 and WRITER[stage] in debug.stderr, debug.stderr
    assert (index / "manifest.json").read_bytes() == manifest  # the previous generation, intact
    assert json.loads(cli("info", "--json", "--index", index).stdout)["count"] == len(first)
    r = cli("query", "a dog", "--index", index)
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == len(first), r.output
    left = sorted(str(p.relative_to(index)) for p in index.rglob("*"))
    assert not [p for p in left if p.startswith(".gen-") or p.endswith(".tmp")], left  # no partial folder, no temp file
    if strict:
        assert left == sorted([".lock", "manifest.json", generation, *(f"{generation}/{f}" for f in pages)]), left

    filler.unlink()  # space again: the next run carries on
    r = cli("index", photos, "--index", index, "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(cli("info", "--json", "--index", index).stdout)["count"] == len(first) + len(more)
    assert cli("query", "a dog", "--index", index).exit_code == 0
    now = json.loads((index / "manifest.json").read_text())
    assert not [p for p in index.iterdir()  # nothing but the current generation and the one before it
                if p.name not in (".lock", "manifest.json", now["generation_dir"], now["previous"])]


def _mount_tmpfs(folder: Path) -> bool:
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(folder)],
                       check=False, capture_output=True, text=True)
    return p.returncode == 0


def run_on_tmpfs(tmp_path: Path, first: list[str], more: list[str], stage: str, strict: bool = False) -> None:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() == 0 and os.environ.get("MMSEARCH_TEST_UNSHARE") != "1":
        if not _mount_tmpfs(mount):
            pytest.skip("cannot mount a tmpfs here, even as root (no CAP_SYS_ADMIN?)")
        try:
            scenario(mount, first, more, stage, tmp_path, strict)
        finally:
            subprocess.run(["umount", "-l", str(mount)], check=True)
        return
    if shutil.which("unshare") is None:
        pytest.skip("not root and no `unshare` to mount a tmpfs in a user namespace")
    args = json.dumps({"mount": str(mount), "first": first, "more": more, "stage": stage,
                       "scratch": str(tmp_path), "strict": strict})
    code = "import sys, tests.test_diskfull as t; t.child(sys.argv[1])"
    p = subprocess.run(["unshare", "-rm", sys.executable, "-c", code, args], check=False, capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    if p.returncode == NO_MOUNT or "unshare failed" in p.stderr:
        pytest.skip(f"cannot mount a tmpfs: not root, and `unshare -rm` fails here ({p.stderr.strip()[-200:]})")
    assert p.returncode == 0, p.stdout + p.stderr


def child(args: str) -> None:
    """The scenario inside `unshare -rm` (root of a new user and mount namespace)."""
    a = json.loads(args)
    if not _mount_tmpfs(Path(a["mount"])):
        sys.exit(NO_MOUNT)
    scenario(Path(a["mount"]), a["first"], a["more"], a["stage"], Path(a["scratch"]), a["strict"])


@pytest.mark.parametrize("stage", STAGES)
def test_a_full_disk_fails_the_commit_in_one_line_and_keeps_the_previous_index(pairs, encoder, tmp_path, stage):
    run_on_tmpfs(tmp_path, pairs.images[:4], pairs.images[4:12], stage)


def test_a_commit_that_fails_at_the_manifest_leaves_no_generation_behind(pairs, encoder, tmp_path):
    run_on_tmpfs(tmp_path, pairs.images[:4], pairs.images[4:12], "manifest", strict=True)


def test_the_disk_full_scenario_can_fail(pairs, encoder, tmp_path, monkeypatch):
    """The scenario notices a commit that reports a full disk as an internal error (as numpy's short
    write did before ``atomic_path`` named it)."""
    from mmsearch import _util

    if os.geteuid() != 0:
        pytest.skip("the scenario runs in a child process here, out of monkeypatch's reach")
    monkeypatch.setattr(_util, "_out_of_space", lambda folder: False)
    with pytest.raises(AssertionError, match="internal error"):
        run_on_tmpfs(tmp_path, pairs.images[:4], pairs.images[4:12], "embeddings")


def test_a_short_write_on_a_full_disk_is_reported_as_enospc(tmp_path, monkeypatch):
    """numpy's ``tofile`` reports a full disk as "N requested and M written", without an errno: the
    atomic writer names it (checked here without a tmpfs, so it holds where none can be mounted)."""
    import errno

    from mmsearch import _util

    def short_write(path):
        with _util.atomic_file(path) as f:
            f.write(b"x")
            raise OSError("10240 requested and 992 written")

    with pytest.raises(OSError, match="requested and 992 written") as e:
        short_write(tmp_path / "a.npy")  # a disk with room: the error as it was
    assert e.value.errno is None
    monkeypatch.setattr(_util, "_out_of_space", lambda folder: True)
    with pytest.raises(OSError) as e:
        short_write(tmp_path / "a.npy")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "a.npy")
    assert os.listdir(tmp_path) == []  # no temp file left


def test_a_full_disk_is_one_line_that_says_so(tmp_path, monkeypatch):
    import errno

    from mmsearch import data

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "idx" / "embeddings.npy"))

    monkeypatch.setattr(data, "load_pairs", full)
    r = cli("eval", tmp_path)
    want = (f"error: out of disk space (No space left on device) writing {tmp_path}/idx/embeddings.npy: "
            "free some space and run the command again")
    assert r.exit_code == 1 and r.stderr.splitlines() == [want]
