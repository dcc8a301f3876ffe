"""Fused block kernels compiled with numba: one pass per block instead of a dozen numpy passes.

Why: on this CPU the arithmetic, not the disk, bounds the engine. numpy needs about 13 passes over a block
(decode three inputs, subtract, add, check, six integer steps to round to bfloat16); a fused loop that
LLVM vectorises does it in one, about 3x faster, and gives the same bits (tests compare both paths).

Stored dtypes travel as numpy views: bfloat16 as ``uint16``, float16 as ``int16`` (its bits), float32 as
``float32``. Each kernel returns the largest ``|x|`` of the float32 results as a bit pattern, so the caller
finds NaN, Inf and overflow of the output dtype with one comparison.

Loaded on first use: the kernels (``port_block``, ``apply_block``, ``copy_block``, ``dequant_block``,
``signs_block`` for bitdelta, in ``fused_jit``) and ``AVAILABLE`` are looked up through this module's ``__getattr__``, which imports numba
and loads the cached machine code the first time the engine asks for one. Importing numba and its first
dispatch cost about 0.5-1 s; ``hf-residual --help``, argument errors and anything that fails before the
engine runs never pay it (tests/test_startup.py). If numba cannot be imported, ``AVAILABLE`` is False and
the engine uses its numpy path.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

VIEW_DTYPES = {"BF16": np.uint16, "F16": np.int16, "F32": np.float32}
KERNELS = ("port_block", "apply_block", "copy_block", "dequant_block", "signs_block")

_lock = threading.Lock()


def __getattr__(name: str):
    if name == "AVAILABLE" or name in KERNELS:
        if load() or name == "AVAILABLE":
            return globals()[name]
        raise AttributeError(f"{__name__}.{name} is not available: numba could not be imported")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load() -> bool:
    """Import numba and the kernels once (thread-safe), ready to run; return whether they are available."""
    with _lock:
        if "AVAILABLE" not in globals():
            try:
                with _scipy_deferred():
                    from hf_residual.core import fused_jit

                    # The first call of any jitted function loads numba's registries; do it here.
                    fused_jit.copy_block(np.zeros(1, np.float32), np.zeros(1, np.float32))
            except ImportError:  # pragma: no cover - numba is a dependency; this keeps odd platforms working
                globals()["AVAILABLE"] = False
            else:
                globals().update({name: getattr(fused_jit, name) for name in KERNELS})
                globals()["AVAILABLE"] = True
    return globals()["AVAILABLE"]


@contextmanager
def _scipy_deferred() -> Iterator[None]:
    """Keep numba's first dispatch from importing scipy (about 0.3 s) when nothing has imported it yet.

    numba's first dispatch imports all its implementation registries; ``numba.np.arraymath`` imports scipy
    there only to set ``_HAVE_BLAS`` (whether ``np.dot``-style inner products may call BLAS). These kernels
    use no BLAS. So while that registry loads, ``import scipy`` fails (``sys.modules`` entry None), and
    afterwards ``_HAVE_BLAS`` is set to whether scipy is installed, as numba would have found. Skipped when
    scipy is already imported (then it costs nothing) or numba's registries are already loaded.
    """
    if "scipy" in sys.modules or "numba.np.arraymath" in sys.modules:
        yield
        return
    sys.modules["scipy"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if "scipy" in sys.modules and sys.modules["scipy"] is None:
            del sys.modules["scipy"]
        arraymath = sys.modules.get("numba.np.arraymath")
        if arraymath is not None and hasattr(arraymath, "_HAVE_BLAS"):
            arraymath._HAVE_BLAS = importlib.util.find_spec("scipy") is not None
