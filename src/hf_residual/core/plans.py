"""Check that checkpoints fit together and turn them into engine jobs for extract, port and apply.

Vocabulary growth: an instruct model may have more embedding rows than its base (chat tokens added,
embeddings resized). Rows the base has get ``instruct - base``; the new rows are taken from the instruct
model as they are (``absolute_rows_from`` in the manifest). The target must have the base's rows.

Integer and bool tensors (``BUFFER_DTYPES``) are buffers, not weights: GPT-2-style ``attn.bias`` /
``masked_bias`` masks, ``position_ids``. They take no part in the residual: ``pair`` and ``check_target``
leave out every name that is integer/bool wherever it appears, ``extract`` stores nothing for them (neither
in the weights nor in the manifest), and ``port`` and ``apply`` copy the target's buffers byte for byte
(``buffer_jobs``): the output is the target's model, so its buffers are the target's. A name that is a
float weight in one model and an integer tensor in another is refused (a quantized checkpoint).
FP8 weights with block scales (``fp8.ScaledInfo``) are weights like any float tensor; an FP8 tensor without
its ``weight_scale_inv`` is refused with the fix (dequantize to bfloat16 first).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hf_residual.core import fp8, methods
from hf_residual.core.checkpoint import Checkpoint
from hf_residual.core.engine import Segment, Source, TensorJob
from hf_residual.core.safetensors_io import FLOAT_DTYPES, OutputTensor, TensorInfo
from hf_residual.errors import IncompatibleModelsError

OUTPUT_DTYPES = ("BF16", "F16", "F32")
BUFFER_DTYPES = ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64")


@dataclass(frozen=True)
class PairedTensor:
    """An instruct tensor and its base counterpart; rows from ``absolute_rows_from`` are new in instruct."""

    name: str
    instruct: TensorInfo
    base: TensorInfo
    absolute_rows_from: int | None = None

    @property
    def base_elements(self) -> int:
        """Elements of the instruct tensor that have a base counterpart."""
        return self.base.numel


def _names_preview(names: set[str]) -> str:
    shown = sorted(names)[:3]
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(shown) + more


def check_same_architecture(a: Checkpoint, b: Checkpoint, a_role: str, b_role: str) -> None:
    if a.model_type and b.model_type and a.model_type != b.model_type:
        raise IncompatibleModelsError(
            f"{a_role} is a {a.model_type!r} model ({a.path}) but {b_role} is a {b.model_type!r} model "
            f"({b.path}); a residual only transfers between models of one architecture and lineage"
        )


def check_same_names(have: set[str], want: set[str], have_role: str, want_role: str) -> None:
    missing = want - have
    extra = have - want
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} tensor(s) of the {want_role} missing from the {have_role} "
                f"({_names_preview(missing)})"
            )
        if extra:
            parts.append(f"{len(extra)} tensor(s) only in the {have_role} ({_names_preview(extra)})")
        raise IncompatibleModelsError(
            "; ".join(parts) + ". Both must be the same architecture with the same weights stored "
            "(tied embeddings store no lm_head.weight: both sides must agree)"
        )


def _check_float(info: TensorInfo, role: str) -> None:
    """A weight (a tensor that takes part in the arithmetic) must be BF16, F16, F32, F64 or scaled FP8."""
    if info.dtype in FLOAT_DTYPES or fp8.is_scaled(info):
        return
    if info.dtype in fp8.FP8_DTYPES:
        raise IncompatibleModelsError(
            f"tensor {info.name!r} of the {role} is {info.dtype} (8-bit floating point, FP8) without its "
            f"block scales ({info.name + '_scale_inv'!r} is missing); hf-residual reads FP8 weights only "
            "through their weight_scale_inv (the layout of FP8 releases such as DeepSeek-V3 and Qwen3-FP8). "
            "Dequantize the model to bfloat16 first (e.g. load it with transformers and save_pretrained in "
            "torch.bfloat16), or use the unquantized release of the model"
        )
    raise IncompatibleModelsError(
        f"tensor {info.name!r} of the {role} is {info.dtype} (integer) where the other models store a "
        "floating-point weight: a quantized checkpoint? Use its BF16/F16/F32 release, or dequantize it first"
    )


def buffer_names(*checkpoints: Checkpoint) -> set[str]:
    """Names that are integer/bool tensors in every one of ``checkpoints`` that has them (not weights)."""
    names: set[str] = set()
    for ckpt in checkpoints:
        names.update(n for n, t in ckpt.tensors.items() if t.dtype in BUFFER_DTYPES)
    return {
        n for n in names if all(c.tensors[n].dtype in BUFFER_DTYPES for c in checkpoints if n in c.tensors)
    }


def buffer_jobs(target: Checkpoint) -> list[TensorJob]:
    """Copy each integer/bool buffer of the target into the output byte for byte (no arithmetic)."""
    return [
        TensorJob(OutputTensor(name, info.dtype, info.shape), (Segment(0, info.numel, plus=Source(info)),))
        for name, info in sorted(target.tensors.items())
        if info.dtype in BUFFER_DTYPES
    ]


def with_buffers(jobs: list[TensorJob], target: Checkpoint) -> list[TensorJob]:
    """``jobs`` and the target's buffers copied through, in name order."""
    return sorted([*jobs, *buffer_jobs(target)], key=lambda job: job.out.name)


def pair(instruct: Checkpoint, base: Checkpoint) -> list[PairedTensor]:
    """Match instruct tensors to base tensors; allow instruct to have extra vocabulary rows."""
    check_same_architecture(instruct, base, "the instruct model", "the base model")
    buffers = buffer_names(instruct, base)
    check_same_names(
        set(instruct.tensors) - buffers, set(base.tensors) - buffers, "instruct model", "base model"
    )
    pairs = []
    for name in sorted(set(base.tensors) - buffers):
        i, b = instruct.tensors[name], base.tensors[name]
        _check_float(i, "instruct model")
        _check_float(b, "base model")
        absolute_from = None
        if i.shape != b.shape:
            grew_rows = (
                len(i.shape) == len(b.shape) >= 1 and i.shape[1:] == b.shape[1:] and i.shape[0] > b.shape[0]
            )
            if not grew_rows:
                raise IncompatibleModelsError(
                    f"shape mismatch for {name!r}: instruct {list(i.shape)} vs base {list(b.shape)}; "
                    "these models do not share an architecture size"
                )
            absolute_from = b.shape[0]
        pairs.append(PairedTensor(name, i, b, absolute_from))
    return pairs


def check_target(
    target: Checkpoint, base_shapes: dict[str, tuple[int, ...]], base_model_type: str | None
) -> None:
    """The target must have exactly the base's tensors and shapes (the base's vocabulary included).

    ``base_shapes`` holds the weights only; the target's integer/bool buffers are left out of the match
    (they are copied through, see ``buffer_jobs``)."""
    if base_model_type and target.model_type and target.model_type != base_model_type:
        raise IncompatibleModelsError(
            f"the target is a {target.model_type!r} model ({target.path}) but the residual's base is a "
            f"{base_model_type!r} model; a residual only transfers within one architecture"
        )
    buffers = buffer_names(target) - set(base_shapes)
    check_same_names(set(target.tensors) - buffers, set(base_shapes), "target model", "base model")
    for name, shape in base_shapes.items():
        info = target.tensors[name]
        _check_float(info, "target model")
        if info.dtype not in OUTPUT_DTYPES and not fp8.is_scaled(info):  # FP8: see fp8_output_jobs
            raise IncompatibleModelsError(
                f"target tensor {name!r} is {info.dtype}; supported: BF16, F16, F32"
            )
        if info.shape != shape:
            vocab_hint = (
                " The target's vocabulary differs from the base's: a target may add vocabulary rows "
                "(tokenizer.add_tokens, resize_token_embeddings) but must keep every row of the base's."
                if info.shape[1:] == shape[1:]
                else ""
            )
            raise IncompatibleModelsError(
                f"shape mismatch for {name!r}: target {list(info.shape)} vs base {list(shape)}.{vocab_hint}"
            )


def _row_elements(shape: tuple[int, ...], rows: int) -> int:
    per_row = 1
    for dim in shape[1:]:
        per_row *= dim
    return rows * per_row


def extract_jobs(pairs: list[PairedTensor], dtype: str) -> list[TensorJob]:
    """``R = I - B`` for base rows; new vocabulary rows copied from instruct.

    A float32 residual of bf16/fp16 weights also counts elements that ``B + R``, rounded to the instruct
    tensor's dtype, would not give back exactly (possible where |I| is far below |B|, or where a base in
    another dtype holds bits the instruct dtype cannot), so the manifest states losslessness as measured,
    whatever the base's dtype.
    """
    jobs = []
    for p in pairs:
        split = p.base_elements
        check = dtype == "F32" and p.instruct.dtype in ("BF16", "F16")
        segments = [
            Segment(
                0,
                split,
                plus=Source(p.instruct),
                minus=Source(p.base),
                roundtrip_of=Source(p.instruct) if check else None,
            )
        ]
        if p.absolute_rows_from is not None:
            segments.append(Segment(split, p.instruct.numel, plus=Source(p.instruct, split)))
        jobs.append(
            TensorJob(OutputTensor(p.name, dtype, p.instruct.shape), tuple(segments), collect_norms=True)
        )
    return jobs


def port_jobs(pairs: list[PairedTensor], target: Checkpoint, alpha: float) -> list[TensorJob]:
    """``T + alpha * (I - B)`` in the target's dtype; new vocabulary rows copied from instruct."""
    jobs = []
    for p in pairs:
        t = target.tensors[p.name]
        split = p.base_elements
        segments = [
            Segment(0, split, plus=Source(p.instruct), minus=Source(p.base), alpha=alpha, addend=Source(t))
        ]
        if p.absolute_rows_from is not None:
            segments.append(Segment(split, p.instruct.numel, plus=Source(p.instruct, split)))
        jobs.append(TensorJob(OutputTensor(p.name, t.dtype, p.instruct.shape), tuple(segments)))
    return jobs


def apply_jobs(
    residual: Checkpoint,
    absolute_rows_from: dict[str, int | None],
    target: Checkpoint,
    alpha: float,
    sha256: dict[str, str] | None = None,
) -> list[TensorJob]:
    """``T + alpha * R`` in the target's dtype; the residual's absolute rows copied as they are.

    ``sha256``: each residual tensor's digest from the manifest; the engine checks it on the bytes it
    reads (over both segments of a tensor with absolute rows) and refuses a damaged residual.
    """
    jobs = []
    for name in sorted(residual.tensors):
        r, t = residual.tensors[name], target.tensors[name]
        rows = absolute_rows_from.get(name)
        split = r.numel if rows is None else _row_elements(r.shape, rows)
        digest = (sha256 or {}).get(name)
        segments = [Segment(0, split, plus=Source(r, sha256=digest), alpha=alpha, addend=Source(t))]
        if rows is not None:
            segments.append(Segment(split, r.numel, plus=Source(r, split, sha256=digest)))
        jobs.append(TensorJob(OutputTensor(name, t.dtype, r.shape), tuple(segments)))
    return jobs


def base_shapes_of_residual(
    residual: Checkpoint, absolute_rows_from: dict[str, int | None]
) -> dict[str, tuple]:
    """Shapes the base (and so the target) must have, given a residual with possibly extra rows."""
    shapes = {}
    for name, info in residual.tensors.items():
        rows = absolute_rows_from.get(name)
        shapes[name] = info.shape if rows is None else (rows, *info.shape[1:])
    return shapes


def fp8_output_jobs(jobs: list, target_tensors: dict[str, TensorInfo], keep_fp8: bool) -> list:
    """Jobs writing the target's FP8 weights: BF16 by default, re-quantized FP8 with ``keep_fp8``.

    A job that copies a target FP8 tensor unchanged (a tensor outside the residual, e.g. a multimodal
    target's vision tower) is, with ``keep_fp8``, a byte copy of the codes and of the scales.
    """
    out = []
    for job in jobs:
        info = target_tensors.get(job.out.name)
        if info is None or not fp8.is_scaled(info):
            out.append(job)
            continue
        if keep_fp8 and _copies_fp8(job, info):
            scale = info.scale
            out.append(TensorJob(OutputTensor(job.out.name, info.dtype, info.shape), job.segments))
            out.append(
                TensorJob(
                    OutputTensor(fp8.scale_name(job.out.name), "F32", scale.shape),
                    (Segment(0, scale.numel, plus=Source(scale)),),
                )
            )
        elif keep_fp8:
            scale = OutputTensor(fp8.scale_name(job.out.name), "F32", info.scale.shape)
            tensor = OutputTensor(job.out.name, info.dtype, info.shape)
            out.append(TensorJob(tensor, job.segments, job.collect_norms, fp8.Quantize(scale, info.block)))
        else:
            out.append(
                TensorJob(OutputTensor(job.out.name, "BF16", job.out.shape), job.segments, job.collect_norms)
            )
    return out


def _copies_fp8(job, info: fp8.ScaledInfo) -> bool:
    """Whether ``job`` writes ``info`` as it is (one segment: plus = the whole tensor, nothing else)."""
    if len(job.segments) != 1:
        return False
    (segment,) = job.segments
    return (
        segment.minus is None
        and segment.addend is None
        and segment.alpha == 1.0
        and segment.plus.info == info
        and segment.plus.start == 0
        and (segment.start, segment.stop) == (0, info.numel)
    )


def with_merge(
    jobs: list[TensorJob],
    alphas: dict[str, float] | None,
    method: methods.Method,
    base: Checkpoint | None = None,
) -> list[TensorJob]:
    """Per-tensor alpha (``alphas``: by name, see ``methods.resolve_alphas``) and the merge method set on
    every residual segment (those with an ``addend``: new vocabulary rows and copies have none).

    ``base``: the base checkpoint for a method that reads it in ``apply`` (ties); ``port`` leaves it None
    (its segments read the base as ``minus``). With no alphas and ``task_arithmetic``, ``jobs`` as they are.
    """
    if not alphas and method.is_default:
        return jobs
    out = []
    for job in jobs:
        name = job.out.name
        segments = []
        for s in job.segments:
            if s.addend is not None:
                base_source = None
                if base is not None and s.minus is None:
                    base_source = Source(base.tensors[name], s.plus.start)
                alpha = (alphas or {}).get(name, s.alpha)
                s = replace(s, alpha=alpha, method=method.for_segment(name, s, base_source))
            segments.append(s)
        out.append(replace(job, segments=tuple(segments)))
    return out
