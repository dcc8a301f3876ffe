"""Argument helpers shared by sub-commands, so flags read the same everywhere."""

from __future__ import annotations

import argparse

MODEL_HELP = "a local model folder (Hub repo ids, optionally repo@revision, come with Hub support)"


def add_output(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="DIR",
        help=f"folder to write the {what} to; written beside it first and renamed when complete",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it already exists")
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="largest safetensors shard to write, e.g. 5GB (default), 500MB",
    )


def add_alpha(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="scale of the residual: output = target + alpha * residual (default 1.0)",
    )


def add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force", action="store_true", help="skip the lineage check that the target descends from the base"
    )


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
