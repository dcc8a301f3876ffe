"""Measured fidelity of a lossy residual: size on disk, per-tensor relative error, optional KL probe.

Relative error of a tensor: ``|R - decode(encode(R))| / |R|`` (Frobenius norms). The probe compares the
next-token distributions of two models: the instruct model (= base + exact residual) and base + the
decoded residual, both in float32, as the mean KL(exact || lossy) over every position of a prompt set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hf_residual.core.assets import prompt_text
from hf_residual.core.manifest import Manifest
from hf_residual.errors import ConfigError

DEFAULT_PROMPTS = [
    "Write a short poem about the sea.",
    "What is the capital of France? Answer in one word.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits, separated by commas.",
    "Translate 'good morning' into German.",
    "Answer in upper case: what colour is grass?",
    "Summarise the plot of a detective story in one sentence.",
    "Give me a JSON object with keys name and age.",
]


CHUNK = 1 << 20  # elements per float64 dot product of the error sums: the summed values depend on it


@dataclass
class TensorError:
    """One tensor's squared error and squared norm, summed chunk by chunk (chunks of ``CHUNK`` elements
    from the tensor's start, so a streamed tensor sums exactly as a whole one)."""

    err: float = 0.0
    norm: float = 0.0

    def add(self, exact: np.ndarray, approx: np.ndarray) -> None:
        """One chunk: the next ``CHUNK`` elements (fewer at the tensor's end), flat."""
        x = exact.astype(np.float64)
        diff = x - approx
        self.err, self.norm = self.err + float(diff @ diff), self.norm + float(x @ x)


@dataclass
class ErrorSummary:
    """Accumulates per-tensor relative errors while encoding."""

    errors: dict[str, float] = field(default_factory=dict)
    error_power: float = 0.0
    power: float = 0.0

    def add(self, name: str, exact: np.ndarray, approx: np.ndarray) -> None:
        """In chunks of ``CHUNK`` elements, so the float64 temporaries stay small (an embedding is 1e8+)."""
        exact, approx = exact.reshape(-1), approx.reshape(-1)
        tensor = TensorError()
        for at in range(0, exact.size, CHUNK):
            tensor.add(exact[at : at + CHUNK], approx[at : at + CHUNK])
        self.record(name, tensor)

    def record(self, name: str, tensor: TensorError) -> None:
        err, norm = tensor.err, tensor.norm
        self.error_power += err
        self.power += norm
        self.errors[name] = (err / norm) ** 0.5 if norm else (0.0 if err == 0 else float("inf"))

    def summary(self) -> dict:
        values = np.array(list(self.errors.values()) or [0.0])
        worst = max(self.errors, key=self.errors.get) if self.errors else None
        return {
            "mean": float(values.mean()),
            "median": float(np.median(values)),
            "max": float(values.max()),
            "max_tensor": worst,
            "overall": (self.error_power / self.power) ** 0.5 if self.power else 0.0,
        }


def sizes(folder: Path, manifest: Manifest) -> dict:
    """Bytes of the written residual files and the ratio of a bfloat16 residual's size to them."""
    written = sum(p.stat().st_size for p in folder.glob("residual*.safetensors"))
    bf16 = sum(2 * int(np.prod(entry.shape)) for entry in manifest.tensors.values())
    return {"bytes": written, "bf16_bytes": bf16, "ratio_to_bf16": bf16 / written if written else 0.0}


def read_prompts(path: str | Path | None) -> list[str]:
    """The built-in prompt set, or one prompt per non-empty line of a UTF-8 text file."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--probe {path}: no such file; give a text file with one prompt per line")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--probe {path}: the file has no prompts; write one prompt per line")
    return prompts


def _encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    ids = []
    for prompt in prompts:
        text, special = prompt_text(tokenizer, prompt)
        ids.append(tokenizer(text, add_special_tokens=special)["input_ids"])
    return ids


def probe_kl(instruct: Path, deltas: Iterable[tuple[str, np.ndarray]], prompts: list[str]) -> dict:
    """Mean KL between the instruct model and base + decoded residual (``I + decode(R) - R``).

    ``deltas``: ``(name, decode(R) - R)`` per residual tensor, one at a time (``folders._probe_deltas``
    computes them from the model files and the encoded residual: no float32 residual on disk).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(instruct)
    exact_model = AutoModelForCausalLM.from_pretrained(instruct, dtype=torch.float32).eval()
    lossy_model = AutoModelForCausalLM.from_pretrained(instruct, dtype=torch.float32).eval()
    params = dict(lossy_model.named_parameters())
    unmatched = []
    with torch.no_grad():
        for name, delta in deltas:
            if name not in params:
                unmatched.append(name)
                continue
            params[name].add_(torch.from_numpy(delta).reshape(params[name].shape))
    if unmatched:
        raise ConfigError(
            f"--probe: residual tensors not found among the model's parameters ({', '.join(unmatched[:3])}); "
            "the probe cannot run for this architecture (extract without --probe)"
        )
    return mean_kl(exact_model, lossy_model, tokenizer, prompts)


def mean_kl(exact_model, other_model, tokenizer, prompts: list[str]) -> dict:
    """Mean over every prompt position of KL(exact || other) between next-token distributions."""
    import torch

    total, positions = 0.0, 0
    with torch.no_grad():
        for ids in _encode_prompts(tokenizer, prompts):
            inputs = torch.tensor([ids])
            p = torch.log_softmax(exact_model(inputs).logits[0].float(), -1)
            q = torch.log_softmax(other_model(inputs).logits[0].float(), -1)
            total += float((p.exp() * (p - q)).sum())
            positions += len(ids)
    return {"mean_kl": total / max(positions, 1), "prompts": len(prompts), "positions": positions}
