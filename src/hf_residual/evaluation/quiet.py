"""Keep lm-eval's noise off the user's screen during ``hf-residual eval``; show it with ``--verbose``.

What lm-eval prints on its own, and where it comes from (lm-eval 0.4):

* ``fatal: not a git repository`` once per task: ``simple_evaluate`` records the git commit of the current
  folder (``lm_eval.loggers.utils.get_git_commit_hash`` runs ``git describe`` with stderr inherited). The
  commit of the folder a user runs hf-residual from says nothing about the results; it is still recorded
  where there is one, with git's complaint sent nowhere.
* ``Passed argument batch_size = auto ...`` and ``Determined largest batch size``: ``print`` calls of the
  hf backend, on stdout, where they would mix with our results and break ``--json``.
* lm-eval's warnings (``--gen-kwargs`` overriding task settings, "Custom kwargs can be passed to
  --metadata" for tasks with their own dataset loader): logged by the ``lm_eval`` logger, which has no
  handler until lm-eval's CLI sets one up, so Python's last-resort handler writes them to stderr.

Without ``verbose`` the prints are dropped and the logger shows errors only; with it the prints go to
stderr and the logger shows INFO and up on stderr, in lm-eval's own format.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator


def git_commit_hash() -> str | None:
    """lm-eval's ``get_git_commit_hash`` without git's error message when the folder is no repository."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        return (
            subprocess.check_output(  # noqa: S603
                ["git", "describe", "--always"],  # noqa: S607
                stderr=subprocess.DEVNULL,
            )
            .strip()
            .decode()
        )
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


@contextlib.contextmanager
def lm_eval_output(verbose: bool = False) -> Iterator[None]:
    """Inside the block lm-eval's prints and logs are dropped (or, ``verbose``, shown on stderr)."""
    try:
        import lm_eval.evaluator
    except ImportError:  # the runner says how to install it
        yield
        return
    logger = logging.getLogger("lm_eval")
    level, handlers, propagate = logger.level, list(logger.handlers), logger.propagate
    original_hash = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = git_commit_hash
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-8s [%(name)s] %(message)s"))
        if not handlers:
            logger.addHandler(handler)
            logger.propagate = False
        logger.setLevel(logging.INFO)
    else:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr if verbose else io.StringIO()):
            yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = original_hash
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate = propagate
