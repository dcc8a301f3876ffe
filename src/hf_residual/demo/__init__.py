"""``hf-residual demo``: the method end to end on a small family built on this machine.

First version: builds a toy family (random base, perturbed instruct and CPT'd models), ports the
residual with the engine, and checks the ported model loads and chats. The trained family that shows
the paper's Table 2 pattern replaces this (issue: demo).
"""

from __future__ import annotations

import time
from pathlib import Path


def run_demo(output: str | Path = "hf-residual-demo", *, seed: int = 0, overwrite: bool = False) -> dict:
    from hf_residual import api
    from hf_residual.toy import build_family

    started = time.perf_counter()
    output = Path(output)
    family = build_family(output / "family", "llama", "bfloat16", hidden=64, layers=2, seed=seed)
    ported = api.port(
        family.instruct, family.cpt, output / "ported", base=family.base, overwrite=True, progress=False
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ported.output)
    tokenizer = AutoTokenizer.from_pretrained(ported.output)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = model.generate(**ids, max_new_tokens=8, do_sample=False)
    return {
        "family": str(output / "family"),
        "ported": str(ported.output),
        "tensors": ported.tensors,
        "generated_tokens": int(generated.shape[1] - ids["input_ids"].shape[1]),
        "seconds": round(time.perf_counter() - started, 2),
    }
