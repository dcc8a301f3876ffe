"""``hf-residual corpus``: build a news corpus with Fundus (live, CC-NEWS, or saved HTML pages)."""

from __future__ import annotations

import argparse

from hf_residual.commands._common import add_quiet


def _list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "corpus",
        help="build a news corpus with Fundus, saved as a datasets folder",
        description=(
            "Collect news articles with Fundus from a live crawl, CC-NEWS WARC files (Common Crawl or a "
            "local mirror) or a folder of saved HTML pages, keep those published in a date window (UTC), "
            "in given languages, long enough and not duplicated (by URL and by normalised text), and save "
            "them as a datasets folder (url, publisher, title, text, published_at, language, source). "
            "Example (the paper's window): hf-residual corpus --source cc-news --countries us "
            "--start 2023-12-01 --end 2024-09-30 --language en -o news"
        ),
    )
    parser.add_argument(
        "--source",
        choices=["live", "cc-news", "html"],
        default="cc-news",
        help="where articles come from: cc-news (default; Common Crawl's news WARC files, or a mirror with "
        "--server), live (crawl the publishers' sites now), html (saved pages in --html-folder)",
    )
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to save the corpus to")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument(
        "--format",
        choices=["arrow", "parquet"],
        default="arrow",
        help="how the datasets folder is saved: arrow (default; datasets' save_to_disk, load_from_disk "
        "reads it) or parquet (one corpus.parquet file)",
    )
    parser.add_argument("--publishers", type=_list, metavar="LIST", help="e.g. us.APNews,de.DieZeit")
    parser.add_argument("--countries", type=_list, metavar="LIST", help="Fundus country codes, e.g. us,uk")
    parser.add_argument("--start", metavar="DATE", help="earliest publishing date kept (YYYY-MM-DD, UTC)")
    parser.add_argument("--end", metavar="DATE", help="latest publishing date kept (inclusive, UTC)")
    parser.add_argument("--language", type=_list, metavar="LIST", help="language codes to keep, e.g. en,de")
    parser.add_argument("--max-articles", type=int, metavar="N", help="stop after N articles in total")
    parser.add_argument("--max-per-publisher", type=int, metavar="N", help="keep at most N per publisher")
    parser.add_argument("--min-words", type=int, default=50, metavar="N", help="drop shorter articles (50)")
    parser.add_argument("--html-folder", metavar="DIR", help="html source: saved pages and their pages.jsonl")
    parser.add_argument(
        "--server",
        default="https://data.commoncrawl.org/",
        metavar="URL",
        help="cc-news: server holding crawl-data/CC-NEWS/ (a local mirror works)",
    )
    parser.add_argument(
        "--crawl-start", metavar="DATE", help="cc-news: first crawl date read (default --start)"
    )
    parser.add_argument("--crawl-end", metavar="DATE", help="cc-news: last crawl date read (default --end)")
    parser.add_argument("--processes", type=int, default=0, help="cc-news: extra worker processes (0)")
    parser.add_argument("--tokenizer", metavar="MODEL", help="report lengths in this tokenizer's tokens")
    add_quiet(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_residual.cpt.corpus import collect

    summary = collect(
        args.source,
        args.output,
        publishers=args.publishers,
        countries=args.countries,
        start=args.start,
        end=args.end,
        languages=args.language,
        max_articles=args.max_articles,
        max_per_publisher=args.max_per_publisher,
        min_words=args.min_words,
        html_folder=args.html_folder,
        server_address=args.server,
        crawl_start=args.crawl_start,
        crawl_end=args.crawl_end,
        processes=args.processes,
        tokenizer=args.tokenizer,
        format=args.format,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(summary.describe())
    return 0
