"""The ``hf-residual`` command line: parse, call one API function, render the result.

Each sub-command lives in ``hf_residual.commands.<name>`` and exposes ``register(subparsers)``; it sets
``func`` on its parser to a ``run(args) -> int``. Errors of the ``ResidualError`` tree become one line on
stderr and a non-zero exit; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hf_residual import __version__
from hf_residual.commands import COMMAND_MODULES
from hf_residual.errors import ResidualError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-residual",
        description=(
            "Instruction residuals (Jindal et al. 2024): R = instruct - base, added to a continually "
            "pre-trained or derived model of the same base to restore instruction following."
        ),
    )
    parser.add_argument("--version", action="version", version=f"hf-residual {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(f"hf_residual.commands.{module_name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ResidualError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing was published and no finished-looking output was left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
