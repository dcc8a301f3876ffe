"""Where news articles come from: a live Fundus crawl, CC-NEWS WARC files (Common Crawl or a local
mirror), or a folder of saved HTML pages parsed offline with each publisher's Fundus parser.

Every source yields ``Record``s; filtering (dates, language, length, duplicates, caps) is done by
``hf_residual.cpt.filters`` for all sources alike, so the window is always the publishing date, never
CC-NEWS's crawl date.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

from hf_residual.errors import ConfigError, InputNotFoundError

PAGES_INDEX = "pages.jsonl"  # one line per saved page: {"file": ..., "url": ..., "crawl_date": ISO}


@dataclass
class Record:
    """One article as the corpus stores it; ``published_at`` None when the page had no date."""

    url: str
    publisher: str
    title: str
    text: str
    published_at: datetime | None
    language: str | None
    source: str


def _import_fundus():
    try:
        import fundus
    except ImportError as error:
        raise ConfigError(
            f"fundus could not be imported ({error}); install the cpt extra: pip install 'hf-residual[cpt]' "
            "(fundus 0.5.7 needs curl-cffi<0.16)"
        ) from None
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0  # Fundus detects languages with langdetect, random unless seeded
    return fundus


def select_publishers(names: list[str] | None = None, countries: list[str] | None = None) -> list:
    """Fundus publishers by name (``us.WashingtonTimes``) and/or country code (``us``, ``de``)."""
    collection = _import_fundus().PublisherCollection
    groups = collection.get_subgroup_mapping()
    chosen = []
    for country in countries or []:
        if country.lower() not in groups:
            raise ConfigError(f"unknown country {country!r}; Fundus has {', '.join(sorted(groups))}")
        chosen.extend(groups[country.lower()])
    for name in names or []:
        country, _, attribute = name.partition(".")
        group = groups.get(country.lower())
        publisher = getattr(group, attribute, None) if group is not None and attribute else None
        if publisher is None:
            raise ConfigError(
                f"unknown publisher {name!r}; write it as <country>.<Publisher>, e.g. us.WashingtonTimes "
                "(see Fundus' supported publishers list)"
            )
        chosen.append(publisher)
    if not chosen:
        raise ConfigError(
            "no publishers: give --publishers (e.g. us.WashingtonTimes) or --countries (e.g. us)"
        )
    return list(dict.fromkeys(chosen))


def _utc(value) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _record(article, source: str) -> Record | None:
    text = article.plaintext
    if not text or not article.title:
        return None
    return Record(
        url=article.html.responded_url or article.html.requested_url,
        publisher=article.publisher,
        title=article.title,
        text=text,
        published_at=_utc(article.publishing_date),
        language=article.lang,
        source=source,
    )


def _from_crawler(crawler, source: str, max_articles: int | None) -> Iterator[Record]:
    from fundus.scraping.filter import Requires

    for article in crawler.crawl(
        max_articles=max_articles, only_complete=Requires("title", "body"), error_handling="suppress"
    ):
        record = _record(article, source)
        if record is not None:
            yield record


def live(publishers: list, max_articles: int | None = None) -> Iterator[Record]:
    """Crawl the publishers' sitemaps and feeds now (network needed)."""
    crawler = _import_fundus().Crawler(*publishers)
    yield from _from_crawler(crawler, "live", max_articles)


def ccnews(
    publishers: list,
    start: datetime,
    end: datetime,
    server_address: str = "https://data.commoncrawl.org/",
    processes: int = 0,
    max_articles: int | None = None,
) -> Iterator[Record]:
    """CC-NEWS WARC files crawled between ``start`` and ``end`` (crawl dates, naive UTC).

    ``server_address`` may be a local mirror (``http://host:port/``) laid out like Common Crawl:
    ``crawl-data/CC-NEWS/YYYY/MM/warc.paths.gz`` for every month in range, and the WARC files it lists.
    """
    fundus = _import_fundus()
    address = server_address if server_address.endswith("/") else server_address + "/"
    crawler = fundus.CCNewsCrawler(
        *publishers, start=start, end=end, server_address=address, processes=processes, disable_tqdm=True
    )
    yield from _from_crawler(crawler, "cc-news", max_articles)


def _publisher_for(url: str, publishers: list):
    host = urlparse(url).netloc.lower()
    for publisher in publishers:
        domains = [publisher.domain, *getattr(publisher, "deprecated_domains", [])]
        if any(urlparse(d).netloc.lower() == host for d in domains):
            return publisher
    return None


def _index(folder: Path) -> list[dict]:
    index = folder / PAGES_INDEX
    if not index.is_file():
        raise InputNotFoundError(
            f"{folder} has no {PAGES_INDEX}; write one line per page: "
            '{"file": "page.html", "url": "https://...", "crawl_date": "2024-01-31T12:00:00Z"}'
        )
    entries = []
    for number, line in enumerate(index.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entry["crawl_date"] = datetime.fromisoformat(entry["crawl_date"].replace("Z", "+00:00"))
            entry["file"], entry["url"]
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ConfigError(f"{index} line {number} is not a valid page entry ({error!r})") from None
        entries.append(entry)
    return entries


def html_folder(folder: str | Path, publishers: list | None = None) -> Iterator[Record]:
    """Saved pages listed in ``pages.jsonl``, parsed with the parser of the publisher owning each URL.

    ``publishers`` None: every Fundus publisher is a candidate. Pages of no known publisher are skipped.
    """
    from fundus.scraping.article import Article
    from fundus.scraping.html import HTML, SourceInfo

    folder = Path(folder)
    candidates = publishers or list(_import_fundus().PublisherCollection)
    for entry in _index(folder):
        publisher = _publisher_for(entry["url"], candidates)
        page = folder / entry["file"]
        if publisher is None or not page.is_file():
            continue
        content = page.read_text(encoding="utf-8", errors="replace")
        crawl_date = _utc(entry["crawl_date"])
        extraction = publisher.parser(crawl_date.date()).parse(content, "suppress")
        html = HTML(entry["url"], entry["url"], content, crawl_date, SourceInfo(publisher.name))
        record = _record(Article(html=html, **extraction), "html")
        if record is not None:
            yield record
