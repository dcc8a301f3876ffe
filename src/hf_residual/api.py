"""The Python API, kept for compatibility: ``from hf_residual import api`` then ``api.port(...)``.

The operations live in ``hf_residual.ops`` (one module each); this module only re-exports them.
"""

from hf_residual.ops.apply import apply
from hf_residual.ops.common import Result
from hf_residual.ops.extract import extract
from hf_residual.ops.inspect import Summary, inspect
from hf_residual.ops.options import parse_size
from hf_residual.ops.port import port
from hf_residual.ops.recipe import Recipe

__all__ = ["Recipe", "Result", "Summary", "apply", "extract", "inspect", "parse_size", "port"]
