"""Padding waste and real tokens per second: random dynamic padding, length-grouped padding, packing.

Documents have news-like lengths (log-normal, mean about 650 tokens, clipped to 156-6981, as measured on
a Fundus news sample). Padding strategies batch ``--batch-docs`` documents and pad to the longest
(documents cut at ``--seq-len``); length grouping sorts mega-batches of 50 batches by length first
(as transformers' ``group_by_length``); packing is hf-residual's path: TRL ``pack_dataset`` (bfd_split)
into rows of ``--seq-len`` with the padding-free collator (per-document attention from position ids).

Columns: waste = padded (or unfilled row) tokens / tokens computed, over all documents; real tok/s =
non-padding tokens trained per second (forward + backward, tiny Llama, CPU unless CUDA is present),
measured on the first ``--measure-tokens`` real tokens of each strategy; ratio = tok/s / random's.

Usage::

    python benchmarks/packing.py                       # 2000 documents, seq len 2048, hidden 64
    python benchmarks/packing.py --seq-len 4096 --attention sdpa --hidden 256
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def news_lengths(n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    sigma = 0.75
    mu = np.log(650) - sigma**2 / 2  # mean of the log-normal = 650
    return np.clip(rng.lognormal(mu, sigma, n), 156, 6981).astype(int).tolist()


def padded_batches(lengths: list[int], batch: int, seq_len: int, grouped: bool, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)).tolist()
    if grouped:
        mega = batch * 50
        order = [
            i
            for s in range(0, len(order), mega)
            for i in sorted(order[s : s + mega], key=lambda i: -lengths[i])
        ]
    return [[min(lengths[i], seq_len) for i in order[s : s + batch]] for s in range(0, len(order), batch)]


def model_for(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=320, hidden_size=args.hidden, intermediate_size=args.hidden * 2, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(8192, args.seq_len),
        use_cache=False,
    )  # fmt: skip
    config._attn_implementation = args.attention
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(args.device).train()


def step(model, batch: dict) -> None:
    batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


def padded_inputs(lengths: list[int], vocab: int = 320) -> dict:
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def measure(model, batches, budget: int, sync) -> tuple[float, int]:
    step(model, batches[0][0])  # warm up
    real, start = 0, time.perf_counter()
    for inputs, tokens in batches[1:]:
        step(model, inputs)
        real += tokens
        if real >= budget:
            break
    sync()
    return real / (time.perf_counter() - start), real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-docs", type=int, default=4)
    parser.add_argument("--pack-rows", type=int, default=1, help="packed rows per batch")
    parser.add_argument("--measure-tokens", type=int, default=40_000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--attention", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    from datasets import Dataset

    from hf_residual.cpt.packing import pack_documents, packing_collator

    lengths = news_lengths(args.docs, args.seed)
    print(
        f"{args.docs} documents: mean {np.mean(lengths):.0f}, min {min(lengths)}, max {max(lengths)} tokens; "
        f"seq len {args.seq_len}; model hidden {args.hidden}, {args.layers} layers, {args.attention}, {args.device}"
    )
    model = model_for(args)
    results = []
    for name, grouped in (("random padding", False), ("length-grouped padding", True)):
        batches = padded_batches(lengths, args.batch_docs, args.seq_len, grouped, args.seed)
        computed = sum(len(b) * max(b) for b in batches)
        real = sum(sum(b) for b in batches)
        rate, _ = measure(
            model, [(padded_inputs(b), sum(b)) for b in batches[:400]], args.measure_tokens, sync
        )
        results.append((name, 1 - real / computed, rate))

    rng = np.random.default_rng(args.seed)
    docs = Dataset.from_dict({"input_ids": [rng.integers(3, 320, n).tolist() for n in lengths]})
    rows = pack_documents(docs, args.seq_len)
    fill = sum(sum(s) for s in rows["seq_lengths"]) / (len(rows) * args.seq_len)
    collate = packing_collator(type("Tok", (), {"pad_token_id": 0, "eos_token_id": 2})())
    row_list = [rows[i] for i in range(min(len(rows), 400))]
    packed = []
    for s in range(0, len(row_list), args.pack_rows):
        group = row_list[s : s + args.pack_rows]
        packed.append((collate(group), sum(sum(r["seq_lengths"]) for r in group)))
    rate, _ = measure(model, packed, args.measure_tokens, sync)
    results.append(("packing (bfd_split, per-document attention)", 1 - fill, rate))

    base_rate = results[0][2]
    print(f"{'strategy':46} {'waste':>7} {'real tok/s':>11} {'ratio':>6}")
    for name, waste, rate in results:
        print(f"{name:46} {waste:7.1%} {rate:11.0f} {rate / base_rate:6.2f}")


if __name__ == "__main__":
    main()
