"""A target whose vocabulary grew during continual pre-training (tokens added, embeddings resized).

The toy tokenizer has 312 tokens and the models 320 rows (a padded vocabulary), so the target's first 8
new tokens take ids inside the base's rows and the next 8 grow the embedding (see ``hf_residual.core.vocab``).
Loaded as a Qwen2Tokenizer, the Qwen2 toy tokenizer gains ``<|endoftext|>`` at id 312 (transformers adds
it), so a Qwen2 model's added tokens start at 313: ``first_new`` reads where they start.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import bits, load_tensors, reference_port

from hf_residual import api
from hf_residual.errors import IncompatibleModelsError

DOMAIN = [f"zorvanium{i}" for i in range(16)]
CHAT = ["<|im_start|>", "<|im_end|>"]
BASE_ROWS, BASE_TOKENS = 320, 312


def grow(src: Path, dst: Path, tokens: list[str], *, special=False, rows=None, tokenizer_from=None) -> Path:
    """``src`` with ``tokens`` added to its tokenizer (or ``tokenizer_from``'s) and embeddings resized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(tokenizer_from or src)
    tok.add_tokens(tokens, special_tokens=special)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.resize_token_embeddings(rows or len(tok), mean_resizing=False)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def first_new(folder: Path) -> int:
    """The id the next token added to ``folder``'s tokenizer gets."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(folder))


def vocab_names(tensors) -> list[str]:
    return [n for n in ("model.embed_tokens.weight", "lm_head.weight") if n in tensors]


def check_rows(out: Path, target: Path, instruct: Path, base: Path, kinds: dict[str, list[int]]) -> None:
    """Every tensor against float32 references: the residual rows bit for bit, the others copied."""
    o, t, i, b = (load_tensors(p) for p in (out, target, instruct, base))
    for name in o:
        if name not in vocab_names(o):
            assert torch.equal(bits(o[name]), bits(reference_port(t[name], i[name], b[name], 1.0))), name
            continue
        rows = kinds["residual"]
        ref = reference_port(t[name][rows], i[name][rows], b[name][rows], 1.0)
        assert torch.equal(bits(o[name][rows]), bits(ref)), name
        assert torch.equal(bits(o[name][kinds["target"]]), bits(t[name][kinds["target"]])), name
        assert torch.equal(bits(o[name][kinds["instruct"]]), bits(i[name][kinds["instruct"]])), name
        covered = sum(len(v) for v in kinds.values())
        assert o[name].shape[0] == covered, name


def check_loads(out: Path, rows: int, tied: bool, tokens: dict[str, int]) -> None:
    """The model loads with ``rows`` rows; the tokenizer maps ``tokens`` to their ids and back; chat works."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == rows
    assert model.get_input_embeddings().weight.shape[0] == rows
    if tied:
        assert (
            model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        )
    tok = AutoTokenizer.from_pretrained(out)
    for text, token_id in tokens.items():
        assert tok.convert_tokens_to_ids(text) == token_id, text
        ids = tok.encode(f"see {text} here", add_special_tokens=False)
        assert token_id in ids and text in tok.decode(ids)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|user|>hello<|eot|>" in rendered and rendered.endswith("<|assistant|>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [3, 2]
    with torch.no_grad():
        model(torch.tensor([[1, *tokens.values()]]))


def span(a: int, b: int) -> list[int]:
    return list(range(a, b))


def port_and_apply(fam, instruct: Path, target: Path, tmp_path: Path, **kw) -> api.Result:
    """Port, then extract + apply (float32): both give the same folder bit for bit."""
    result = api.port(instruct, target, tmp_path / "ported", base=fam.base, progress=False, **kw)
    api.extract(instruct, fam.base, tmp_path / "residual", dtype="float32", progress=False)
    applied = api.apply(tmp_path / "residual", target, tmp_path / "applied", progress=False, **kw)
    ported, again = load_tensors(tmp_path / "ported"), load_tensors(tmp_path / "applied")
    assert ported.keys() == again.keys()
    for name in ported:
        assert torch.equal(bits(ported[name]), bits(again[name])), name
    for file in ("tokenizer.json", "config.json", "vocabulary_rows.json"):
        first, second = tmp_path / "ported" / file, tmp_path / "applied" / file
        assert first.is_file() == second.is_file(), file
        if first.is_file():
            assert json.loads(first.read_text()) == json.loads(second.read_text()), file
    assert applied.details.get("vocabulary") == result.details.get("vocabulary")
    return result


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_target_grown(families, tmp_path, arch):
    fam = families(arch, "bfloat16")
    first = first_new(fam.cpt)
    target = grow(fam.cpt, tmp_path / "target", DOMAIN)
    result = port_and_apply(fam, fam.instruct, target, tmp_path)
    rows = first + 16
    kinds = {"residual": span(0, BASE_TOKENS), "target": span(BASE_TOKENS, rows), "instruct": []}
    check_rows(tmp_path / "ported", target, fam.instruct, fam.base, kinds)
    tokens = {t: first + k for k, t in enumerate(DOMAIN)}
    check_loads(tmp_path / "ported", rows, arch == "qwen2", tokens)
    summary = result.details["vocabulary"]
    assert summary["residual_rows"] == BASE_TOKENS and summary["target_rows"] == rows - BASE_TOKENS
    card = (tmp_path / "ported" / "README.md").read_text()
    assert "Rows that got the residual: 0-311" in card and f"kept as they are: 312-{rows - 1}" in card
    assert json.loads((tmp_path / "ported" / "vocabulary_rows.json").read_text()) == summary


def test_target_grown_rows_without_tokens(families, tmp_path):
    """Rows added with no tokens (padding to a multiple) are the target's rows; the rest get the residual."""
    fam = families("llama", "bfloat16")
    target = grow(fam.cpt, tmp_path / "target", [], rows=BASE_ROWS + 4)
    port_and_apply(fam, fam.instruct, target, tmp_path)
    kinds = {"residual": span(0, BASE_ROWS), "target": span(BASE_ROWS, BASE_ROWS + 4), "instruct": []}
    check_rows(tmp_path / "ported", target, fam.instruct, fam.base, kinds)


def test_instruct_grown(families, tmp_path):
    """Chat tokens inside the padding rows get the residual; the rows beyond the base's are the instruct's."""
    fam = families("llama", "bfloat16")
    instruct = grow(fam.instruct, tmp_path / "instruct", CHAT, special=True, rows=BASE_ROWS + 2)
    result = port_and_apply(fam, instruct, fam.cpt, tmp_path)
    assert "vocabulary" not in result.details  # plain pairing: nothing to lay out
    kinds = {"residual": span(0, BASE_ROWS), "target": [], "instruct": span(BASE_ROWS, BASE_ROWS + 2)}
    check_rows(tmp_path / "ported", fam.cpt, instruct, fam.base, kinds)
    check_loads(tmp_path / "ported", BASE_ROWS + 2, False, {"<|im_start|>": 312, "<|im_end|>": 313})


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_both_grown_compatible(families, tmp_path, arch):
    """The target's tokenizer came from the instruct (chat tokens at the same ids) plus 16 domain tokens."""
    fam = families(arch, "bfloat16")
    chat = first_new(fam.instruct)
    instruct = grow(fam.instruct, tmp_path / "instruct", CHAT, special=True, rows=BASE_ROWS + 2)
    target = grow(fam.cpt, tmp_path / "target", DOMAIN, tokenizer_from=instruct)
    port_and_apply(fam, instruct, target, tmp_path)
    rows = chat + 2 + 16
    kinds = {"residual": span(0, chat + 2), "target": span(chat + 2, rows), "instruct": []}
    check_rows(tmp_path / "ported", target, instruct, fam.base, kinds)
    tokens = {"<|im_start|>": chat, "<|im_end|>": chat + 1}
    tokens |= {t: chat + 2 + k for k, t in enumerate(DOMAIN)}
    check_loads(tmp_path / "ported", rows, arch == "qwen2", tokens)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_both_grown_conflicting(families, tmp_path, arch):
    """Both added tokens at the same ids: refused, naming them; --vocab-from picks a side, both tested."""
    fam = families(arch, "bfloat16")
    first = first_new(fam.cpt)  # the instruct's chat tokens take the same ids
    instruct = grow(fam.instruct, tmp_path / "instruct", CHAT, special=True, rows=BASE_ROWS + 2)
    target = grow(fam.cpt, tmp_path / "target", DOMAIN)
    with pytest.raises(IncompatibleModelsError) as error:
        api.port(instruct, target, tmp_path / "refused", base=fam.base, progress=False)
    message = str(error.value)
    assert f"id {first}: 'zorvanium0' in the target, '<|im_start|>' in the instruct model" in message
    assert "--vocab-from target" in message and "--vocab-from instruct" in message
    assert not (tmp_path / "refused").exists()
    rows = first + 16

    port_and_apply(fam, instruct, target, tmp_path / "t", vocab_from="target")
    out = tmp_path / "t" / "ported"
    kinds = {"residual": span(0, first), "target": span(first, rows), "instruct": []}
    check_rows(out, target, instruct, fam.base, kinds)
    check_loads(out, rows, arch == "qwen2", {t: first + k for k, t in enumerate(DOMAIN)})
    assert "<|im_start|>" in (out / "README.md").read_text()  # named as left out

    port_and_apply(fam, instruct, target, tmp_path / "i", vocab_from="instruct")
    out = tmp_path / "i" / "ported"
    kinds = {"residual": span(0, first + 2), "target": span(first + 2, rows), "instruct": []}
    check_rows(out, target, instruct, fam.base, kinds)
    tokens = {"<|im_start|>": first, "<|im_end|>": first + 1}
    tokens |= {t: first + k for k, t in enumerate(DOMAIN) if k >= 2}
    check_loads(out, rows, arch == "qwen2", tokens)


def test_vocab_from_on_the_command_line(families, tmp_path, capsys):
    from hf_residual.cli import main

    fam = families("llama", "bfloat16")
    instruct = grow(fam.instruct, tmp_path / "instruct", CHAT, special=True, rows=BASE_ROWS + 2)
    target = grow(fam.cpt, tmp_path / "target", DOMAIN)
    args = ["port", str(instruct), "--base", str(fam.base), "--to", str(target), "-q"]
    assert main([*args, "-o", str(tmp_path / "refused")]) == 2
    assert "--vocab-from" in capsys.readouterr().err
    assert main([*args[:-1], "-o", str(tmp_path / "out"), "--vocab-from", "instruct"]) == 0
    assert "left out: target 'zorvanium0' (id 312)" in capsys.readouterr().out
    api.extract(instruct, fam.base, tmp_path / "residual", progress=False)
    apply_args = ["apply", str(tmp_path / "residual"), "--to", str(target), "-o", str(tmp_path / "applied")]
    assert main([*apply_args, "-q", "--vocab-from", "target"]) == 0


def write_tokenizer_json(folder: Path, tokens: list[str], added: dict[int, str]) -> Path:
    """A minimal tokenizer.json: a word-level vocabulary and added tokens at explicit ids."""
    folder.mkdir(parents=True)
    data = {
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)}, "unk_token": tokens[0]},
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False}
            | {"normalized": False, "special": True}
            for i, s in added.items()
        ],
    }
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def test_same_token_at_other_ids_is_refused_and_resolved(tmp_path):
    """A target-new token the instruct holds at another id is a clash too; each side can win it."""
    from hf_residual.core import vocab

    words = [f"w{i}" for i in range(8)]
    target = write_tokenizer_json(tmp_path / "target", words, {8: "<|im_start|>", 9: "dom"})
    instruct = write_tokenizer_json(tmp_path / "instruct", words, {8: "<x>", 10: "<|im_start|>"})
    kw = dict(base_rows=8, target_rows=10, instruct_rows=11, target_folder=target, instruct_folder=instruct)
    with pytest.raises(IncompatibleModelsError) as error:
        vocab.plan(**kw, base_tokens=8, vocab_from=None)
    assert "'<|im_start|>': id 8 in the target, id 10 in the instruct model" in str(error.value)
    assert "id 8: '<|im_start|>' in the target, '<x>' in the instruct model" in str(error.value)
    target_wins = vocab.plan(**kw, base_tokens=8, vocab_from="target")
    assert target_wins.runs == [(0, 8, "residual"), (8, 10, "target"), (10, 11, "instruct")]
    assert set(target_wins.added) == {8, 9} and len(target_wins.dropped) == 2
    instruct_wins = vocab.plan(**kw, base_tokens=8, vocab_from="instruct")
    assert instruct_wins.runs == [
        (0, 8, "residual"),
        (8, 9, "instruct"),
        (9, 10, "target"),
        (10, 11, "instruct"),
    ]
    assert set(instruct_wins.added) == {9}
    out = tmp_path / "out"
    shutil.copytree(instruct, out)
    vocab.write_tokenizer(target_wins, out)
    from tokenizers import Tokenizer

    merged = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert merged.token_to_id("<|im_start|>") == 8 and merged.token_to_id("dom") == 9
    assert merged.token_to_id("<x>") is None


def test_compressed_residual_onto_grown_target(families, tmp_path):
    """A lossy residual (decoded before it is applied) goes to the same rows; the target's rows are kept."""
    fam = families("llama", "bfloat16")
    target = grow(fam.cpt, tmp_path / "target", DOMAIN)
    api.extract(fam.instruct, fam.base, tmp_path / "residual", codec="lowrank:4", progress=False)
    result = api.apply(tmp_path / "residual", target, tmp_path / "out", progress=False)
    assert result.details["vocabulary"]["target_rows"] == 16
    out, t = load_tensors(tmp_path / "out"), load_tensors(target)
    for name in vocab_names(out):
        assert out[name].shape[0] == BASE_TOKENS + 16
        assert torch.equal(bits(out[name][BASE_TOKENS:]), bits(t[name][BASE_TOKENS:]))
        assert not torch.equal(bits(out[name][:BASE_TOKENS]), bits(t[name][:BASE_TOKENS]))
    check_loads(tmp_path / "out", BASE_TOKENS + 16, False, {t: BASE_TOKENS + k for k, t in enumerate(DOMAIN)})


def test_target_tokens_inside_the_padding_rows(families, tmp_path):
    """Tokens added without growing the embedding (ids inside the padded rows) keep the target's rows."""
    fam = families("llama", "bfloat16")
    target = grow(fam.cpt, tmp_path / "target", DOMAIN[:4], rows=BASE_ROWS)
    result = port_and_apply(fam, fam.instruct, target, tmp_path)
    assert result.details["vocabulary"]["rows"] == BASE_ROWS
    kinds = {
        "residual": span(0, BASE_TOKENS) + span(BASE_TOKENS + 4, BASE_ROWS),
        "target": span(BASE_TOKENS, BASE_TOKENS + 4),
        "instruct": [],
    }
    check_rows(tmp_path / "ported", target, fam.instruct, fam.base, kinds)
    check_loads(tmp_path / "ported", BASE_ROWS, False, {t: BASE_TOKENS + k for k, t in enumerate(DOMAIN[:4])})


def test_damaged_residual_embedding_is_refused_for_a_grown_target(families, tmp_path):
    """The embedding's rows are read out of order for a grown target: its sha256 is checked in one read."""
    from hf_residual.core.checkpoint import open_checkpoint
    from hf_residual.errors import VerificationError

    fam = families("llama", "bfloat16")
    target = grow(fam.cpt, tmp_path / "target", DOMAIN)
    api.extract(fam.instruct, fam.base, tmp_path / "residual", dtype="float32", progress=False)
    info = open_checkpoint(tmp_path / "residual", prefix="residual").tensors["model.embed_tokens.weight"]
    with open(info.file, "r+b") as handle:
        handle.seek(info.offset + 4 * 100)
        value = handle.read(1)
        handle.seek(info.offset + 4 * 100)
        handle.write(bytes([value[0] ^ 1]))
    with pytest.raises(VerificationError, match="model.embed_tokens.weight"):
        api.apply(tmp_path / "residual", target, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
