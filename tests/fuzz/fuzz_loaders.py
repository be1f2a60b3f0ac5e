"""Fuzz target: the checkpoint loaders on mutated checkpoints.

Run by tests/test_fuzz.py in its own process under a 6 GiB address-space limit (a loader that tries to
allocate what a file claims fails there); the number of examples comes from the loaded Hypothesis profile
(tests/conftest.py, --fuzz-examples N).

A small valid RWKV-7 checkpoint (2 layers, width 64, vocabulary 300), written once per process as a zip
.pth, a legacy (pre-1.6) .pth and a .safetensors file, is damaged in one of these ways:

- bytes: flipped, cut off, inserted or deleted anywhere;
- tensors: a dtype changed (int, bool, complex, float8, ...), a shape flattened or grown a dimension,
  a view that claims more than it stores (expand, transpose, overlapping slices), a key dropped or
  renamed, a block far past the last one, a non-tensor entry, NaN values;
- the pickle: any integer in a .pth's data.pkl (storage sizes, offsets, shapes, strides) set to a huge,
  negative or small value;
- the zip: a record cut short, padded, dropped, duplicated or compressed;
- the safetensors header: a shape, dtype or offset changed, or its length field.

Invariant: `aviary.load`, `aviary info`'s `describe` and `read_time_state` (chat --state) each either
succeed or raise a ValueError (CheckpointError) or OSError with a message: never another exception, never
a hang (SIGALRM), never a crash (the runner sees the signal), never an allocation past the limit.
"""

from __future__ import annotations

import atexit
import io
import json
import pickle
import pickletools
import shutil
import signal
import tempfile
import zipfile
from functools import cache
from itertools import pairwise
from pathlib import Path

import torch
from hypothesis import given, note
from hypothesis import strategies as st

import aviary
from aviary.commands.info import describe
from aviary.io import read_time_state
from aviary.testing import random_config, random_state_dict

USER_ERRORS = (ValueError, OSError)
SECONDS_PER_CALL = 20  # a loader call on this tiny model takes well under a second
WORK = Path(tempfile.mkdtemp(prefix="fuzz_loaders_"))
atexit.register(shutil.rmtree, WORK, ignore_errors=True)
FORMATS = ("pth", "legacy", "safetensors")


@cache
def template() -> dict[str, torch.Tensor]:
    config = random_config(7, n_layer=2, n_embd=64, vocab_size=300, head_size=32)
    return random_state_dict(config, time_state=True)


def serialize(sd: dict, fmt: str) -> tuple[bytes, str]:
    """`sd` as the bytes of a `fmt` file, and the format; views and non-tensors, which safetensors cannot
    hold, go into a .pth instead."""
    if fmt == "safetensors" and all(isinstance(t, torch.Tensor) and t.is_contiguous() for t in sd.values()):
        from safetensors.torch import save

        try:
            return save(sd), fmt
        except Exception:  # tensors sharing memory
            fmt = "pth"
    buf = io.BytesIO()
    torch.save(sd, buf, _use_new_zipfile_serialization=(fmt != "legacy"))
    return buf.getvalue(), "pth" if fmt == "safetensors" else fmt


@cache
def valid_bytes(fmt: str) -> bytes:
    return serialize(template(), fmt)[0]


# ---- mutations ---------------------------------------------------------------------------------------------

def flip_bytes(data: bytes, edits: list[tuple[float, int]]) -> bytes:
    out = bytearray(data)
    for where, value in edits:
        out[int(where * (len(out) - 1))] = value
    return bytes(out)


def splice(data: bytes, where: float, delete: int, insert: bytes) -> bytes:
    at = int(where * len(data))
    return data[:at] + insert + data[at + delete:]


DTYPES = [torch.int64, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.float64, torch.float16,
          torch.bfloat16, torch.float8_e4m3fn]
TENSOR_CHANGES = {
    "dtype": lambda t, d: t.float().to(DTYPES[d % len(DTYPES)]),
    "flatten": lambda t, d: t.flatten(),
    "unsqueeze": lambda t, d: t.unsqueeze(d % (t.dim() + 1)),
    "expand": lambda t, d: t.flatten()[:1].expand(2 ** (d % 34), *t.shape[1:] if t.dim() > 1 else ()),
    "transpose": lambda t, d: t.t() if t.dim() == 2 else t,
    "nan": lambda t, d: torch.full(t.shape, float("nan")).to(t.dtype) if t.is_floating_point() else t,
}


def change_tensors(fmt: str, ops: list[tuple[str, int, int]]) -> tuple[bytes, str]:
    sd = dict(template())
    for op, which, d in ops:
        keys = sorted(k for k, v in sd.items() if isinstance(v, torch.Tensor))
        key = keys[which % len(keys)]
        if op in TENSOR_CHANGES:
            sd[key] = TENSOR_CHANGES[op](sd[key], d)
        elif op == "drop":
            sd.pop(key, None)
        elif op == "rename":
            sd[key.replace("blocks.1.", f"blocks.{d}.")] = sd.pop(key, torch.zeros(1))
        elif op == "far_block":
            sd[f"blocks.{10 ** (d % 10)}.att.r_k"] = torch.zeros(2, 32)
        elif op == "not_a_tensor":
            sd[key] = [d, "x"]
        elif op == "share":  # two names on overlapping bytes of one storage
            other = keys[(which + d + 1) % len(keys)]
            if sd[other].numel() >= sd[key].numel() and sd[key].numel():
                sd[key] = sd[other].flatten()[: sd[key].numel()].view_as(sd[key])
    return serialize(sd, fmt)


def pickle_ints(data: bytes) -> list[tuple[int, int]]:
    ops = list(pickletools.genops(data))
    return [(pos, nxt) for (op, _, pos), (_, _, nxt) in pairwise(ops)
            if op.name in ("BININT", "BININT1", "BININT2", "LONG1")]


def with_int(data: bytes, index: int, value: int) -> bytes:
    spans = pickle_ints(data)
    start, end = spans[index % len(spans)]
    encoded = pickle.encode_long(value)
    return data[:start] + b"\x8a" + bytes([len(encoded)]) + encoded + data[end:]


def rezip(data: bytes, change) -> bytes:
    """The zip `data` with each record passed through `change(name, bytes) -> [(name, bytes, method)]`."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            for new_name, new_data, method in change(name, src.read(name)):
                dst.writestr(zipfile.ZipInfo(new_name), new_data, compress_type=method)
    return out.getvalue()


def change_zip(op: str, which: int, n: int) -> bytes:
    data = valid_bytes("pth")
    if op == "pickle_int":
        value = [0, 1, -1, 7, 2**31, 2**40, 2**62, 2**63 + 5, -(2**40)][n % 9]
        return rezip(data, lambda name, d: [(name, with_int(d, which, value) if name.endswith("data.pkl") else d,
                                              zipfile.ZIP_STORED)])
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    victim = names[which % len(names)]

    def change(name, d):
        if name != victim:
            return [(name, d, zipfile.ZIP_STORED)]
        return {"cut": [(name, d[: n % (len(d) + 1)], zipfile.ZIP_STORED)],
                "pad": [(name, d + bytes(n % 300 + 1), zipfile.ZIP_STORED)],
                "drop": [],
                "twice": [(name, d, zipfile.ZIP_STORED), (name.upper() if n % 2 else name, d[:4], zipfile.ZIP_STORED)],
                "deflate": [(name, d, zipfile.ZIP_DEFLATED)]}[op]

    return rezip(data, change)


def change_header(key_index: int, field: str, n: int) -> bytes:
    data = valid_bytes("safetensors")
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    keys = sorted(k for k in header if k != "__metadata__")
    entry = header[keys[key_index % len(keys)]]
    huge = [0, 1, -1, 2**31, 2**40, 2**63][n % 6]
    if field == "shape":
        entry["shape"] = [huge, *entry["shape"][1:]]
    elif field == "dtype":
        entry["dtype"] = ["I64", "BOOL", "F64", "F8_E4M3", "C64", "XYZ", "U8"][n % 7]
    elif field == "offsets":
        entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] + huge]
    else:  # the header length field
        return huge.to_bytes(8, "little", signed=huge < 0) + data[8:]
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + length:]


fractions = st.floats(0, 1)
mutations = st.one_of(
    st.tuples(st.just("bytes"), st.sampled_from(FORMATS),
              st.lists(st.tuples(fractions, st.integers(0, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("cut"), st.sampled_from(FORMATS), fractions),
    st.tuples(st.just("splice"), st.sampled_from(FORMATS), fractions, st.integers(0, 64), st.binary(max_size=64)),
    st.tuples(st.just("tensors"), st.sampled_from(FORMATS),
              st.lists(st.tuples(st.sampled_from([*TENSOR_CHANGES, "drop", "rename", "far_block", "not_a_tensor",
                                                  "share"]), st.integers(0, 200), st.integers(0, 99)),
                       min_size=1, max_size=3)),
    st.tuples(st.just("zip"), st.sampled_from(["pickle_int", "cut", "pad", "drop", "twice", "deflate"]),
              st.integers(0, 500), st.integers(0, 10**6)),
    st.tuples(st.just("header"), st.integers(0, 200), st.sampled_from(["shape", "dtype", "offsets", "length"]),
              st.integers(0, 99)),
)


def damaged(mutation: tuple) -> tuple[bytes, str]:
    kind, *args = mutation
    if kind == "bytes":
        return flip_bytes(valid_bytes(args[0]), args[1]), args[0]
    if kind == "cut":
        data = valid_bytes(args[0])
        return data[: int(args[1] * len(data))], args[0]
    if kind == "splice":
        return splice(valid_bytes(args[0]), *args[1:]), args[0]
    if kind == "tensors":
        return change_tensors(args[0], args[1])
    if kind == "zip":
        return change_zip(*args), "pth"
    return change_header(*args), "safetensors"


# ---- the invariant -----------------------------------------------------------------------------------------

class Hang(BaseException):  # not an Exception: nothing in the loaders may catch it
    pass


def _alarm(signum, frame):
    raise Hang(f"a loader call took more than {SECONDS_PER_CALL} s")


def succeeds_or_says_why(call, path: Path) -> None:
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS_PER_CALL)
    try:
        call(path)
    except USER_ERRORS as e:
        assert str(e).strip(), f"{call.__name__}: {type(e).__name__} without a message"
        note(f"{call.__name__}: {type(e).__name__}: {e}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@given(mutations)
def test_damaged_checkpoints_load_or_fail_cleanly(mutation):
    data, fmt = damaged(mutation)
    path = WORK / ("x.safetensors" if fmt == "safetensors" else "x.pth")
    for old in WORK.iterdir():
        old.unlink()
    path.write_bytes(data)
    note(f"{fmt}: {len(data):,} bytes")
    for call in (aviary.load, describe, read_time_state):
        succeeds_or_says_why(call, path)


def test_the_template_itself_loads():
    for fmt in FORMATS:
        path = WORK / ("ok.safetensors" if fmt == "safetensors" else "ok.pth")
        path.write_bytes(valid_bytes(fmt))
        model = aviary.load(path)
        assert model.config.n_layer == 2 and model.initial_wkv is not None
        path.unlink()
