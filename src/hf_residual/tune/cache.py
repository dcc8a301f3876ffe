"""Every evaluated candidate, kept in ``cache.jsonl`` of the output folder so a re-run evaluates nothing twice.

A line's key hashes the candidate's settings, the three models' identities (a Hub commit sha, or the
sha256 of a local folder's weight and config files), the probes and the evaluation settings: change any
and the candidate is evaluated again. Lines are appended and flushed one at a time, so a run cut off
keeps every candidate it finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from hf_residual.hub.common import ResolvedModel

CACHE = "cache.jsonl"
HASHES = "model-hashes.json"  # local folders' content hashes, reused while size and mtime are unchanged


def _files(folder: Path) -> list[Path]:
    names = ("*.safetensors", "*.json", "*.bin", "*.pt")
    return sorted({p for pattern in names for p in folder.glob(pattern) if p.is_file()})


def fingerprint(model: ResolvedModel, output: Path) -> str:
    """A model's identity for the cache: its Hub commit sha, or the sha256 of its local files' contents."""
    identity = model.identity
    if identity.repo_id and identity.revision:
        return f"{identity.repo_id}@{identity.revision}"
    memo_path = output / HASHES
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    files = _files(model.path)
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    entry = memo.get(str(model.path.resolve()))
    if entry and entry["stamp"] == stamp:
        return entry["sha256"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 24), b""):
                digest.update(block)
    memo[str(model.path.resolve())] = {"stamp": stamp, "sha256": digest.hexdigest()}
    memo_path.write_text(json.dumps(memo, indent=1) + "\n")
    return digest.hexdigest()


def key(candidate_data: str, context: str) -> str:
    """The cache key of a candidate's settings (``Candidate.key_data``) under a models/probes ``context``."""
    return hashlib.sha256(f"{context}\n{candidate_data}".encode()).hexdigest()[:20]


class Cache:
    """The evaluated candidates of an output folder: ``get(key)``, ``put(key, record)``."""

    def __init__(self, output: Path):
        self.path = output / CACHE
        self.records: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut off by a killed run: that candidate is evaluated again
                    continue
                self.records[record["key"]] = record
            if not self.path.read_bytes().endswith(b"\n"):  # end the cut-off line before appending
                with self.path.open("a", encoding="utf-8") as handle:
                    handle.write("\n")

    def get(self, cache_key: str) -> dict | None:
        return self.records.get(cache_key)

    def put(self, cache_key: str, record: dict) -> dict:
        record = {"key": cache_key, **record}
        self.records[cache_key] = record
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return record
