"""Output folders that appear only when complete: staged beside the destination, renamed at the end.

An interrupted or failed run leaves no folder that looks finished: the staging folder is named
``.<name>.partial-<random>`` and removed on error.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hf_residual.errors import InsufficientDiskError, OutputExistsError

# Room kept free beyond the tensor bytes: headers, tokenizer files, card, and the filesystem's own needs.
DISK_MARGIN_BYTES = 64 * 1024 * 1024


def free_bytes(folder: Path) -> int:
    """Free bytes on the filesystem holding ``folder``."""
    return shutil.disk_usage(folder).free


def check_destination(output: Path, *, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; call before any expensive work."""
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; choose another -o/--output, or pass --overwrite")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output} exists and is not a folder; remove it or choose another output")


@contextmanager
def staged_output(output: str | Path, *, overwrite: bool, required_bytes: int) -> Iterator[Path]:
    """Yield a staging folder; on success replace ``output`` with it, on error delete it."""
    output = Path(output).absolute()
    check_destination(output, overwrite=overwrite)
    parent = output.parent
    parent.mkdir(parents=True, exist_ok=True)
    available = free_bytes(parent)
    if available < required_bytes + DISK_MARGIN_BYTES:
        raise InsufficientDiskError(
            f"not enough free disk under {parent}: the output needs about "
            f"{(required_bytes + DISK_MARGIN_BYTES) / 1e9:.2f} GB and {available / 1e9:.2f} GB are free; "
            "free some space or choose another output folder"
        )
    staging = parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        retired = parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        output.rename(retired)
        staging.rename(output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(output)
