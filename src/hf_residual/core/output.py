"""Output folders that appear only when complete: staged beside the destination, renamed at the end.

An interrupted or failed run leaves no folder that looks finished: the staging folder is named
``.<name>.partial-<random>`` and removed on error (an interruption included: the CLI turns SIGTERM into
one, see ``hf_residual.cli``). Before the rename every file and folder of the staging folder is fsynced,
and the parent after it, so that a crash or power loss right after a run cannot leave a renamed folder
with empty or truncated files. ``--overwrite`` swaps the new folder with the old one in one step where the
system can (``exchange``), so that the name always holds a complete folder.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hf_residual.errors import InsufficientDiskError, OutputExistsError

# Room kept free beyond the tensor bytes: headers, tokenizer files, card, and the filesystem's own needs.
DISK_MARGIN_BYTES = 64 * 1024 * 1024
DISK_ADVICE = "free some space or choose another output folder"

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# renameat2 exists but this filesystem or kernel does not support the exchange.
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


def free_bytes(folder: Path) -> int:
    """Free bytes on the filesystem holding ``folder``."""
    return shutil.disk_usage(folder).free


def check_destination(output: Path, *, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; call before any expensive work."""
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; choose another -o/--output, or pass --overwrite")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output} exists and is not a folder; remove it or choose another output")


def disk_message(folder: Path, needed: int, available: int, advice: str = DISK_ADVICE) -> str:
    return (
        f"not enough free disk under {folder}: the output needs about {needed / 1e9:.2f} GB and "
        f"{available / 1e9:.2f} GB are free; {advice}"
    )


def check_free_space(folder: Path, required_bytes: int) -> None:
    """Raise ``InsufficientDiskError`` (with ``folder``, ``needed`` and ``available`` set on it)."""
    available = free_bytes(folder)
    needed = required_bytes + DISK_MARGIN_BYTES
    if available < needed:
        error = InsufficientDiskError(disk_message(folder, needed, available))
        error.folder, error.needed, error.available = folder, needed, available
        raise error


# --- interruptions held back while a rename or a removal must finish -------------------------------------


class _Held:
    depth = 0
    pending: BaseException | None = None


def interrupt(error: BaseException) -> None:
    """For a signal handler: raise ``error`` now, or, inside ``held_interrupts``, when that block ends.

    Only the CLI installs handlers that call this; the API never touches signal handlers.
    """
    if _Held.depth and threading.current_thread() is threading.main_thread():
        _Held.pending = _Held.pending or error
        return
    raise error


@contextmanager
def held_interrupts() -> Iterator[None]:
    """Run a block that must not stop half way (swap and removal of folders); see ``interrupt``.

    An interruption that arrived meanwhile is raised when the block ends normally; if the block itself
    raises, its own error propagates. Counts only on the main thread, where Python runs signal handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Held.depth += 1
    try:
        yield
    finally:
        _Held.depth -= 1
        pending = _Held.pending if _Held.depth == 0 else None
        if _Held.depth == 0:
            _Held.pending = None
    if pending is not None:
        raise pending


def remove_folder(folder: Path) -> None:
    """``rmtree`` that an interruption does not stop half way."""
    with held_interrupts():
        shutil.rmtree(folder, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it renamed over it (one ``os.replace``).

    A reader sees the old file or the new one, never a part; the one helper for small files written in
    place (config.json of an output, eval results, cards).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- durability: fsync and atomic exchange -------------------------------------------------------------


def _fsync(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # cannot be synced here
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder (deepest first); symbolic links are skipped."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                _fsync(path)
        if os.name == "posix":  # folders cannot be opened for fsync elsewhere
            _fsync(root)


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+, musl 1.2.2+
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange(a: Path, b: Path) -> bool:
    """Swap folders ``a`` and ``b`` atomically: each name holds the other's folder after one system call.

    Linux ``renameat2(RENAME_EXCHANGE)``. Returns False where it is not available, so that the caller
    falls back to two renames: not Linux, a C library without ``renameat2``, or a filesystem or kernel
    that does not support the exchange (EINVAL, ENOSYS, ENOTSUP). Other errors are raised.
    """
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _replace(staging: Path, output: Path) -> None:
    """Put ``staging`` under the name ``output``, replacing any folder there, and remove the old one.

    With ``exchange`` the name never lacks a complete folder. Without it (see ``exchange``), the old folder
    is first renamed away, so for a moment between two renames neither exists under the name; a crash in
    that moment leaves the new folder as ``.<name>.partial-*`` and the old one as ``.<name>.old-*``.
    """
    if output.exists():
        if exchange(staging, output):
            remove_folder(staging)  # now the old output
        else:
            retired = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
            output.rename(retired)
            staging.rename(output)
            remove_folder(retired)
    else:
        staging.rename(output)
    if os.name == "posix":
        _fsync(output.parent)


@contextmanager
def staged_output(output: str | Path, *, overwrite: bool, required_bytes: int) -> Iterator[Path]:
    """Yield a staging folder; on success make it durable and replace ``output`` with it, on error delete it.

    Free space under the output's parent is checked first (``InsufficientDiskError``).
    """
    output = Path(output).absolute()
    check_destination(output, overwrite=overwrite)
    parent = output.parent
    parent.mkdir(parents=True, exist_ok=True)
    check_free_space(parent, required_bytes)
    staging = parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        fsync_tree(staging)
    except BaseException:
        remove_folder(staging)
        raise
    with held_interrupts():
        _replace(staging, output)
