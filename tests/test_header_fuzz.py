"""A seeded fuzz of one shard's safetensors header, run through `inspect` and `port` in-process.

Every case must end in one of two ways: a non-zero exit with an ``error:`` line on stderr, or success when the
fuzzed file is still a valid safetensors file (the reference implementation, the ``safetensors`` package,
opens it). Nothing may escape as a traceback and nothing may hang. Each category of damage (dtypes, shapes,
offsets, overlaps and holes, entries, ``__metadata__``, the JSON itself, truncation, the length prefix, and
harmless edits that keep the file valid) gets the same number of cases.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest

from hf_residual.cli import main

SEED = 1313
CASES = 60
RUN_SECONDS = 30  # one inspect or port of the toy model takes well under a second


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def encode(header, data: bytes, *, pad: int = 0) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    text += b" " * ((-(8 + len(text)) % 8) + pad)
    return struct.pack("<Q", len(text)) + text + data


def tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def by_offset(header: dict) -> list[str]:
    return sorted(tensor_names(header), key=lambda n: header[n]["data_offsets"][0])


# Each mutation takes (rng, header, data, raw) and returns the new file's bytes.


def m_dtype(rng, header, data, raw):
    name = rng.choice(tensor_names(header))
    header[name]["dtype"] = rng.choice(["F31", "bf16", "", 7, None, ["BF16"], {"x": 1}, "F32", "I8", "F16"])
    return encode(header, data)


def m_shape(rng, header, data, raw):
    name = rng.choice(tensor_names(header))
    shape = header[name]["shape"]
    header[name]["shape"] = rng.choice(
        [
            [-d for d in shape],
            [float(d) for d in shape],
            [d + 0.5 for d in shape],
            [True] * len(shape),
            "x".join(map(str, shape)),
            [shape],
            [*shape, 2],
            [2**64, *shape],
            [None, *shape],
            shape[0] if shape else 3,
            list(reversed(shape)),  # same size: still valid
        ]
    )
    return encode(header, data)


def m_offsets(rng, header, data, raw):
    name = rng.choice(tensor_names(header))
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = rng.choice(
        [
            [e, b] if e != b else [b + 1, b],
            [b],
            [b, e, e],
            [],
            [b, e + 8],
            [-8, e - 8],
            [float(b), float(e)],
            [str(b), str(e)],
            [b, None],
            {"begin": b, "end": e},
            [b, len(data) + 10**12],
            [b + 2, e + 2],
        ]
    )
    return encode(header, data)


def m_layout(rng, header, data, raw):
    """Overlaps, holes and data the tensors do not cover."""
    order = by_offset(header)
    kind = rng.choice(["overlap", "hole", "trailing", "drop", "start", "swap"])
    if kind == "overlap" and len(order) > 1:
        a, b = rng.sample(order, 2)
        header[b]["data_offsets"] = list(header[a]["data_offsets"])
        header[b]["shape"], header[b]["dtype"] = header[a]["shape"], header[a]["dtype"]
    elif kind == "hole":  # 8 bytes inserted before a tensor, later offsets shifted: a gap between tensors
        cut = header[rng.choice(order[1:] or order)]["data_offsets"][0]
        data = data[:cut] + b"\0" * 8 + data[cut:]
        for n in order:
            begin, end = header[n]["data_offsets"]
            if begin >= cut:
                header[n]["data_offsets"] = [begin + 8, end + 8]
    elif kind == "trailing":
        data += b"\0" * rng.choice([1, 8, 64])
    elif kind == "drop":  # a tensor's bytes remain but no entry names them
        del header[rng.choice(order)]
    elif kind == "start":  # every tensor shifted: the data no longer starts at offset 0
        data = b"\0" * 8 + data
        for n in order:
            begin, end = header[n]["data_offsets"]
            header[n]["data_offsets"] = [begin + 8, end + 8]
    else:  # two tensors trade offsets: valid when their byte sizes agree
        a, b = rng.sample(order, 2) if len(order) > 1 else (order[0], order[0])
        header[a]["data_offsets"], header[b]["data_offsets"] = (
            header[b]["data_offsets"],
            header[a]["data_offsets"],
        )
    return encode(header, data)


def m_entry(rng, header, data, raw):
    name = rng.choice(tensor_names(header))
    entry = header[name]
    choice = rng.randrange(8)
    if choice == 0:
        header[name] = rng.choice(["F32", 1, None, [], True])
    elif choice in (1, 2, 3):
        del entry[["dtype", "shape", "data_offsets"][choice - 1]]
    elif choice == 4:
        entry["extra"] = 1
    elif choice == 5:
        header[name] = {k.upper(): v for k, v in entry.items()}
    elif choice == 6:
        entry["offsets"] = entry.pop("data_offsets")
    else:
        header[name] = [entry]
    return encode(header, data)


def m_metadata(rng, header, data, raw):
    header["__metadata__"] = rng.choice(
        [
            ["format", "pt"],
            "pt",
            "format=pt",
            42,
            True,
            [],
            {"format": 1},
            {"format": {"nested": "x"}},
            {"format": None},
            {"format": ["pt"]},
            {"format": "pt", "note": "still valid"},
        ]
    )
    return encode(header, data)


def m_json(rng, header, data, raw):
    text = json.dumps(header).encode("utf-8")
    choice = rng.randrange(9)
    if choice == 0:
        return encode([header], data)
    if choice == 1:
        return encode(text[: len(text) // 2], data)
    if choice == 2:
        return encode(text.replace(b'"__metadata__"', b'"__meta\xff\xfe__"', 1), data)
    if choice == 3:
        return encode(json.dumps("a string").encode(), data)
    if choice == 4:
        return encode(b"", data)
    if choice == 5:  # NaN in a shape: Python's json reads it, JSON does not allow it
        return encode(text.replace(b'"shape": [', b'"shape": [NaN, ', 1), data)
    if choice == 6:  # a tensor named twice
        name = by_offset(header)[0]
        dup = f"{json.dumps(name)}: {json.dumps(header[name])}, ".encode()
        return encode(b"{" + dup + text[1:], data)
    if choice == 7:
        return encode(b"\t" + text, data)
    return encode(b"null", data)


def m_truncate(rng, header, data, raw):
    (n,) = struct.unpack("<Q", raw[:8])
    where = rng.choice(
        [
            rng.randrange(0, 8),
            rng.randrange(8, 8 + n),
            rng.randrange(8 + n, len(raw)),
            len(raw) - 1,
        ]
    )
    return raw[:where]


def m_length(rng, header, data, raw):
    (n,) = struct.unpack("<Q", raw[:8])
    value = rng.choice([0, 1, n - 3, n + 8, len(raw), 2**63, 2**64 - 1, n + len(data) // 2])
    return struct.pack("<Q", value) + raw[8:]


def m_valid(rng, header, data, raw):
    """Edits that keep the file valid: key order, extra metadata, padding, a renamed tensor."""
    choice = rng.randrange(4)
    if choice == 0:
        names = list(header)
        rng.shuffle(names)
        return encode({k: header[k] for k in names}, data)
    if choice == 1:
        header["__metadata__"] = {**header.get("__metadata__", {}), "fuzz": "yes"}
        return encode(header, data)
    if choice == 2:
        return encode(header, data, pad=8 * rng.randrange(1, 4))
    name = rng.choice(tensor_names(header))
    header[name + ".renamed"] = header.pop(name)
    return encode(header, data)


CATEGORIES = {
    "dtype": m_dtype,
    "shape": m_shape,
    "offsets": m_offsets,
    "layout": m_layout,
    "entry": m_entry,
    "metadata": m_metadata,
    "json": m_json,
    "truncate": m_truncate,
    "length": m_length,
    "valid": m_valid,
}


def reference_accepts(path: Path) -> bool:
    """Whether the safetensors package (the reference implementation) opens the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
        return True
    except Exception:  # noqa: BLE001 - any refusal counts
        return False


@contextmanager
def deadline(seconds: int):
    def expired(*_):
        raise TimeoutError(f"hung for more than {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run(capsys, argv: list[str]) -> tuple[str, int | None, str]:
    """('clean', code, stderr) or ('traceback' / 'hang', None, what was raised)."""
    capsys.readouterr()
    try:
        with deadline(RUN_SECONDS):
            code = main([str(a) for a in argv])
    except TimeoutError as error:
        return "hang", None, str(error)
    except BaseException as error:  # noqa: BLE001 - anything escaping main() is a traceback for a user
        return "traceback", None, f"{type(error).__name__}: {error}"
    return "clean", code, capsys.readouterr().err


def fuzz_cases():
    rng = random.Random(SEED)
    names = list(CATEGORIES)
    return [(i, names[i % len(names)], rng.randrange(2**32)) for i in range(CASES)]


def test_fuzzed_headers_fail_cleanly_or_are_valid(llama, tmp_path, capsys):
    """60 seeded damaged shards x (inspect, port): a clean error or a valid file, never a traceback."""
    counts: dict[str, int] = {}
    for _, category, _ in fuzz_cases():
        counts[category] = counts.get(category, 0) + 1
    assert counts == dict.fromkeys(CATEGORIES, CASES // len(CATEGORIES))  # every category, evenly
    shards = sorted(llama.cpt.glob("*.safetensors"))
    assert len(shards) >= 2  # the fixture's checkpoints are sharded: one shard is damaged, the rest stay
    roles = ("cpt", "instruct", "base")
    problems: list[str] = []
    outcomes = {"error": 0, "ok": 0}
    for i, category, seed in fuzz_cases():
        rng = random.Random(seed)
        role = roles[i % len(roles)]
        folder = tmp_path / f"case{i}"
        shutil.copytree(getattr(llama, role), folder)
        shard = rng.choice(sorted(folder.glob("*.safetensors")))
        raw = shard.read_bytes()
        header, data = split(raw)
        shard.write_bytes(CATEGORIES[category](rng, header, data, raw))
        valid = reference_accepts(shard)
        models = {r: getattr(llama, r) for r in roles} | {role: folder}
        port = ["port", models["instruct"], "--base", models["base"], "--to", models["cpt"]]
        port += ["-o", tmp_path / f"out{i}", "-q"]
        for argv in (["inspect", folder], port):
            how, code, err = run(capsys, argv)
            where = f"case {i} ({category}, {role}, valid={valid}) {argv[0]}"
            if how != "clean":
                problems.append(f"{where}: {how}: {err}")
            elif code == 0:
                outcomes["ok"] += 1
                if not valid:
                    problems.append(f"{where}: accepted a header the reference implementation refuses")
            else:
                outcomes["error"] += 1
                if not any(line.startswith("error: ") for line in err.splitlines()):
                    problems.append(f"{where}: exit {code} without an error: line ({err[-200:]!r})")
        shutil.rmtree(folder)
    summary = f"{outcomes['error']} clean errors, {outcomes['ok']} successes, {len(problems)} problems"
    print(summary)
    assert not problems, summary + "\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "metadata", [["format", "pt"], "pt", 7, {"format": 1}, {"format": {"a": "b"}}, {"a": None}]
)
def test_metadata_that_is_not_an_object_of_strings_is_refused(tmp_path, metadata):
    from hf_residual.core.safetensors_io import read_header
    from hf_residual.errors import CorruptCheckpointError

    path = tmp_path / "model.safetensors"
    header = {"__metadata__": metadata, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    path.write_bytes(encode(header, b"\0" * 8))
    with pytest.raises(CorruptCheckpointError, match="__metadata__"):
        read_header(path)


@pytest.mark.parametrize(
    ("entry", "data", "match"),
    [
        ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, 8, "shape"),
        ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, 8, "shape"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}, 8, "data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}, 8, "data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}, 8, "unknown field"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}, 16, "hole|cover"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, 16, "cover"),
    ],
)
def test_entries_follow_the_formats_rules(tmp_path, entry, data, match):
    from hf_residual.core.safetensors_io import read_header
    from hf_residual.errors import CorruptCheckpointError

    path = tmp_path / "model.safetensors"
    path.write_bytes(encode({"w": entry}, b"\0" * data))
    with pytest.raises(CorruptCheckpointError, match=match):
        read_header(path)
