"""Argument helpers shared by sub-commands, so flags read the same everywhere."""

from __future__ import annotations

import argparse

MODEL_HELP = "a local folder, or a Hub repo id (org/name, optionally org/name@revision)"


def add_output(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        help=f"folder to write the {what} to; written beside it first and renamed when complete "
        "(optional with --push-to: a temporary folder is used and removed after the upload)",
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
        "--force",
        action="store_true",
        help="skip the lineage checks: that the target descends from the base, and that the residual is not "
        "zero (source and base the same model)",
    )


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def add_revision(parser: argparse.ArgumentParser, flag: str, what: str, arg: str) -> None:
    parser.add_argument(
        flag,
        metavar="REV",
        help=f"Hub branch, tag or commit of {what} (same as {arg}@REV); pinned to its "
        "commit sha, which is recorded in the manifest and card",
    )


def add_token(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        help="Hugging Face token (default: HF_TOKEN, then the saved `hf auth login`); never printed or saved",
    )


def add_publish(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group("publishing on the Hugging Face Hub")
    group.add_argument(
        "--push-to",
        metavar="REPO",
        help=f"upload the {what} to this Hub repo (org/name; created if missing) in one commit, only after "
        "the local output verified itself",
    )
    group.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    group.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    group.add_argument("--commit-message", metavar="TEXT", help="message of the upload commit")
    group.add_argument(
        "--dry-run",
        action="store_true",
        help="compute and verify the output, print the files and card that would be uploaded, upload nothing",
    )
    add_token(parser)


def publish_kwargs(args: argparse.Namespace) -> dict:
    """The API keyword arguments of the publishing flags."""
    return {
        "push_to": args.push_to,
        "create_pr": args.create_pr,
        "private": args.private,
        "commit_message": args.commit_message,
        "dry_run": args.dry_run,
        "token": args.token,
    }


def print_base(details: dict) -> None:
    if details.get("base_source") not in (None, "given"):
        print(f"base: {details['base']} (found in {details['base_source']}; --base overrides)")


def print_publication(details: dict) -> None:
    publication = details.get("publication")
    if publication is not None:
        print(publication.describe())


def output_label(result) -> str:
    """Where the output is, or that it was a temporary folder removed after the upload."""
    if result.details.get("temporary_output"):
        return f"{result.output.name} (temporary folder, removed after publishing)"
    return str(result.output)


def add_target_options(parser: argparse.ArgumentParser) -> None:
    """``--keep-fp8`` and ``--vocab-from``: how ``apply`` and ``port`` treat what the target brings."""
    parser.add_argument(
        "--keep-fp8",
        action="store_true",
        help="a TARGET stored in FP8 with block scales (quant_method fp8): write FP8 weights re-quantized "
        "with its block size, so the output loads like TARGET did. Default: those weights are written in "
        "bfloat16 and config.json loses its quantization_config",
    )
    parser.add_argument(
        "--vocab-from",
        choices=("target", "instruct"),
        default=None,
        help="a TARGET whose vocabulary grew and an instruct model that added other tokens at the same ids "
        "(or the same token at other ids): whose token and embedding row win at each clash; the other "
        "side's clashing tokens are left out. Default: refuse, naming the clashes",
    )


def model_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments ``apply`` and ``port`` share, from their common flags."""
    return {
        "alpha": args.alpha,
        "target_revision": args.target_revision,
        "max_shard_size": args.max_shard_size,
        "overwrite": args.overwrite,
        "force": args.force,
        "keep_fp8": args.keep_fp8,
        "vocab_from": args.vocab_from,
        "progress": not args.quiet,
        **publish_kwargs(args),
    }


def print_model(result) -> None:
    """What ``apply`` and ``port`` print about the model they wrote (without ``--json``)."""
    from hf_residual.core.vocab import summary_line

    print(
        f"wrote model {output_label(result)}: {result.tensors} tensors, {human_bytes(result.bytes_written)}, "
        f"alpha {result.details['alpha']}, |target - base| / |base| = {result.details['distance']:.4f}"
    )
    if summary_line(result.details):
        print(summary_line(result.details))
    print_publication(result.details)
