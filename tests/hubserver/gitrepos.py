"""Real git repositories laid out the way olah's offline mirror reads them (``models/<org>/<name>``).

Commits are written with git plumbing into a temporary index, so the working tree is never touched and
several commits (or refs such as ``refs/pr/1``) can be added while olah serves the repository. Large
files are stored the git-lfs way: a pointer blob in git and the content under ``.git/lfs/objects``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".model", ".gguf")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "hub-test",
    "GIT_AUTHOR_EMAIL": "hub-test@localhost",
    "GIT_COMMITTER_NAME": "hub-test",
    "GIT_COMMITTER_EMAIL": "hub-test@localhost",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(repo: Path, *args: str, data: bytes | None = None, index: Path | None = None) -> str:
    env = {**os.environ, **_GIT_ENV, "HOME": str(repo)}
    if index is not None:
        env["GIT_INDEX_FILE"] = str(index)
    result = subprocess.run(
        ["git", "-C", str(repo), *args], input=data, capture_output=True, env=env, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.decode(errors='replace')}")
    return result.stdout.decode().strip()


def is_lfs_path(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def lfs_object_path(repo: Path, oid: str) -> Path:
    return repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def store_lfs_object(repo: Path, content: bytes) -> str:
    oid = hashlib.sha256(content).hexdigest()
    target = lfs_object_path(repo, oid)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.write_bytes(content)
    return oid


def init_repo(repo: Path, message: str = "initial commit") -> str:
    """A new repository with one commit holding ``.gitattributes``, as the Hub creates it."""
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "-q", "-b", "main")
    return commit(repo, {".gitattributes": GITATTRIBUTES.encode()}, message=message, parent=None)


def head(repo: Path, ref: str = "main") -> str | None:
    try:
        return git(repo, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}")
    except RuntimeError:
        return None


def commit(
    repo: Path,
    files: dict[str, bytes],
    *,
    message: str,
    parent: str | None,
    deletions: tuple[str, ...] = (),
    lfs_oids: dict[str, tuple[str, int]] | None = None,
    ref: str | None = "refs/heads/main",
) -> str:
    """Write one commit on top of ``parent`` and point ``ref`` at it; returns the commit sha.

    ``files`` are stored as regular blobs, or as LFS pointers when their names say so;
    ``lfs_oids`` adds LFS files whose content is already in the LFS store (path -> (oid, size)).
    """
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "index"
        if parent:
            git(repo, "read-tree", parent, index=index)
        for path, content in files.items():
            if is_lfs_path(path):
                oid = store_lfs_object(repo, content)
                content = lfs_pointer(oid, len(content))
            blob = git(repo, "hash-object", "-w", "--stdin", data=content)
            git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", index=index)
        for path, (oid, size) in (lfs_oids or {}).items():
            blob = git(repo, "hash-object", "-w", "--stdin", data=lfs_pointer(oid, size))
            git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", index=index)
        for path in deletions:
            git(repo, "update-index", "--force-remove", path, index=index)
        tree = git(repo, "write-tree", index=index)
    args = ["commit-tree", tree, "-m", message] + (["-p", parent] if parent else [])
    sha = git(repo, *args)
    if ref:
        git(repo, "update-ref", ref, sha)
    return sha


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (recursively) as path-in-repo -> bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(folder).parts
    }


def list_files(repo: Path, ref: str = "main") -> list[str]:
    out = git(repo, "ls-tree", "-r", "--name-only", ref)
    return out.splitlines() if out else []


def commit_count(repo: Path, ref: str = "main") -> int:
    return int(git(repo, "rev-list", "--count", ref))
