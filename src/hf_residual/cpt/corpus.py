"""Build a news corpus: articles from one source, filtered, saved as a ``datasets`` Dataset folder
(arrow via ``save_to_disk``, or parquet), with a summary of what was kept and dropped.

Fields: url, publisher, title, text, published_at (UTC ISO 8601), language, source. The folder appears
only when complete (written beside it, renamed at the end); an empty result is an error.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hf_residual.core.output import check_destination, staged_output
from hf_residual.cpt.filters import CorpusFilter
from hf_residual.cpt.sources import Record
from hf_residual.errors import ConfigError

FORMATS = ("arrow", "parquet")
PARQUET_FILE = "corpus.parquet"
COLUMNS = ("url", "publisher", "title", "text", "published_at", "language", "source")


@dataclass
class CorpusSummary:
    """Articles kept per publisher, drops per reason, and the length distribution (tokens or words)."""

    output: Path
    articles: int
    per_publisher: dict[str, int]
    dropped: dict[str, int]
    lengths: dict[str, float] = field(default_factory=dict)
    length_unit: str = "words"

    def describe(self) -> str:
        lines = [f"wrote {self.articles} articles to {self.output}"]
        lines += [f"  {name}: {count}" for name, count in sorted(self.per_publisher.items())]
        if self.dropped:
            lines.append("dropped: " + ", ".join(f"{why} {n}" for why, n in sorted(self.dropped.items())))
        if self.lengths:
            stats = ", ".join(f"{k} {v:.0f}" for k, v in self.lengths.items())
            lines.append(f"length in {self.length_unit}: {stats}")
        return "\n".join(lines)


def _row(record: Record) -> dict:
    return {
        "url": record.url,
        "publisher": record.publisher,
        "title": record.title,
        "text": record.text,
        "published_at": record.published_at.isoformat() if record.published_at else None,
        "language": record.language,
        "source": record.source,
    }


def length_stats(lengths: list[int]) -> dict[str, float]:
    ordered = sorted(lengths)
    if not ordered:
        return {}

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {
        "min": ordered[0],
        "mean": statistics.fmean(ordered),
        "p50": pct(0.5),
        "p90": pct(0.9),
        "max": ordered[-1],
    }


def _features():
    from datasets import Features, Value

    return Features({name: Value("string") for name in COLUMNS})


def build_corpus(
    records: Iterable[Record],
    output: str | Path,
    corpus_filter: CorpusFilter | None = None,
    *,
    format: str = "arrow",
    overwrite: bool = False,
    progress: bool = True,
    tokenizer=None,
) -> CorpusSummary:
    """Filter ``records`` and save the kept ones; stops reading once ``max_total`` articles are kept."""
    from datasets import Dataset
    from tqdm.auto import tqdm

    if format not in FORMATS:
        raise ConfigError(f"unknown corpus format {format!r}; choose one of {', '.join(FORMATS)}")
    output = Path(output)
    check_destination(output.absolute(), overwrite=overwrite)
    corpus_filter = corpus_filter or CorpusFilter()
    rows: list[dict] = []
    with tqdm(total=corpus_filter.max_total, desc="articles", unit="article", disable=not progress) as bar:
        for record in records:
            if corpus_filter.keep(record):
                rows.append(_row(record))
                bar.update()
            if corpus_filter.full():
                break
    if not rows:
        dropped = (
            ", ".join(f"{why}: {n}" for why, n in corpus_filter.dropped.items()) or "no articles were found"
        )
        raise ConfigError(f"no article passed the filters ({dropped}); widen the date window or the sources")
    dataset = Dataset.from_list(rows, features=_features())
    texts = [row["text"] for row in rows]
    if tokenizer is not None:
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        unit = "tokens"
    else:
        lengths, unit = [len(text.split()) for text in texts], "words"
    with staged_output(output, overwrite=overwrite, required_bytes=dataset.data.nbytes) as staging:
        if format == "parquet":
            dataset.to_parquet(str(staging / PARQUET_FILE))
        else:
            dataset.save_to_disk(str(staging))
    return CorpusSummary(
        output=output,
        articles=len(rows),
        per_publisher=dict(corpus_filter.kept),
        dropped=dict(corpus_filter.dropped),
        lengths=length_stats(lengths),
        length_unit=unit,
    )


SOURCES = ("live", "cc-news", "html")


def parse_date(value: str | None, what: str):
    """``YYYY-MM-DD`` or ISO 8601 -> aware UTC datetime (dates without a time mean midnight UTC)."""
    from datetime import datetime, timezone

    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{what} {value!r} is not a date; write it as YYYY-MM-DD") from None
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed


def collect(
    source: str,
    output: str | Path,
    *,
    publishers: list[str] | None = None,
    countries: list[str] | None = None,
    start: str | None = None,
    end: str | None = None,
    languages: list[str] | None = None,
    max_articles: int | None = None,
    max_per_publisher: int | None = None,
    min_words: int = 50,
    html_folder: str | Path | None = None,
    server_address: str = "https://data.commoncrawl.org/",
    crawl_start: str | None = None,
    crawl_end: str | None = None,
    processes: int = 0,
    tokenizer: str | None = None,
    format: str = "arrow",
    overwrite: bool = False,
    progress: bool = True,
) -> CorpusSummary:
    """Build a corpus from one source (``live``, ``cc-news`` or ``html``) with the filters above.

    ``start``/``end``: publishing-date window (inclusive, UTC; ``end`` as a date means the whole day).
    ``crawl_start``/``crawl_end`` (cc-news): which WARC files to read, by crawl date; default the
    publishing window (articles crawled after ``end`` are not read).
    """
    from datetime import datetime, timedelta, timezone

    from hf_residual.cpt import sources

    if source not in SOURCES:
        raise ConfigError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    check_destination(Path(output).absolute(), overwrite=overwrite)
    window_start = parse_date(start, "start")
    window_end = parse_date(end, "end")
    if end is not None and len(str(end)) == 10:
        window_end = window_end + timedelta(days=1) - timedelta(microseconds=1)
    corpus_filter = CorpusFilter(
        start=window_start,
        end=window_end,
        languages=[lang.lower() for lang in languages] if languages else None,
        min_words=min_words,
        max_per_publisher=max_per_publisher,
        max_total=max_articles,
    )
    chosen = (
        sources.select_publishers(publishers, countries)
        if (publishers or countries or source != "html")
        else None
    )
    if source == "html":
        if html_folder is None:
            raise ConfigError("the html source needs --html-folder DIR (saved pages and their pages.jsonl)")
        records = sources.html_folder(html_folder, chosen)
    elif source == "live":
        records = sources.live(chosen)
    else:
        first = parse_date(crawl_start, "crawl start") or window_start
        last = parse_date(crawl_end, "crawl end") or window_end or datetime.now(timezone.utc)
        if first is None:
            raise ConfigError("cc-news needs a window: --start (publishing) or --crawl-start")
        now = datetime.now(timezone.utc)
        naive = [min(d, now).astimezone(timezone.utc).replace(tzinfo=None) for d in (first, last)]
        records = sources.ccnews(chosen, naive[0], naive[1], server_address, processes)
    tok = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    return build_corpus(
        records, output, corpus_filter, format=format, overwrite=overwrite, progress=progress, tokenizer=tok
    )
