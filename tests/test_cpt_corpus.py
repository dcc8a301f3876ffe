"""Building a news corpus offline: HTML pages and a WARC file written here, parsed by a real Fundus parser
(The Washington Times' layout: JSON-LD headline/date, paragraphs under ``.bigtext``); CC-NEWS served from
127.0.0.1 by ``http.server``."""

from __future__ import annotations

import functools
import gzip
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import fundus  # noqa: F401  (the [cpt] extra: a broken install must fail here, not skip)
import pytest
from datasets import load_from_disk

from hf_residual.cli import main
from hf_residual.cpt.corpus import collect
from hf_residual.cpt.data import load_corpus
from hf_residual.cpt.filters import normalise_url, text_hash
from hf_residual.errors import ConfigError

SITE = "https://www.washingtontimes.com/news/2024/"
BRIDGE = (
    "The city council of Quellport voted on Monday to build a new bridge over the river Amsel after two years "
    "of debate. Supporters said the bridge would shorten the commute for thousands of workers and bring "
    "shoppers back to the old market. Critics warned that the budget did not include the cost of repairs."
)
STORM = (
    "A winter storm closed the harbour for two days and left fishermen without work. Prices at the fish "
    "market doubled by Wednesday, and the mayor promised help for families who lost their income during "
    "the closure. Forecasters expect calmer weather by the end of the week."
)
GERMAN = (
    "Der Stadtrat hat am Montag beschlossen, eine neue Brücke über den Fluss zu bauen. Die Befürworter sagen, "
    "dass die Brücke den Weg zur Arbeit für viele Menschen verkürzen wird und dass die Geschäfte in der "
    "Altstadt davon profitieren werden. Kritiker warnen vor den hohen Kosten."
)
OLD = (
    "Last summer the school board approved a budget with more teachers and a smaller tax rise than the one "
    "proposed in spring. Parents welcomed the decision, but the teachers union said that salaries still lag "
    "behind those of neighbouring districts and asked for a new round of talks."
)


def page(title: str | None, published: str | None, text: str, lang: str = "en") -> str:
    ld = {
        "@context": "https://schema.org",
        "@type": "NewsArticle",
        "author": {"@type": "Person", "name": "J. Roe"},
    }
    if title:
        ld["headline"] = title
    if published:
        ld["datePublished"] = published
    paragraphs = "".join(f"<p>{sentence}.</p>" for sentence in text.split(". "))
    return (
        f'<!DOCTYPE html><html lang="{lang}"><head><title>{title}</title>'
        f'<script type="application/ld+json">{json.dumps(ld)}</script></head>'
        f'<body><div class="bigtext">{paragraphs}</div></body></html>'
    )


PAGES = [  # (name, url, page) -- what each should become is in the test
    ("bridge", SITE + "jan/10/bridge/", page("Bridge vote", "2024-01-10T09:00:00-05:00", BRIDGE)),
    (
        "bridge-again",
        SITE + "jan/10/bridge?utm_source=feed",
        page("Bridge vote", "2024-01-10T09:00:00-05:00", STORM),
    ),
    (
        "bridge-copy",
        SITE + "jan/11/copy/",
        page("Copy", "2024-01-11T09:00:00Z", BRIDGE.upper().replace(",", "")),
    ),
    ("old", SITE + "jun/01/school/", page("School budget", "2023-06-01T08:00:00Z", OLD)),
    ("german", SITE + "jan/12/bruecke/", page("Brücke", "2024-01-12T08:00:00Z", GERMAN, lang="de")),
    ("short", SITE + "jan/13/short/", page("Short", "2024-01-13T08:00:00Z", "Too short to keep")),
    ("undated", SITE + "jan/14/undated/", page("Undated", None, STORM + " Again")),
    ("storm", SITE + "jan/15/storm/", page("Harbour closed", "2024-01-15T23:30:00-05:00", STORM)),
    (
        "elsewhere",
        "https://example.org/news/1",
        page("Elsewhere", "2024-01-15T08:00:00Z", STORM + " Elsewhere"),
    ),
]
WINDOW = {"start": "2023-12-01", "end": "2024-09-30", "languages": ["en"], "min_words": 20}


@pytest.fixture(scope="module")
def html_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pages")
    lines = []
    for name, url, html in PAGES:
        (folder / f"{name}.html").write_text(html, encoding="utf-8")
        lines.append(json.dumps({"file": f"{name}.html", "url": url, "crawl_date": "2024-01-20T00:00:00Z"}))
    (folder / "pages.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_html_pages_are_parsed_filtered_and_deduplicated(html_folder, tmp_path, llama):
    tokenizer = str(llama.base)
    summary = collect(
        "html", tmp_path / "news", html_folder=html_folder, tokenizer=tokenizer, progress=False, **WINDOW
    )
    rows = load_from_disk(str(tmp_path / "news"))
    assert sorted(rows["title"]) == ["Bridge vote", "Harbour closed"]
    assert set(rows.column_names) == {
        "url",
        "publisher",
        "title",
        "text",
        "published_at",
        "language",
        "source",
    }
    storm = rows[rows["title"].index("Harbour closed")]
    assert storm["published_at"] == "2024-01-16T04:30:00+00:00"  # converted to UTC
    assert (
        storm["publisher"] == "The Washington Times"
        and storm["language"] == "en"
        and storm["source"] == "html"
    )
    assert "fishermen" in storm["text"]
    assert summary.dropped == {
        "duplicate url": 1,
        "duplicate text": 1,
        "published outside the window": 1,
        "other language": 1,
        "too short": 1,
        "no publishing date": 1,
    }
    assert summary.per_publisher == {"The Washington Times": 2}
    assert summary.length_unit == "tokens" and summary.lengths["min"] > 45  # more tokens than words
    assert "wrote 2 articles" in summary.describe() and load_corpus(str(tmp_path / "news")).num_rows == 2


def test_caps_parquet_and_cli(html_folder, tmp_path, capsys):
    args = ["corpus", "--source", "html", "--html-folder", str(html_folder), "--countries", "us", "-q"]
    assert main([*args, "-o", str(tmp_path / "one"), "--max-per-publisher", "1", "--min-words", "20"]) == 0
    assert "wrote 1 articles" in capsys.readouterr().out
    assert main([*args, "-o", str(tmp_path / "pq"), "--format", "parquet", "--min-words", "20"]) == 0
    assert (
        load_corpus(str(tmp_path / "pq")).num_rows == 5
    )  # no window, no language: old, German, undated kept
    assert main([*args, "-o", str(tmp_path / "none"), "--start", "2030-01-01"]) == 2
    assert "no article passed the filters" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    assert main(["corpus", "--source", "html", "-o", str(tmp_path / "x"), "--publishers", "us.Nope"]) == 2
    assert "unknown publisher 'us.Nope'; write it as <country>.<Publisher>" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_normalisation_keys():
    assert normalise_url("https://WWW.Site.com/a/b/?x=1#c") == normalise_url("http://site.com/a/b")
    assert text_hash("Hello,  World!") == text_hash("hello world") != text_hash("hello there")


def _write_warc(path, pages) -> None:
    from fastwarc.stream_io import FileStream, GZipStream
    from fastwarc.warc import WarcRecord, WarcRecordType

    stream = GZipStream(FileStream(str(path), "wb"))
    for url, html in pages:
        body = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html.encode()
        record = WarcRecord()
        record.init_headers(len(body), WarcRecordType.response)
        record.headers["WARC-Target-URI"] = url
        record.headers["WARC-Date"] = "2024-01-20T10:00:00Z"
        record.headers["Content-Type"] = "application/http; msgtype=response"
        record.set_bytes_content(body)
        record.write(stream, checksum_data=True)  # Fundus verifies digests
    stream.close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def ccnews_mirror(tmp_path):
    month = tmp_path / "crawl-data" / "CC-NEWS" / "2024" / "01"
    month.mkdir(parents=True)
    name = "CC-NEWS-20240120100000-00001.warc.gz"
    chosen = {"bridge", "old", "storm", "elsewhere"}
    _write_warc(month / name, [(url, html) for n, url, html in PAGES if n in chosen])
    (month / "warc.paths.gz").write_bytes(gzip.compress(f"crawl-data/CC-NEWS/2024/01/{name}\n".encode()))
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_ccnews_from_a_local_mirror_filters_by_publishing_date(ccnews_mirror, tmp_path):
    summary = collect(
        "cc-news",
        tmp_path / "cc",
        publishers=["us.WashingtonTimes"],
        server_address=ccnews_mirror,
        crawl_start="2024-01-01",
        crawl_end="2024-01-31",
        progress=False,
        **WINDOW,
    )
    rows = load_from_disk(str(tmp_path / "cc"))
    assert sorted(rows["title"]) == ["Bridge vote", "Harbour closed"]  # crawled in January 2024, both
    assert set(rows["source"]) == {"cc-news"}
    assert summary.dropped == {"published outside the window": 1}  # crawled in 2024, published in 2023


def test_bad_corpus_input(tmp_path):
    with pytest.raises(ConfigError, match="no publishers"):
        collect("live", tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="not a date"):
        collect("html", tmp_path / "o", html_folder=tmp_path, start="last week", progress=False)
    with pytest.raises(FileNotFoundError, match="pages.jsonl"):
        collect("html", tmp_path / "o", html_folder=tmp_path, progress=False)
