"""FP8 checkpoints with block scales (DeepSeek-V3/R1, Qwen3-*-FP8), and a clear refusal of other quantizations.

The published layout: ``config.json`` has ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
"weight_block_size": [128, 128], ...}``; each quantized weight is a 2-D ``F8_E4M3`` ``[rows, cols]`` tensor
with an ``F32`` ``<name>_scale_inv`` (``...weight`` -> ``...weight_scale_inv``) of shape
``[ceil(rows / 128), ceil(cols / 128)]`` beside it. The value of element ``(r, c)`` is
``fp8(r, c) * scale[r // 128, c // 128]``, computed in float32 (one rounding, as torch does it).

How it fits the engine: ``open_checkpoint`` replaces each such weight's ``TensorInfo`` by a ``ScaledInfo``
(the same tensor, plus its scale tensor and block size) and leaves the scale tensors out of the
checkpoint's tensors: they are consumed, never paired as weights. ``kernels.decode`` then reads the FP8
bytes of any element range and multiplies by the scales (``ScaleTable.apply``), so extract, port, apply and
the lineage sample read FP8 like any other float tensor, a block at a time. An F8 tensor without its scale
stays a plain F8 tensor and is refused by ``plans`` with the fix.

Output (``plans.fp8_output_jobs``): a weight the target stores in FP8 is written as BF16 by default (and the
output's ``config.json`` loses its ``quantization_config``); with ``keep_fp8`` it is re-quantized with the
target's block size and format (``Quantize``): per block ``scale = amax / max_finite`` (``1.0`` for an
all-zero block), values ``x / scale`` rounded to nearest even and saturated, the scale written as F32
``<name>_scale_inv`` beside the weight, so the output has the target's tensors, dtypes and scale shapes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hf_residual.core.safetensors_io import OutputTensor, TensorInfo
from hf_residual.errors import IncompatibleModelsError

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)
FORMATS = {"e4m3": "F8_E4M3", "e5m2": "F8_E5M2"}

# quant_method values of other formats -> what they are, for the refusal.
_OTHER_METHODS = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "bitsandbytes": "bitsandbytes",
    "bitsandbytes_4bit": "bitsandbytes",
    "bitsandbytes_8bit": "bitsandbytes",
    "aqlm": "AQLM",
    "quanto": "Quanto",
    "hqq": "HQQ",
    "eetq": "EETQ",
    "exl2": "EXL2",
    "compressed-tensors": "compressed-tensors",
    "fbgemm_fp8": "FBGEMM FP8 (per-channel scales)",
    "torchao": "torchao",
    "higgs": "HIGGS",
    "vptq": "VPTQ",
    "spqr": "SpQR",
    "bitnet": "BitNet",
    "mxfp4": "MXFP4",
}
# Tensor name endings that only quantized checkpoints have.
_QUANTIZED_NAMES = {
    ".qweight": "GPTQ/AWQ",
    ".qzeros": "GPTQ/AWQ",
    ".g_idx": "GPTQ",
    ".scales": "GPTQ/AWQ",
    ".SCB": "bitsandbytes (8-bit)",
    ".absmax": "bitsandbytes (4-bit)",
    ".quant_map": "bitsandbytes (4-bit)",
    ".quant_state.bitsandbytes__nf4": "bitsandbytes (4-bit)",
    ".quant_state.bitsandbytes__fp4": "bitsandbytes (4-bit)",
}
_FIX = (
    "hf-residual reads BF16/F16/F32 weights, and FP8 with block scales (quant_method 'fp8'). Use the "
    "model's unquantized release (the repo the quantization was made from), or dequantize it first "
    "(load it with transformers and save_pretrained in torch.bfloat16)"
)


def _values(dtype: str) -> np.ndarray:
    """float32 value of each of the 256 codes of an FP8 format (NaN codes as NaN)."""
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    ebits, mbits, bias = (4, 3, 7) if dtype == "F8_E4M3" else (5, 2, 15)
    exponent = (codes >> mbits) & ((1 << ebits) - 1)
    mantissa = codes & ((1 << mbits) - 1)
    normal = (1 + mantissa / (1 << mbits)) * np.exp2(exponent - bias)
    subnormal = (mantissa / (1 << mbits)) * np.exp2(1 - bias)
    values = sign * np.where(exponent == 0, subnormal, normal)
    if dtype == "F8_E4M3":  # e4m3fn: no infinities, S.1111.111 is NaN
        values[(codes & 0x7F) == 0x7F] = np.nan
    else:  # e5m2: IEEE-like, exponent all ones is Inf (mantissa 0) or NaN
        top = exponent == (1 << ebits) - 1
        values[top] = np.where(mantissa[top] == 0, sign[top] * np.inf, np.nan)
    return values.astype(np.float32)


DECODE = {dtype: _values(dtype) for dtype in FP8_DTYPES}
# Largest finite positive code of each format (codes 0..MAX_CODE are ascending, finite values).
MAX_CODE = {"F8_E4M3": 0x7E, "F8_E5M2": 0x7B}
MAX_FINITE = {dtype: float(DECODE[dtype][MAX_CODE[dtype]]) for dtype in FP8_DTYPES}  # 448, 57344
# Midpoints between consecutive positive finite values (exact in float32: one bit more than FP8 has).
_MIDPOINTS = {
    dtype: ((DECODE[dtype][: MAX_CODE[dtype]] + DECODE[dtype][1 : MAX_CODE[dtype] + 1]) / 2).astype(
        np.float32
    )
    for dtype in FP8_DTYPES
}


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """FP8 codes (uint8) of finite float32 ``values``: round to nearest even, saturate at the largest finite."""
    mids = _MIDPOINTS[dtype]
    magnitude = np.abs(values)
    code = np.searchsorted(mids, magnitude, side="left")  # midpoints strictly below: the lower neighbour
    inside = np.minimum(code, mids.size - 1)
    tie = (code < mids.size) & (mids[inside] == magnitude) & (code % 2 == 1)
    code += tie  # a tie goes to the even code (mantissa's last bit 0)
    code = code.astype(np.uint8)
    code |= np.signbit(values).astype(np.uint8) << 7
    return code


@dataclass(frozen=True)
class ScaledInfo(TensorInfo):
    """A 2-D FP8 weight whose values are its codes times ``scale[r // block[0], c // block[1]]``."""

    scale: TensorInfo
    block: tuple[int, int]


def is_scaled(info: TensorInfo) -> bool:
    return isinstance(info, ScaledInfo)


class ScaleTable:
    """One scale tensor, read once and expanded along columns: ``rows[rb]`` has one scale per column."""

    def __init__(self, info: ScaledInfo, pread_into) -> None:
        scale = np.empty(info.scale.numel, np.float32)
        fd = os.open(info.scale.file, os.O_RDONLY)  # the scale may sit in another shard than its weight
        try:
            pread_into(fd, memoryview(scale).cast("B"), info.scale.offset)
        finally:
            os.close(fd)
        scale = scale.reshape(info.scale.shape)
        self.cols = info.shape[1]
        self.block_rows = info.block[0]
        self.rows = np.repeat(scale, info.block[1], axis=1)[:, : self.cols].copy()

    def apply(self, start: int, values: np.ndarray) -> None:
        """``values`` hold elements ``start:start+len(values)`` (row-major): multiply each by its scale."""
        cols, rows, block = self.cols, self.rows, self.block_rows
        count = values.size
        row, col = divmod(start, cols)
        done = 0
        if col:  # the end of a row begun in an earlier block
            n = min(cols - col, count)
            values[:n] *= rows[row // block, col : col + n]
            done, row = n, row + 1
        while count - done >= cols:  # whole rows, a run of rows sharing one row of scales at a time
            n = min((count - done) // cols, (row // block + 1) * block - row)
            values[done : done + n * cols].reshape(n, cols).__imul__(rows[row // block])
            done, row = done + n * cols, row + n
        if done < count:  # the start of a row the next block ends
            values[done:] *= rows[row // block, : count - done]


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def quant_method(config: dict) -> str | None:
    quant = config.get("quantization_config") or config.get("text_config", {}).get("quantization_config")
    if not isinstance(quant, dict):
        return None
    method = quant.get("quant_method")
    return str(method).lower() if method is not None else None


def block_size(config: dict) -> tuple[int, int]:
    quant = config.get("quantization_config") or {}
    block = quant.get("weight_block_size") or DEFAULT_BLOCK
    if not (
        isinstance(block, list | tuple)
        and len(block) == 2
        and all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise IncompatibleModelsError(
            f"quantization_config.weight_block_size is {block!r}; FP8 checkpoints with block scales have two "
            "positive integers there, e.g. [128, 128]"
        )
    return (block[0], block[1])


def refuse_other_quantization(folder: Path, config: dict, names) -> None:
    """Refuse a checkpoint quantized in a format other than FP8 with block scales, naming the format."""
    method = quant_method(config)
    if method is not None and method != "fp8":
        kind = _OTHER_METHODS.get(method, method)
        raise IncompatibleModelsError(
            f"{folder} is a {kind}-quantized checkpoint (config.json quantization_config.quant_method "
            f"{method!r}); {_FIX}"
        )
    if method == "fp8":
        quant = config.get("quantization_config") or {}
        fmt = str(quant.get("fmt", "e4m3")).lower()
        if fmt not in FORMATS or quant.get("weight_block_size") is None:
            raise IncompatibleModelsError(
                f"{folder}: FP8 checkpoint without block scales (quantization_config {json.dumps(quant)}); "
                f"hf-residual reads FP8 with block scales (fmt e4m3 or e5m2, weight_block_size). {_FIX}"
            )
    for name in names:
        for ending, kind in _QUANTIZED_NAMES.items():
            if name.endswith(ending):
                raise IncompatibleModelsError(
                    f"{folder} looks like a {kind}-quantized checkpoint (it has a tensor {name!r}); {_FIX}"
                )


def gguf_message(folder: Path, files: list[str]) -> str:
    return (
        f"{folder}: only GGUF files found ({', '.join(files[:3])}); GGUF is llama.cpp's quantized format and "
        "hf-residual reads safetensors. Use the model's safetensors release (the repo the GGUF was made from)"
    )


def attach_scales(folder: Path, tensors: dict[str, TensorInfo], config: dict) -> dict[str, TensorInfo]:
    """Each FP8 weight with a ``_scale_inv`` beside it becomes a ``ScaledInfo``; the scales leave the dict."""
    scaled = [n for n, t in tensors.items() if t.dtype in FP8_DTYPES and scale_name(n) in tensors]
    if not scaled:
        return tensors
    block = block_size(config)
    out = dict(tensors)
    for name in scaled:
        info, scale = tensors[name], tensors[scale_name(name)]
        want = (
            tuple(math.ceil(d / b) for d, b in zip(info.shape, block, strict=True))
            if len(info.shape) == 2
            else None
        )
        if scale.dtype != "F32" or want is None or scale.shape != want:
            raise IncompatibleModelsError(
                f"{folder}: FP8 weight {name!r} {list(info.shape)} has scale {scale_name(name)!r} "
                f"{scale.dtype} {list(scale.shape)}; with blocks {list(block)} the scale of a 2-D weight is "
                f"F32 {list(want) if want else '[ceil(rows/block), ceil(cols/block)]'}: the checkpoint is "
                "damaged or in a layout hf-residual does not read"
            )
        out[name] = ScaledInfo(info.name, info.dtype, info.shape, info.file, info.offset, scale, block)
        del out[scale_name(name)]
    return out


@dataclass(frozen=True)
class Quantize:
    """Write a job's result as FP8 (the job's dtype) with block scales, the scales as ``scale``."""

    scale: OutputTensor
    block: tuple[int, int]


def has_fp8(tensors: dict[str, TensorInfo]) -> bool:
    return any(is_scaled(info) for info in tensors.values())


def check_keep_fp8(target_tensors: dict[str, TensorInfo], keep_fp8: bool, target: Path) -> None:
    from hf_residual.errors import ConfigError

    if keep_fp8 and not has_fp8(target_tensors):
        raise ConfigError(
            f"--keep-fp8: the target ({target}) has no FP8 weights with block scales to keep; the output "
            "has the target's dtypes already. Leave out --keep-fp8"
        )


def output_config(config: dict, target_tensors: dict[str, TensorInfo], keep_fp8: bool) -> dict:
    """The output's config: without ``quantization_config`` when the target's FP8 weights became BF16."""
    if keep_fp8 or not has_fp8(target_tensors):
        return config
    config = dict(config)
    config.pop("quantization_config", None)
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = {k: v for k, v in config["text_config"].items() if k != "quantization_config"}
    return config


def card_note(target_tensors: dict[str, TensorInfo], keep_fp8: bool) -> str:
    """What the card says about FP8 (empty when the target has no FP8 weights)."""
    count = sum(is_scaled(info) for info in target_tensors.values())
    if not count:
        return ""
    if keep_fp8:
        return (
            f"\n## FP8\n\nThe target stores {count} weights in FP8 with block scales; so does this model "
            "(`--keep-fp8`): each was computed in float32 from the dequantized inputs and re-quantized with "
            "the target's block size (scale = max |x| of the block / largest FP8 value, written as "
            "`weight_scale_inv`). `config.json` keeps the target's `quantization_config`.\n"
        )
    return (
        f"\n## FP8\n\nThe target stores {count} weights in FP8 with block scales. They were dequantized, "
        "computed in float32 and written in bfloat16; the `quantization_config` block was removed from "
        "`config.json`, so this model loads as an ordinary bfloat16 model (`--keep-fp8` keeps FP8).\n"
    )
