"""Which articles enter the corpus: publishing-date window (UTC), language, minimum length,
no duplicates (same normalised URL, or same normalised text), and caps per publisher and in total.

One ``CorpusFilter`` is fed articles one by one and says keep or why not; its ``dropped`` counts
feed the summary. Fundus' own filters work the other way round (True drops); ours are explicit.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

from hf_residual.cpt.sources import Record


def normalise_url(url: str) -> str:
    """Scheme-less, lower-case host, no query or fragment, no trailing slash: one key per page."""
    parts = urlsplit(url.strip())
    host = parts.netloc.lower().removeprefix("www.")
    return urlunsplit(("", host, parts.path.rstrip("/") or "/", "", ""))


def text_hash(text: str) -> str:
    """Hash of the text with case, accents' forms, punctuation and spacing normalised away."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    words = re.findall(r"\w+", folded)
    return hashlib.sha256(" ".join(words).encode()).hexdigest()


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


@dataclass
class CorpusFilter:
    """Stateful filter; ``start``/``end`` are inclusive bounds on the publishing date (UTC)."""

    start: datetime | None = None
    end: datetime | None = None
    languages: list[str] | None = None
    min_words: int = 0
    max_per_publisher: int | None = None
    max_total: int | None = None
    dropped: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)
    _urls: set = field(default_factory=set)
    _texts: set = field(default_factory=set)

    def __post_init__(self) -> None:
        self.start, self.end = _utc(self.start), _utc(self.end)

    @property
    def total(self) -> int:
        return sum(self.kept.values())

    def full(self) -> bool:
        return self.max_total is not None and self.total >= self.max_total

    def reason_to_drop(self, record: Record) -> str | None:
        """None to keep (and remember) ``record``, else the reason it is dropped."""
        if self.full():
            return "max total reached"
        if self.max_per_publisher is not None and self.kept[record.publisher] >= self.max_per_publisher:
            return "max per publisher reached"
        published = _utc(record.published_at)
        if (self.start or self.end) and published is None:
            return "no publishing date"
        if self.start and published < self.start or self.end and published > self.end:
            return "published outside the window"
        if self.languages and (record.language or "").lower() not in self.languages:
            return "other language"
        if len(record.text.split()) < self.min_words:
            return "too short"
        url, digest = normalise_url(record.url), text_hash(record.text)
        if url in self._urls:
            return "duplicate url"
        if digest in self._texts:
            return "duplicate text"
        self._urls.add(url)
        self._texts.add(digest)
        self.kept[record.publisher] += 1
        return None

    def keep(self, record: Record) -> bool:
        reason = self.reason_to_drop(record)
        if reason is not None:
            self.dropped[reason] += 1
        return reason is None
