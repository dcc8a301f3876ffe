"""The ``hf-residual`` command line: parse, call one API function, render the result.

Each sub-command lives in ``hf_residual.commands.<name>`` and exposes ``register(subparsers)``; it sets
``func`` on its parser to a ``run(args) -> int``. Errors of the ``ResidualError`` tree become one line on
stderr and a non-zero exit; ``--debug`` shows the traceback.

Interruptions: Ctrl-C (SIGINT) and SIGTERM (what ``timeout`` and job schedulers send) both unwind like
``KeyboardInterrupt``, so staging and temporary folders are removed, and exit with 130 and 143. ``main``
installs the handlers for its own run (main thread only, and only over Python's default ones) and restores
the previous ones after; the Python API never installs any.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from hf_residual import __version__
from hf_residual.commands import COMMAND_MODULES
from hf_residual.errors import ResidualError
from hf_residual.output import interrupt


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup runs."""


def _on_signal(signum: int, frame: object) -> None:
    interrupt(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())


@contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM and SIGINT raise (see ``output.interrupt``) while the block runs; handlers restored after.

    A handler is replaced only where Python's default is in place: an ignored signal stays ignored (e.g.
    SIGINT of a background job), and a handler set by a program that calls ``main`` stays.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    previous = {}
    for number, default in defaults.items():
        if signal.getsignal(number) is default:
            previous[number] = signal.signal(number, _on_signal)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


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
        with _interruptible():
            return int(args.func(args) or 0)
    except ResidualError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt as interruption:
        print("interrupted: nothing was published and no finished-looking output was left", file=sys.stderr)
        return 143 if isinstance(interruption, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
