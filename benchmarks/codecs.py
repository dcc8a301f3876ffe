"""Every codec on one model family: size ratio to bfloat16, relative error, next-token KL, time, IF kept.

Two families:

- toy (default): ``hf_residual.toy.build_family`` at a chosen size. Its instruct model is the base plus
  Gaussian noise, so the residual is full-rank noise: a hard case for low-rank codecs, and its random
  models barely react to it (small KL everywhere: read the "KL share" column).
- ``--demo DIR``: the trained family written by ``hf-residual demo -o DIR`` (``DIR/models``,
  ``DIR/results.json`` for profile and seed). Its instruct model really follows format instructions, so
  the table adds strict instruction-following accuracy (the demo's own scoring, on its held-out sets) of
  ``cpt + decoded residual`` and the share of the lossless residual's gain each codec keeps:
  ``IF kept = (IF(cpt + codec) - IF(cpt)) / (IF(cpt + float32 residual) - IF(cpt))``. The KL probe
  then uses the demo's own chat prompts.

Columns: size ratio = bytes of a bfloat16 residual / bytes written; mean rel. error = mean over tensors
of ``|R - decode(R)| / |R|``; KL = mean next-token KL(instruct || base + decoded residual);
KL share = that KL / KL(instruct || base) (0: the codec loses nothing of the residual's effect on the
next-token distribution, 1: as if no residual at all); time = ``hf-residual extract --codec`` wall time
(exact residual + encoding, no probe).

Usage::

    python benchmarks/codecs.py                                   # toy, hidden 256, 4 layers
    hf-residual demo --profile quick -o /tmp/demo && python benchmarks/codecs.py --demo /tmp/demo

``--stream`` measures instead, on a 1.5B-shaped family (Qwen2.5-1.5B's dimensions in a Llama layout,
written with numpy), ``hf-residual port RESIDUAL --to CPT`` side by side from a bfloat16, a bitdelta and
a lowrank residual (``benchmarks/codecs_stream.py``): wall time, peak RSS and the largest temporary
folder seen beside the output or in the system's temporary directory::

    python benchmarks/codecs.py --stream --rank 64 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CODECS = [
    "bfloat16",
    "lowrank:4",
    "lowrank:16",
    "lowrank:32",
    "lowrank:energy=0.9",
    "lowrank:4,embeddings=compress",
    "bitdelta",
    "bitdelta,scale=row",
    "bitdelta,embeddings=compress",
    "bitdelta,scale=row,embeddings=compress",
    "sparse:0.1",
    "sparse:topk=0.1",
    "sparse:topk=0.05,embeddings=compress",
]


class Demo:
    """A demo output folder: its models and the evaluation the demo scores them with."""

    def __init__(self, folder: Path):
        from hf_residual.demo import world
        from hf_residual.demo.profiles import get_profile

        results = folder / "results.json"
        if not results.is_file():
            raise SystemExit(f"{folder}: no results.json; run `hf-residual demo -o {folder}` first")
        data = json.loads(results.read_text())
        self.models = folder / "models"
        self.profile = get_profile(data["profile"])
        self.world = world.build_world(
            data.get("seed", 0), self.profile.n_a, self.profile.n_b, self.profile.holdout,
            self.profile.eval_per_set,
        )  # fmt: skip

    def prompts(self, count: int = 16) -> list[str]:
        items = self.world.eval_a[: count // 2] + self.world.eval_b[: count // 2]
        return [item.messages()[0]["content"] for item in items]

    def instruction_following(self, model_folder: Path) -> float:
        """Strict IF accuracy averaged over the held-out sets A and B, as the demo's report computes it."""
        from transformers import AutoTokenizer

        from hf_residual.demo import evaluate, training

        tok = AutoTokenizer.from_pretrained(self.models / "instruct")  # its chat template, for every model
        model = training.load_model(model_folder)
        scores = [
            evaluate.instruction_following(model, tok, items, self.profile.max_new_tokens).strict
            for items in (self.world.eval_a, self.world.eval_b)
        ]
        return sum(scores) / len(scores)


def _toy(args) -> tuple[Path, Path, Path]:
    from hf_residual.toy import build_family

    root = Path(args.workdir) / f"toy-{args.arch}-h{args.hidden}-l{args.layers}-v{args.vocab}"
    if not (root / "cpt" / "config.json").is_file():
        build_family(
            root, args.arch, "bfloat16", hidden=args.hidden, layers=args.layers, vocab_size=args.vocab
        )
    return root / "base", root / "instruct", root / "cpt"


def _kl_without_residual(base: Path, instruct: Path, prompts: list[str]) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_residual.codecs import fidelity

    tokenizer = AutoTokenizer.from_pretrained(instruct)
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (instruct, base)]
    return fidelity.mean_kl(*models, tokenizer, prompts)["mean_kl"]


def run(args) -> list[dict]:
    from hf_residual import api
    from hf_residual.codecs import fidelity

    demo = Demo(Path(args.demo)) if args.demo else None
    if demo is not None:
        base, instruct = demo.models / "base", demo.models / "instruct"
        cpt = demo.models / f"cpt-base-{args.cpt_label}"
        out = Path(args.workdir) / f"codecs-demo-{demo.profile.name}"
        prompts = demo.prompts()
    else:
        base, instruct, cpt = _toy(args)
        out = Path(args.workdir) / f"codecs-{base.parent.name}"
        prompts = fidelity.read_prompts(None)

    kl_none = _kl_without_residual(base, instruct, prompts)
    started = time.perf_counter()
    exact = api.extract(instruct, base, out / "float32", dtype="float32", overwrite=True, progress=False)
    lossless = {"codec": "float32 (lossless)", "ratio": 0.5, "error": 0.0, "kl": 0.0, "kl_share": 0.0}
    lossless["seconds"] = time.perf_counter() - started
    rows = [{"codec": "none (base, no residual)", "kl": kl_none, "kl_share": 1.0}, lossless]
    if_cpt = gain = None
    if demo is not None:
        if_cpt = demo.instruction_following(cpt)
        rows[0] = {**rows[0], "codec": f"none (KL: base; IF: cpt-base-{args.cpt_label})", "if": if_cpt}
        api.apply(exact.output, cpt, out / "ported-float32", overwrite=True, progress=False)
        lossless["if"] = demo.instruction_following(out / "ported-float32")
        lossless["if_kept"] = 1.0
        gain = lossless["if"] - if_cpt
    for spec in args.codecs:
        folder = out / spec.replace(":", "_").replace(",", "_").replace("=", "-")
        started = time.perf_counter()
        result = api.extract(instruct, base, folder, codec=spec, overwrite=True, progress=False)
        row = {"codec": spec, "seconds": time.perf_counter() - started}
        fid = result.details.get("fidelity")
        if fid:  # a lossy codec
            kl = fidelity.probe_kl(instruct, _deltas(exact.output, folder), prompts)["mean_kl"]
            row.update(ratio=fid["ratio_to_bf16"], error=fid["errors"]["mean"], kl=kl, kl_share=kl / kl_none)
        else:  # bfloat16: the engine's own storage, compared here like a codec
            row.update(ratio=1.0, **_dense_fidelity(instruct, exact.output, folder, prompts, kl_none))
        if demo is not None:
            ported = out / f"ported-{folder.name}"
            api.apply(folder, cpt, ported, overwrite=True, progress=False)
            row["if"] = demo.instruction_following(ported)
            row["if_kept"] = (row["if"] - if_cpt) / gain if gain else float("nan")
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _deltas(exact: Path, folder: Path):
    """``decode(R) - R`` per tensor of a compressed residual, against a float32 residual folder."""
    from hf_residual.codecs.folders import decoded_tensors
    from hf_residual.codecs.store import read_tensor
    from hf_residual.core.checkpoint import open_checkpoint

    exact_tensors = open_checkpoint(exact, prefix="residual").tensors
    for name, values in decoded_tensors(folder):
        yield name, values - read_tensor(exact_tensors[name])


def _dense_fidelity(instruct: Path, exact: Path, folder: Path, prompts: list[str], kl_none: float) -> dict:
    """Relative error and KL of a bfloat16 residual, measured as for a codec."""
    from hf_residual.codecs import fidelity
    from hf_residual.codecs.store import read_tensor
    from hf_residual.core.checkpoint import open_checkpoint

    errors = fidelity.ErrorSummary()
    exact_tensors = open_checkpoint(exact, prefix="residual").tensors
    for name, info in open_checkpoint(folder, prefix="residual").tensors.items():
        errors.add(name, read_tensor(exact_tensors[name]), read_tensor(info))
    kl = _probe_dense(instruct, exact, folder, prompts)
    return {"error": errors.summary()["mean"], "kl": kl, "kl_share": kl / kl_none}


def _probe_dense(instruct: Path, exact: Path, dense: Path, prompts: list[str]) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_residual.codecs import fidelity
    from hf_residual.codecs.store import read_tensor
    from hf_residual.core.checkpoint import open_checkpoint

    exact_model = AutoModelForCausalLM.from_pretrained(instruct, dtype=torch.float32).eval()
    other = AutoModelForCausalLM.from_pretrained(instruct, dtype=torch.float32).eval()
    params = dict(other.named_parameters())
    exact_tensors = open_checkpoint(exact, prefix="residual").tensors
    with torch.no_grad():
        for name, info in open_checkpoint(dense, prefix="residual").tensors.items():
            if name in params:
                delta = read_tensor(info) - read_tensor(exact_tensors[name])
                params[name].add_(torch.from_numpy(delta).reshape(params[name].shape))
    tokenizer = AutoTokenizer.from_pretrained(exact)
    return fidelity.mean_kl(exact_model, other, tokenizer, prompts)["mean_kl"]


COLUMNS = [
    ("codec", "codec", "s"),
    ("size ratio (bf16 / codec)", "ratio", ".2f"),
    ("mean rel. error", "error", ".3g"),
    ("KL (nats)", "kl", ".2e"),
    ("KL share", "kl_share", ".3f"),
    ("time (s)", "seconds", ".2f"),
    ("IF strict", "if", ".3f"),
    ("IF kept", "if_kept", ".0%"),
]


def _line(row: dict) -> str:
    cells = [format(row[key], fmt) if row.get(key) is not None else "-" for _, key, fmt in COLUMNS]
    return "| " + " | ".join(cells) + " |"


def table(rows: list[dict]) -> str:
    header = "| " + " | ".join(title for title, _, _ in COLUMNS) + " |"
    return "\n".join([header, "|" + "---|" * len(COLUMNS), *(_line(row) for row in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", metavar="DIR", help="a folder written by `hf-residual demo -o DIR`")
    parser.add_argument("--cpt-label", default="S", help="with --demo: the CPT snapshot to port to (S, M, L)")
    parser.add_argument("--workdir", default="benchmarks/_work")
    parser.add_argument("--arch", default="llama")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--codecs", nargs="+", default=CODECS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--stream", action="store_true", help="port speed/memory from compressed residuals")
    parser.add_argument("--rank", type=int, default=64, help="with --stream: the lowrank residual's rank")
    parser.add_argument(
        "--repeat", type=int, default=3, help="with --stream: runs of each port (min, median)"
    )
    parser.add_argument(
        "--baseline-src",
        help="with --stream: also port from the compressed residuals with the hf_residual package of this "
        "src folder (another version's checkout), interleaved, for before/after ratios in one run",
    )
    parser.add_argument("--stream-layers", type=int, default=28, help="with --stream: layers of the family")
    args = parser.parse_args()
    if args.stream:
        from codecs_stream import run_stream

        baseline = Path(args.baseline_src).resolve() if args.baseline_src else None
        run_stream(Path(args.workdir), args.rank, args.repeat, args.stream_layers, baseline)
        return
    import torch

    torch.set_num_threads(args.threads)
    rows = run(args)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
