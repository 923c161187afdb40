from __future__ import annotations

import json
import logging
import shutil
import subprocess

import pytest

from dinox.run import provenance
from dinox.run.provenance import collect_provenance, data_manifest_hash, git_commit, is_dirty

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


def git(repo, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com",
                           "-c", "commit.gpgsign=false", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q")
    (path / "a.py").write_text("x = 1\n")
    git(path, "add", "a.py")
    git(path, "commit", "-q", "-m", "init")
    return path


@needs_git
def test_clean_dirty_and_untracked(repo):
    head = git(repo, "rev-parse", "HEAD")
    assert git_commit(repo) == head[:12]
    assert git_commit(repo, short=False) == head
    assert is_dirty(repo) is False
    (repo / "new.txt").write_text("untracked files do not make a checkout dirty")
    assert git_commit(repo) == head[:12]
    (repo / "a.py").write_text("x = 2\n")
    assert is_dirty(repo) is True
    assert git_commit(repo) == head[:12] + "-dirty"


@needs_git
def test_unknown_outside_a_checkout_or_without_git(tmp_path, monkeypatch, repo):
    outside = tmp_path / "plain"
    outside.mkdir()
    assert git_commit(outside) == "unknown" and is_dirty(outside) is None
    assert git_commit(tmp_path / "does-not-exist") == "unknown"
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert git_commit(repo) == "unknown"


@needs_git
def test_empty_repository_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    git(tmp_path, "init", "-q")
    assert git_commit(tmp_path) == "unknown"


def test_manifest_hash_stable_and_sensitive(tmp_path):
    root = tmp_path / "data"
    (root / "_index").mkdir(parents=True)
    (root / "_splits").mkdir()
    index = root / "_index" / "index.csv"
    split = root / "_splits" / "val10_seed0.json"
    index.write_text("series_id,patient_id,path\ns1,p1,volumes/s1.npy\ns2,p2,volumes/s2.npy\n")
    split.write_text(json.dumps({"train": ["s1"], "val": ["s2"]}))
    h = data_manifest_hash([index, split])
    assert len(h) == 16 and int(h, 16) >= 0
    assert data_manifest_hash([split, index]) == h
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)
    assert data_manifest_hash([moved / "_index" / "index.csv", moved / "_splits" / "val10_seed0.json"]) == h
    split.write_text(json.dumps({"train": ["s2"], "val": ["s1"]}))
    changed = data_manifest_hash([index, split])
    assert changed != h
    split.unlink()
    missing = data_manifest_hash([index, split])
    assert missing not in (h, changed)
    assert missing != data_manifest_hash([index])


def test_collect_provenance(tmp_path, monkeypatch, caplog):
    index = tmp_path / "index.csv"
    index.write_text("series_id\n")
    monkeypatch.setattr(provenance, "git_commit", lambda: "abc123-dirty")
    monkeypatch.setattr(provenance, "is_dirty", lambda: True)
    with caplog.at_level(logging.WARNING, logger="dinox.provenance"):
        p = collect_provenance([index], seed=7, device="cpu")
    assert "uncommitted changes" in caplog.text
    keys = {"git_commit", "git_dirty", "data_manifest_hash", "data_files", "python", "torch", "numpy",
            "cuda", "hip", "device_name", "hostname", "platform", "seed", "argv", "started_at"}
    assert keys <= set(p)
    assert p["git_commit"] == "abc123-dirty" and p["git_dirty"] is True and p["seed"] == 7
    assert p["data_manifest_hash"] == data_manifest_hash([index])
    assert p["data_files"] == [str(index.resolve())]
    assert p["started_at"][:2] == "20" and "T" in p["started_at"]
    json.dumps(p)


def test_collect_provenance_clean_does_not_warn(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(provenance, "git_commit", lambda: "abc123")
    monkeypatch.setattr(provenance, "is_dirty", lambda: False)
    with caplog.at_level(logging.WARNING, logger="dinox.provenance"):
        collect_provenance([], seed=0, device="cpu")
    assert caplog.text == ""
