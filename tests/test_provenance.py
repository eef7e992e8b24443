"""Which ratta wrote a file: the version and the commit, read without spawning git."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import adapt_args

from ratta import __version__
from ratta.cli import main
from ratta.provenance import git_commit, read_commit, version_line

SHA_A = "a" * 40
SHA_B = "b" * 40
CHECKOUT = Path(__file__).resolve().parent.parent


def _git_dir(root: Path, head: str) -> Path:
    git = root / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text(head + "\n")
    return git


def test_a_branch_from_a_loose_ref(tmp_path: Path) -> None:
    git = _git_dir(tmp_path, "ref: refs/heads/main")
    (git / "refs" / "heads" / "main").write_text(SHA_A + "\n")
    assert read_commit(tmp_path) == SHA_A


def test_a_branch_from_packed_refs_and_a_detached_head(tmp_path: Path) -> None:
    git = _git_dir(tmp_path, "ref: refs/heads/topic")
    (git / "packed-refs").write_text(
        f"# pack-refs with: peeled fully-peeled sorted\n{SHA_B} refs/heads/topic\n"
    )
    assert read_commit(tmp_path) == SHA_B
    (git / "HEAD").write_text(SHA_A)
    assert read_commit(tmp_path) == SHA_A


def test_a_worktree_reads_its_head_and_the_common_refs(tmp_path: Path) -> None:
    main_git = _git_dir(tmp_path / "main", "ref: refs/heads/main")
    (main_git / "refs" / "heads" / "feature").write_text(SHA_B)
    own = main_git / "worktrees" / "wt"
    own.mkdir(parents=True)
    (own / "HEAD").write_text("ref: refs/heads/feature\n")
    (own / "commondir").write_text("../..\n")
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / ".git").write_text(f"gitdir: {own}\n")
    assert read_commit(tmp_path / "wt") == SHA_B


def test_no_checkout_or_a_broken_one_has_no_commit(tmp_path: Path) -> None:
    assert read_commit(tmp_path) is None
    _git_dir(tmp_path, "ref: refs/heads/gone")
    assert read_commit(tmp_path) is None
    (tmp_path / "file").mkdir()
    (tmp_path / "file" / ".git").write_text("not a gitdir line")
    assert read_commit(tmp_path / "file") is None


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_commit_and_version_line_of_this_checkout(capsys) -> None:
    head = subprocess.run(
        ["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    assert head.returncode == 0
    assert git_commit() == head.stdout.strip()
    assert version_line() == f"ratta {__version__} (git {head.stdout.strip()[:7]})"
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == version_line()


def test_version_spawns_no_git_and_imports_no_torch() -> None:
    code = (
        "import os, subprocess, sys\n"
        "def no(*a, **k):\n    raise AssertionError('spawned a process')\n"
        "subprocess.Popen = os.fork = os.posix_spawn = no\n"
        "from ratta.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "sys.exit(9 if 'torch' in sys.modules else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == version_line()


def test_summaries_and_manifests_record_version_and_commit(world_files, tmp_path: Path) -> None:
    out = tmp_path / "pred.safetensors"
    assert main(adapt_args(world_files, out)) == 0
    summary = json.loads(Path(f"{out}.json").read_text())
    assert (summary["ratta_version"], summary["ratta_commit"]) == (__version__, git_commit())
    assert main(["db", "import", str(world_files["db"]), "--out", str(tmp_path / "db")]) == 0
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    assert manifest["provenance"]["ratta_commit"] == git_commit()
