"""The ``--codec`` and ``--probe`` flags of ``hf-residual extract`` and the fidelity lines it prints."""

from __future__ import annotations

import argparse

from hf_residual.codecs.registry import EXAMPLES


def add_codec(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compressed residuals (docs/CODECS.md)")
    group.add_argument(
        "--codec",
        metavar="CODEC",
        help=f"how to store the residual: {EXAMPLES}. float32/bfloat16 equal --dtype. lowrank: truncated SVD "
        "per weight matrix (RANK, or energy=SHARE of |R|^2), also written as a PEFT LoRA adapter; bitdelta: "
        "1 sign bit per element and one scale per matrix (bitdelta,scale=row: one per row); sparse: DARE random drop with rescale "
        "(sparse:DENSITY[,seed=N]) or magnitude top-k (sparse:topk=SHARE). Embeddings, norms and 1-D "
        "tensors stay dense in bfloat16 (embeddings=compress to encode embeddings too). The manifest and "
        "card record the size, ratio to bfloat16 and per-tensor relative errors",
    )
    group.add_argument(
        "--probe",
        nargs="?",
        const=True,
        metavar="FILE",
        help="with a lossy --codec: also measure the mean next-token KL divergence between the instruct "
        "model and base + decoded residual on a built-in prompt set, or on FILE (one prompt per line). "
        "Loads two float32 copies of the model",
    )


def codec_kwargs(args: argparse.Namespace) -> dict:
    if args.probe is not None and args.codec is None:
        from hf_residual.errors import ConfigError

        raise ConfigError("--probe measures a lossy codec: give one with --codec (e.g. --codec lowrank:64)")
    return {"codec": args.codec, "probe": args.probe}


def print_fidelity(result) -> bool:
    """Print what a lossy extraction wrote and measured; False when the residual is not lossy."""
    fidelity = result.details.get("fidelity")
    if not fidelity:
        return False
    errors = fidelity["errors"]
    print(
        f"wrote residual {result.output}: {result.tensors} tensors, codec {result.details['codec']}, "
        f"{fidelity['bytes']} bytes ({fidelity['ratio_to_bf16']:.2f}x smaller than bfloat16)"
    )
    print(
        f"relative error |R - decoded| / |R| per tensor: mean {errors['mean']:.4g}, median "
        f"{errors['median']:.4g}, max {errors['max']:.4g} ({errors['max_tensor']}); overall {errors['overall']:.4g}"
    )
    if "probe" in fidelity:
        probe = fidelity["probe"]
        print(
            f"probe: mean next-token KL(exact || {result.details['codec']}) = {probe['mean_kl']:.4g} nats "
            f"over {probe['positions']} positions of {probe['prompts']} prompts"
        )
    return True
