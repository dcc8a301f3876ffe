"""Encode an exact residual with a codec, tensor by tensor; decode a compressed one (explicit export).

Encoding takes the exact float32 residual one tensor at a time (``exact.exact_tensors``, computed from
the model files: no float32 folder), writes each tensor's parts with a sha256 per part, and measures
fidelity: in chunks (``encode_stream``) except for the codecs that need a whole matrix (lowrank, top-k).
``apply``/``port`` never decode to disk: they read compressed residuals in the stream (``stream``);
``decoded_tensors``/``decode_folder`` remain for the probe, tests and an explicit export.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from hf_residual.codecs import encode_stream, fidelity, peft_adapter, stream
from hf_residual.codecs.base import Codec
from hf_residual.codecs.store import ShardWriter, as_stored, from_bf16_bits, read_tensor, to_bf16_bits
from hf_residual.codecs.stream import sha256_of
from hf_residual.core.checkpoint import Checkpoint, open_checkpoint
from hf_residual.core.jobs import is_decoded
from hf_residual.core.manifest import (
    CODECS,
    MANIFEST_NAME,
    WEIGHTS_PREFIX,
    Manifest,
    TensorEntry,
    read_manifest,
)
from hf_residual.core.output import staged_output
from hf_residual.core.writer import Files
from hf_residual.errors import ManifestError, VerificationError

_WEIGHT_FILES = (MANIFEST_NAME, "README.md", peft_adapter.CONFIG_NAME, peft_adapter.WEIGHTS_NAME)


def _copy_extras(source: Path, destination: Path, skip_readme: bool) -> None:
    """Copy tokenizer, configs and other small files; not weights, manifest or adapter."""
    for path in source.iterdir():
        if (
            path.is_file()
            and not path.name.startswith((WEIGHTS_PREFIX + ".", WEIGHTS_PREFIX + "-", "."))
            and path.name not in _WEIGHT_FILES
        ):
            shutil.copy2(path, destination / path.name)
    if not skip_readme and (source / "README.md").is_file():
        shutil.copy2(source / "README.md", destination / "README.md")


def check_shapes(codec: Codec, manifest: Manifest) -> None:
    """Every matrix's shape against the codec (e.g. a rank larger than a matrix), before any work."""
    for name, entry in manifest.tensors.items():
        if codec.compresses(name, tuple(entry.shape), entry.absolute_rows_from):
            codec.check_shape(name, tuple(entry.shape))


def encode_tensors(
    exact: Iterable[encode_stream.Source], manifest: Manifest, out: Path, codec: Codec, max_shard_bytes: int
) -> Manifest:
    """Encode the exact float32 residual, given one tensor at a time, into ``out``; return its manifest.

    ``manifest``: the exact residual's (shapes, norms, samples); ``exact`` yields its tensors, which each
    encoder computes whole or in chunks (``encode_stream``: dense, bitdelta and DARE tensors never whole).
    Each stored part's sha256 is recorded (``part_sha256``; a dense tensor's ``stored_sha256``) for the
    stream readers to check (``stream``); ``sha256`` stays the digest of the decoded float32 tensor as
    earlier versions (without part digests) computed it, so they can still read the residual. A source's
    norms (measured as it is computed) replace the manifest's.
    """
    check_shapes(codec, manifest)
    writer = ShardWriter(out, WEIGHTS_PREFIX, max_shard_bytes)
    entries: dict[str, TensorEntry] = {}
    errors = fidelity.ErrorSummary()
    for source in exact:
        name, entry = source.name, manifest.tensors[source.name]
        chosen = codec if codec.compresses(name, source.shape, entry.absolute_rows_from) else None
        if encode_stream.streams(chosen):
            info, legacy = encode_stream.encode(source, chosen, writer, errors)
        else:
            info, legacy = _encode_whole(source.values(), name, chosen, writer, errors)
        if source.residual_norm is not None:
            entry = dataclasses.replace(entry, base_norm=source.base_norm, residual_norm=source.residual_norm)
        entries[name] = dataclasses.replace(entry, dtype="F32", sha256=legacy, codec=info)
    writer.close()
    if entries.keys() != manifest.tensors.keys():  # pragma: no cover - the caller yields every tensor
        raise RuntimeError("encoding did not see every tensor of the residual")
    result = dataclasses.replace(
        manifest,
        codec=codec.name,
        codec_params=codec.describe(),
        tensors=entries,
        note=codec.note(),
        inexact_elements=0,
    )
    result.fidelity = {"errors": errors.summary(), **fidelity.sizes(out, manifest)}
    if codec.name == "lowrank":
        written = open_checkpoint(out, prefix=WEIGHTS_PREFIX).tensors
        result.codec_params["peft_adapter"] = peft_adapter.write(out, result, written)
    return result


def _encode_whole(
    values: np.ndarray, name: str, codec: Codec | None, writer: ShardWriter, errors: fidelity.ErrorSummary
) -> tuple[dict, str]:
    """One tensor encoded whole (lowrank's SVD, top-k's global selection); stored dense in bfloat16 when
    ``codec`` is None or declines it (a lowrank that would not be smaller). Returns its ``codec`` entry
    and the sha256 of its decoded float32 values. Also the reference the streamed encoders equal."""
    encoded = codec.encode(name, values) if codec is not None else None
    if encoded is None:
        bits = to_bf16_bits(values)
        writer.add(name, "BF16", bits)
        approx = from_bf16_bits(bits)
        errors.add(name, values, approx)
        info = {"kind": "dense", "parts": [], "dtype": "BF16", "stored_sha256": sha256_of(bits)}
        return info, sha256_of(approx)
    stored = {part: (dtype, as_stored(dtype, arr)) for part, (dtype, arr) in encoded.parts.items()}
    for part, (dtype, arr) in stored.items():
        writer.add(f"{name}.{part}", dtype, arr)
    back = {part: _read_back(dtype, arr) for part, (dtype, arr) in stored.items()}
    approx = codec.decode(values.shape, back, encoded.params)
    legacy = codec.legacy_decode(values.shape, back, encoded.params, approx)
    errors.add(name, values, approx)
    info = {
        "kind": codec.name,
        "parts": sorted(stored),
        **encoded.params,
        "part_sha256": {part: sha256_of(arr) for part, (_, arr) in sorted(stored.items())},
    }
    return info, sha256_of(legacy)


def encode_folder(dense: Path, out: Path, codec: Codec, max_shard_bytes: int) -> Manifest:
    """Encode the float32 residual folder ``dense`` into ``out`` (an empty folder); return the new manifest."""
    manifest = read_manifest(dense)
    if manifest.codec != "float32":
        raise ManifestError(f"{dense}: encoding needs a float32 residual, this one is {manifest.codec}")
    check_shapes(codec, manifest)
    tensors = open_checkpoint(dense, prefix=WEIGHTS_PREFIX).tensors
    exact = (encode_stream.ArrayTensor(name, read_tensor(tensors[name])) for name in sorted(manifest.tensors))
    result = encode_tensors(exact, manifest, out, codec, max_shard_bytes)
    _copy_extras(dense, out, skip_readme=True)
    result.write(out)
    return result


def _read_back(dtype: str, stored: np.ndarray) -> np.ndarray:
    """The part as a reader sees it (bfloat16 parts widened to float32)."""
    return from_bf16_bits(stored) if dtype == "BF16" else stored


def is_compressed(folder: Path) -> bool:
    return read_manifest(folder).codec not in CODECS


def decoded_tensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, float32 residual)`` of a compressed residual folder, one tensor at a time.

    The values ``apply`` adds, read by the same block readers (``stream``) over the whole tensor, with the
    same checks: a damaged part raises ``VerificationError``.
    """
    manifest, checkpoint = stream.open_residual(folder)
    files = Files()
    try:
        for name in sorted(manifest.tensors):
            yield name, _decode_one(manifest, checkpoint, name, files)
    finally:
        files.close()


def _decode_one(manifest: Manifest, checkpoint: Checkpoint, name: str, files: Files) -> np.ndarray:
    info = checkpoint.tensors[name]
    if is_decoded(info):
        values = np.empty(info.numel, np.float32)
        reader = info.decoder.open(files.fd)
        reader.read(0, info.numel, values)
        reader.finish()
        return values.reshape(info.shape)
    values = read_tensor(info)
    stored = to_bf16_bits(values) if info.dtype == "BF16" else values
    if sha256_of(stored) != manifest.tensors[name].sha256:
        raise VerificationError(
            f"{checkpoint.path}: tensor {name!r} does not match the sha256 recorded for it in the manifest: "
            f"the residual is damaged. {stream.FIX}"
        )
    return values


def decode_folder(folder: Path, out: Path, max_shard_bytes: int = 5 * 10**9) -> Manifest:
    """Write the float32 residual of a compressed residual folder into ``out`` (an explicit export:
    ``apply`` and ``port`` read compressed residuals in the stream and never call this)."""
    manifest = read_manifest(folder)
    writer = ShardWriter(out, WEIGHTS_PREFIX, max_shard_bytes)
    for name, values in decoded_tensors(folder):
        writer.add(name, "F32", values)
    writer.close()
    dense = dataclasses.replace(
        manifest,
        codec="float32",
        note=f"decoded from codec {manifest.codec_params.get('spec', manifest.codec)}",
    )
    dense.inexact_elements = -1  # not the exact residual: never claims to be lossless
    _copy_extras(folder, out, skip_readme=False)
    dense.write(out)
    return dense


def _fidelity_text(manifest: Manifest) -> str:
    f = manifest.fidelity
    text = (
        f" Measured: {f['ratio_to_bf16']:.2f}x smaller than a bfloat16 residual ({f['bytes']} bytes), "
        f"relative error |R - decoded| / |R| mean {f['errors']['mean']:.3g}, overall {f['errors']['overall']:.3g}"
    )
    if "probe" in f:
        text += f", mean next-token KL to the exact residual {f['probe']['mean_kl']:.3g} nats"
    adapter = manifest.codec_params.get("peft_adapter") or {}
    if adapter.get("written"):
        text += (
            ". PEFT: `PeftModel.from_pretrained(target, THIS_REPO)` applies the matrices and embeddings at "
            "load time (1-D residuals such as norms are not in the adapter; `hf-residual apply` applies all)"
        )
    return text + "."


def encode_into(
    exact: Callable[[], Iterator[encode_stream.Source]],
    manifest: Manifest,
    output: Path,
    codec: Codec,
    *,
    overwrite: bool,
    max_shard_bytes: int,
    finish: Callable[[Path], None],
    render_card: Callable[[Manifest], str],
    probe: bool | str | None = None,
    instruct: Path | None = None,
) -> Manifest:
    """Encode the exact residual into ``output`` (staged, renamed when complete), with fidelity and a card.

    ``exact()``: a fresh iterator over the exact float32 residual's tensors (``exact.exact_tensors``),
    called once to encode and once more for the probe: no float32 copy is written. ``manifest``: the
    exact residual's. ``finish(staging)`` copies the tokenizer and configs. ``probe``: True for the
    built-in prompts, or a prompt file; needs ``instruct`` (the instruct model).
    """
    check_shapes(codec, manifest)  # before any work or any folder
    prompts = fidelity.read_prompts(None if probe is True else probe) if probe else None
    bf16_bytes = sum(2 * int(np.prod(entry.shape)) for entry in manifest.tensors.values())
    with staged_output(output, overwrite=overwrite, required_bytes=bf16_bytes) as staging:
        result = encode_tensors(exact(), manifest, staging, codec, max_shard_bytes)
        finish(staging)
        result.write(staging)  # the stream readers of the probe read the manifest
        if prompts is not None:  # the exact residual computed again, beside the decoded one
            deltas = _probe_deltas(exact(), staging)
            result.fidelity["probe"] = fidelity.probe_kl(instruct, deltas, prompts)
        result.note += _fidelity_text(result)
        result.write(staging)
        (staging / "README.md").write_text(render_card(result))
    return result


def _probe_deltas(exact: Iterable[encode_stream.Source], encoded: Path) -> Iterator[tuple[str, np.ndarray]]:
    """``decode(encode(R)) - R`` per tensor: the exact values computed again (whole: the probe's models
    hold the whole model twice anyway), the encoded ones decoded."""
    manifest, checkpoint = stream.open_residual(encoded)
    files = Files()
    try:
        for source in exact:
            yield source.name, _decode_one(manifest, checkpoint, source.name, files) - source.values()
    finally:
        files.close()
