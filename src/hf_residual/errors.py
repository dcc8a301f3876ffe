"""Error classes: one small tree, each also a builtin so callers can catch either.

Every message names the problem and the fix. The CLI prints ``str(error)`` and exits non-zero;
``--debug`` shows the traceback.
"""

from __future__ import annotations


class ResidualError(Exception):
    """Base class of every error hf-residual raises on purpose."""

    exit_code = 2


class InputNotFoundError(ResidualError, FileNotFoundError):
    """A model, residual or file that was named does not exist."""


class PickledWeightsError(ResidualError, ValueError):
    """A checkpoint holds only pickled weights (``*.bin``/``*.pt``), which are never unpickled."""


class CorruptCheckpointError(ResidualError, ValueError):
    """A safetensors file whose header or layout is broken."""


class IncompatibleModelsError(ResidualError, ValueError):
    """Models that cannot be combined: tensors missing, shapes or architectures that differ."""


class NotADescendantError(IncompatibleModelsError):
    """The target is too far from the base to be one of its descendants."""


class NonFiniteError(ResidualError, ArithmeticError):
    """NaN or Inf in an input, or an overflow in the result's dtype."""


class OutputExistsError(ResidualError, FileExistsError):
    """The output folder exists and ``overwrite`` was not asked for."""


class InsufficientDiskError(ResidualError, OSError):
    """Not enough free disk for the output; checked before anything is written."""


class VerificationError(ResidualError, RuntimeError):
    """Written output did not read back as intended (checksum or header mismatch)."""


class ManifestError(ResidualError, ValueError):
    """A residual folder's manifest is missing, malformed, or from an unknown format version or codec."""


class HubError(ResidualError, RuntimeError):
    """A Hugging Face Hub operation failed; the message says why and what to do."""


class ConfigError(ResidualError, ValueError):
    """A user-supplied configuration (YAML, flags) is invalid."""
