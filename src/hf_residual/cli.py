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
import difflib
import gc
import importlib
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from hf_residual._version import __version__
from hf_residual.commands import COMMAND_MODULES
from hf_residual.core.output import interrupt
from hf_residual.errors import ResidualError


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


def _unknown_options(parser: argparse.ArgumentParser, tokens: list[str]) -> list[str]:
    """The options among ``tokens`` that ``parser`` does not know (nor as an abbreviation of one)."""
    unknown = []
    for token in tokens:
        if token == "--":
            break
        if not token.startswith("-") or token == "-" or parser._negative_number_matcher.match(token):
            continue
        option = token.split("=", 1)[0] if token.startswith("--") else token[:2]
        known = parser._option_string_actions
        if option in known or (option.startswith("--") and any(o.startswith(option) for o in known)):
            continue
        unknown.append(option)
    return unknown


def _close(word: str, candidates, cutoff: float = 0.6) -> list[str]:
    return difflib.get_close_matches(str(word), [str(c) for c in candidates], n=2, cutoff=cutoff)


def _option_hints(parser: argparse.ArgumentParser, tokens: list[str], also=()) -> str:
    """`` (--ouput: did you mean --output?)`` for each unknown option of ``tokens`` with a close one, or "".

    Options of ``parser`` and those in ``also`` (the main parser's, before the sub-command) are suggested.
    """
    names = [o for o in [*parser._option_string_actions, *also] if o not in ("-h", "--help")]
    hints = [
        f"{option}: did you mean {' or '.join(close)}?"
        for option in _unknown_options(parser, tokens)
        if (close := _close(option, names, cutoff=0.7))
    ]
    return f" ({'; '.join(hints)})" if hints else ""


class Parser(argparse.ArgumentParser):
    """argparse with suggestions: a mistyped sub-command, choice or option names the closest ones.

    Sub-command parsers are of this class too (``add_subparsers`` makes them of the parent's class).
    Errors still exit with status 2, as argparse's do.
    """

    _tokens: list[str] = []

    def _check_value(self, action: argparse.Action, value) -> None:
        if action.choices is not None and value not in action.choices:
            close = _close(value, action.choices)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            choices = ", ".join(map(repr, action.choices))
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} ({hint}choose from {choices})")

    def parse_known_args(self, args=None, namespace=None):
        self._tokens = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._chosen_subparser(parsed)
            hints = _option_hints(
                parser, extras, also=self._option_string_actions if parser is not self else ()
            )
            parser.error(f"unrecognized arguments: {' '.join(extras)}{hints}")
        return parsed

    def _chosen_subparser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(parsed, action.dest, None) or "")
                if chosen is not None:
                    return chosen._chosen_subparser(parsed) if isinstance(chosen, Parser) else chosen
        return self

    def error(self, message: str):
        if message.startswith("the following arguments are required"):
            # an option mistyped, e.g. --ouput for the required --output: say so beside the missing one
            unknown = _unknown_options(self, self._tokens)
            if unknown:
                message += f"; unrecognized arguments: {' '.join(unknown)}{_option_hints(self, unknown)}"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
        _json_error(args, type(error).__name__, str(error), error.exit_code)
        return error.exit_code
    except KeyboardInterrupt as interruption:
        print("interrupted: nothing was published and no finished-looking output was left", file=sys.stderr)
        code = 143 if isinstance(interruption, Terminated) else 130
        _json_error(args, "Interrupted", "interrupted: nothing was published", code)
        return code


def _json_error(args: argparse.Namespace, kind: str, message: str, exit_code: int) -> None:
    """With --json, a failure is a JSON object on stdout too, so a script reads one object either way."""
    if getattr(args, "json", False):
        from hf_residual.commands._json import emit

        emit({"command": args.command, "error": {"type": kind, "message": message, "exit_code": exit_code}})


def console_main() -> None:
    """The ``hf-residual`` executable: ``main``, then exit with its code.

    Before exiting, every object is moved out of the garbage collector's reach (``gc.freeze``): the
    interpreter's final collection would otherwise walk all of them (numba's registries, once the engine
    has run: about 0.3 s of a 2.5 s port, benchmarks/RESULTS.md) only to free memory the process is about
    to give back anyway. Files are closed and flushed by the commands themselves; exit handlers still run.
    Only the executable does this: ``main`` called from Python leaves the collector alone.
    """
    try:
        sys.exit(main())
    finally:  # also after argparse's own exits (--help, --version, usage errors)
        gc.freeze()


if __name__ == "__main__":
    console_main()
