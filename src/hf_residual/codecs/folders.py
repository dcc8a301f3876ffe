"""Encode a float32 residual folder with a codec, and decode a compressed one back, tensor by tensor.

Both directions hold one tensor in memory at a time. A decoded folder has the layout of a float32
residual (``residual*.safetensors`` + ``residual.json`` with codec float32), which the engine consumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from hf_residual._version import __version__
from hf_residual.codecs import fidelity, peft_adapter, registry
from hf_residual.codecs.base import Codec
from hf_residual.codecs.store import ShardWriter, as_stored, read_tensor, round_bf16, to_bf16_bits
from hf_residual.core.checkpoint import open_checkpoint
from hf_residual.core.manifest import (
    CODECS,
    MANIFEST_NAME,
    WEIGHTS_PREFIX,
    Manifest,
    TensorEntry,
    read_manifest,
)
from hf_residual.core.output import staged_output
from hf_residual.errors import ManifestError

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


def _sha256(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, np.float32).tobytes()).hexdigest()


def encode_folder(dense: Path, out: Path, codec: Codec, max_shard_bytes: int) -> Manifest:
    """Encode the float32 residual in ``dense`` into ``out`` (an empty folder); return the new manifest.

    Checks every matrix shape first (e.g. a rank larger than a matrix) so a bad spec fails before any work.
    """
    manifest = read_manifest(dense)
    if manifest.codec != "float32":
        raise ManifestError(f"{dense}: encoding needs a float32 residual, this one is {manifest.codec}")
    for name, entry in manifest.tensors.items():
        if codec.compresses(name, tuple(entry.shape), entry.absolute_rows_from):
            codec.check_shape(name, tuple(entry.shape))
    tensors = open_checkpoint(dense, prefix=WEIGHTS_PREFIX).tensors
    writer = ShardWriter(out, WEIGHTS_PREFIX, max_shard_bytes)
    entries: dict[str, TensorEntry] = {}
    errors = fidelity.ErrorSummary()
    for name in sorted(manifest.tensors):
        entry = manifest.tensors[name]
        exact = read_tensor(tensors[name])
        encoded = (
            codec.encode(name, exact)
            if codec.compresses(name, exact.shape, entry.absolute_rows_from)
            else None
        )
        if encoded is not None:
            stored = {part: (dtype, as_stored(dtype, arr)) for part, (dtype, arr) in encoded.parts.items()}
            for part, (dtype, arr) in stored.items():
                writer.add(f"{name}.{part}", dtype, arr)
            back = {part: _read_back(dtype, arr) for part, (dtype, arr) in stored.items()}
            approx = codec.decode(exact.shape, back, encoded.params)
            info = {"kind": codec.name, "parts": sorted(stored), **encoded.params}
        else:  # not encoded (embedding, norm, 1-D), or its encoding would not be smaller than bfloat16
            writer.add(name, "BF16", to_bf16_bits(exact))
            approx = round_bf16(exact)
            info = {"kind": "dense", "parts": [], "dtype": "BF16"}
        errors.add(name, exact, approx)
        entries[name] = dataclasses.replace(entry, dtype="F32", sha256=_sha256(approx), codec=info)
        del exact, approx
    writer.close()
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
    _copy_extras(dense, out, skip_readme=True)
    result.write(out)
    return result


def _read_back(dtype: str, stored: np.ndarray) -> np.ndarray:
    """The part as a reader sees it (bfloat16 parts widened to float32)."""
    from hf_residual.codecs.store import from_bf16_bits

    return from_bf16_bits(stored) if dtype == "BF16" else stored


def is_compressed(folder: Path) -> bool:
    return read_manifest(folder).codec not in CODECS


def decoded_tensors(folder: Path, manifest: Manifest | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, float32 residual)`` of a compressed residual folder, one tensor at a time."""
    manifest = manifest or read_manifest(folder)
    codec = registry.from_manifest(manifest.codec_params, manifest.tool_version)
    tensors = open_checkpoint(folder, prefix=WEIGHTS_PREFIX).tensors
    for name in sorted(manifest.tensors):
        entry = manifest.tensors[name]
        info = entry.codec or {}
        if info.get("kind") not in ("dense", codec.name):
            raise ManifestError(
                f"{folder}: tensor {name!r} is stored as {info.get('kind')!r}, unknown to hf-residual "
                f"{__version__}; it was written by hf-residual {manifest.tool_version}: upgrade to at least "
                "that version"
            )
        if info.get("kind") == "dense":
            values = read_tensor(tensors[name])
        else:
            parts = {part: read_tensor(tensors[f"{name}.{part}"]) for part in info.get("parts", [])}
            values = codec.decode(tuple(entry.shape), parts, info)
        if entry.sha256 and _sha256(values) != entry.sha256:
            raise ManifestError(
                f"{folder}: tensor {name!r} decodes to values other than those recorded when it was encoded "
                "(checksum differs): the files are damaged; download the residual again"
            )
        yield name, values


def decode_folder(folder: Path, out: Path, max_shard_bytes: int = 5 * 10**9) -> Manifest:
    """Write the float32 residual of a compressed residual folder into ``out``."""
    manifest = read_manifest(folder)
    writer = ShardWriter(out, WEIGHTS_PREFIX, max_shard_bytes)
    for name, values in decoded_tensors(folder, manifest):
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


@contextmanager
def decoded(folder: Path, near: Path | None = None) -> Iterator[Path]:
    """``folder`` itself for a dense residual; for a compressed one, a temporary decoded copy.

    ``near``: an existing folder to decode into (the output's parent: the float32 copy is large and the
    system's temporary directory may be small); else the system's temporary directory.
    """
    if not is_compressed(folder):
        yield folder
        return
    place = near if near is not None and near.is_dir() else None
    with tempfile.TemporaryDirectory(prefix=".hf-residual-decoded-", dir=place) as tmp:
        decode_folder(folder, Path(tmp))
        yield Path(tmp)


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
    dense: Path,
    output: Path,
    codec: Codec,
    *,
    overwrite: bool,
    max_shard_bytes: int,
    render_card: Callable[[Manifest], str],
    probe: bool | str | None = None,
    instruct: Path | None = None,
) -> Manifest:
    """Encode ``dense`` into ``output`` (staged, renamed when complete), with fidelity and a card.

    ``probe``: True for the built-in prompts, or a prompt file; needs ``instruct`` (the instruct model).
    """
    prompts = fidelity.read_prompts(None if probe is True else probe) if probe else None
    exact_bytes = sum(p.stat().st_size for p in dense.glob(f"{WEIGHTS_PREFIX}*.safetensors"))
    with staged_output(output, overwrite=overwrite, required_bytes=exact_bytes) as staging:
        manifest = encode_folder(dense, staging, codec, max_shard_bytes)
        if prompts is not None:
            manifest.fidelity["probe"] = fidelity.probe_kl(instruct, dense, decoded_tensors(staging), prompts)
        manifest.note += _fidelity_text(manifest)
        manifest.write(staging)
        (staging / "README.md").write_text(render_card(manifest))
    return manifest
