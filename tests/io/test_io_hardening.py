"""Hostile and damaged checkpoints (issue 14, docs/reliability-probe.md): each finding's reproduction gets
a clear CheckpointError (a ValueError) or OSError naming the file, found before anything is allocated or
built. Cases whose regression would hang or allocate GiBs run in a child process under a memory limit
and a timeout (`test_hostile_files_fail_fast_in_a_bounded_process`); the rest cannot hang even if the
check they test went missing."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import resource
import subprocess
import sys
import textwrap
import zipfile
from itertools import pairwise

import pytest
import torch

import aviary
from aviary.cli import main
from aviary.commands.info import describe
from aviary.config import ConfigError
from aviary.io import CheckpointError, read_state_dict, write_state_dict
from aviary.loading import check_state_dict, expected_shapes
from aviary.model import RWKV
from aviary.testing import random_config, random_state_dict

CONFIG = random_config(7, n_layer=2, n_embd=64, vocab_size=300, head_size=32)


@pytest.fixture(scope="module")
def sd():
    return random_state_dict(CONFIG)


def refused(path, *fragments, load=aviary.load):
    """Assert that `load(path)` raises a CheckpointError naming the file and saying each fragment."""
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    assert os.fspath(path) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def cli(capsys, *argv):
    code = main([os.fspath(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- hand-made damage ------------------------------------------------------------------------------

def rewrite_zip(src, dst, change):
    """Copy the zip checkpoint `src` to `dst`, record by record, through `change(name, data) -> data`."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for name in z.namelist():
            out.writestr(name, change(name, z.read(name)))


def with_pickle_int(data: bytes, index: int, value: int) -> bytes:
    """`data` (a pickle) with its `index`-th integer replaced by `value` (written as LONG1)."""
    ops = list(pickletools.genops(data))
    ints = [(pos, nxt) for (op, _, pos), (_, _, nxt) in pairwise(ops)
            if op.name in ("BININT", "BININT1", "BININT2", "LONG1")]
    start, end = ints[index]
    encoded = pickle.encode_long(value)
    return data[:start] + b"\x8a" + bytes([len(encoded)]) + encoded + data[end:]


def one_tensor_pth(path, index: int, value: int) -> None:
    """A .pth of one [3, 4] tensor whose pickle says something else. Integers of its pickle, in order:
    0 storage size (elements), 1 storage offset, 2-3 shape, 4-5 strides."""
    buf = io.BytesIO()
    torch.save({"emb.weight": torch.randn(3, 4)}, buf)
    buf.seek(0)
    rewrite_zip(buf, path, lambda name, data: with_pickle_int(data, index, value)
                if name.endswith("data.pkl") else data)


# ---- finding 2: a small file that claims a huge model ----------------------------------------------

def test_block_indices_must_run_from_zero_without_gaps(sd):
    stray = {**sd, "blocks.100000000.att.r_k": torch.zeros(2, 32)}
    with pytest.raises(ConfigError, match=r"without gaps; found blocks 0, 1, 100000000"):
        check_state_dict(stray)
    gap = {k.replace("blocks.1.", "blocks.2."): v for k, v in sd.items()}
    with pytest.raises(ConfigError, match="found blocks 0, 2"):
        check_state_dict(gap)


def test_one_key_per_layer_does_not_pass_for_a_model(sd):
    # contiguous indices, but the layers beyond 1 hold one tensor each: refused before a model is built
    thin = {**sd, **{f"blocks.{i}.att.r_k": torch.zeros(2, 32) for i in range(2, 500)}}
    with pytest.raises(ConfigError, match="missing tensors"):
        check_state_dict(thin)


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_expected_shapes_are_those_of_the_full_model(version):
    config = random_config(version, n_layer=4, n_embd=64, head_size=32)
    with torch.device("meta"):
        full = {k: tuple(v.shape) for k, v in RWKV(config).state_dict().items()}
    assert expected_shapes(config) == full


def test_strided_views_are_refused(tmp_path, sd):
    base = {k: sd[k] for k in ("emb.weight", "head.weight")}
    cases = {
        "expand": {**base, "emb.weight": torch.randn(1, 64).expand(2**25, 64)},  # 8 GiB from 256 bytes
        "transpose": {**base, "head.weight": torch.randn(64, 300).t()},
        "overlap": {"emb.weight": (big := torch.randn(400, 64))[:300], "head.weight": big[100:]},
        "tied": {**base, "head.weight": sd["emb.weight"]},
    }
    messages = {"expand": "strided view", "transpose": "strided view", "overlap": "share stored bytes",
                "tied": "share stored bytes"}
    for name, tensors in cases.items():
        torch.save(tensors, tmp_path / f"{name}.pth")
        refused(tmp_path / f"{name}.pth", messages[name], load=read_state_dict)


def test_dense_slices_of_one_storage_still_load(tmp_path, sd):
    # torch.save keeps views of one tensor in one storage: fine while they are dense and apart
    both = torch.cat([sd["emb.weight"], sd["head.weight"]])
    torch.save({**sd, "emb.weight": both[:300], "head.weight": both[300:]}, tmp_path / "slices.pth")
    model = aviary.load(tmp_path / "slices.pth")
    assert torch.equal(model.state_dict()["head.weight"], sd["head.weight"])


@pytest.mark.parametrize("index,value,message", [
    (0, 2**40, "holds 48 bytes, but its tensors need"),  # the storage claims a TiB
    (1, 10, "reaches past the end of its storage"),  # storage offset
    (2, 2**40, "reaches past the end of its storage"),  # shape [2^40, 4] of a 12-element storage
    (4, 0, "strided view"),  # a stride of 0
    (0, -1, "malformed storage reference"),
])
def test_claims_the_stored_bytes_cannot_back(tmp_path, index, value, message):
    one_tensor_pth(tmp_path / "claims.pth", index, value)
    refused(tmp_path / "claims.pth", message, load=read_state_dict)


def test_hostile_files_fail_fast_in_a_bounded_process(tmp_path, sd):
    """What once hung or allocated GiBs, through aviary.load and `aviary info`, in a child process limited
    to 3 GiB of address space and 60 s: a regression is a failed test, never a stuck or swapping run."""
    torch.save({**sd, "blocks.100000000.att.r_k": torch.zeros(2, 32)}, tmp_path / "layers.pth")
    bomb = {**sd, **{k: torch.randn(1, 64).expand(2**25, 64) for k in ("emb.weight", "head.weight")}}
    torch.save(bomb, tmp_path / "bomb.pth")
    torch.save(bomb, tmp_path / "legacy_bomb.pth", _use_new_zipfile_serialization=False)
    one_tensor_pth(tmp_path / "tib.pth", 0, 2**40)
    os.symlink("/dev/zero", tmp_path / "zero.pth")
    os.mkfifo(tmp_path / "fifo.pth")
    code = textwrap.dedent("""
        import sys, time
        import aviary
        from aviary.commands.info import describe
        for name in sys.argv[1:]:
            for load in (aviary.load, describe):
                start = time.monotonic()
                try:
                    load(name)
                except aviary.CheckpointError as e:
                    print(f"{time.monotonic() - start:.2f} {e}")
                else:
                    print(f"LOADED {name}")
    """)
    names = ["layers.pth", "bomb.pth", "legacy_bomb.pth", "tib.pth", "zero.pth", "fifo.pth"]

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=60,
                          preexec_fn=limit, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 * len(names), proc.stdout
    for line, name in zip(lines, [n for n in names for _ in range(2)], strict=True):
        seconds, message = line.split(" ", 1)
        assert message.startswith(f"{name}: ") and float(seconds) < 5, line
    assert "block indices" in lines[0] and "strided view" in lines[2] and "strided view" in lines[4]
    assert "not a regular file" in lines[-1]


# ---- finding 3: a truncated storage record must not load as other bytes ------------------------------

def test_truncated_storage_record(tmp_path, sd):
    write_state_dict(sd, tmp_path / "good.pth")
    with zipfile.ZipFile(tmp_path / "good.pth") as z:
        sizes = {n: z.getinfo(n).file_size for n in z.namelist() if "/data/" in n}
    biggest = max(sizes, key=sizes.get)  # emb.weight: the record after it is what mmap would have read
    last = [n for n in sizes if n.rsplit("/", 1)[1].isdigit()][-1]
    for victim in (biggest, last):
        def cut(name, data, victim=victim):
            return data[:4] if name == victim else data

        rewrite_zip(tmp_path / "good.pth", tmp_path / "cut.pth", cut)
        refused(tmp_path / "cut.pth", "holds 4 bytes, but its tensors need", "truncated")


def test_zip_records_must_be_stored_once_and_uncompressed(tmp_path, sd):
    write_state_dict(sd, tmp_path / "good.pth")
    with zipfile.ZipFile(tmp_path / "good.pth") as z:
        records = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(tmp_path / "deflated.pth", "w", zipfile.ZIP_DEFLATED) as out:
        for name, data in records.items():
            out.writestr(name, data)
    refused(tmp_path / "deflated.pth", "is compressed")
    with zipfile.ZipFile(tmp_path / "twice.pth", "w") as out, pytest.warns(UserWarning, match="Duplicate"):
        for name, data in records.items():
            out.writestr(name, data)
        out.writestr(next(n for n in records if n.endswith("/data/0")), b"\0" * 8)
    refused(tmp_path / "twice.pth", "two records of the same name")


def test_zip_records_that_share_bytes_are_refused(tmp_path, sd):
    # a crafted zip directory can point two records at the same bytes: each would be copied on loading
    write_state_dict({k: sd[k] for k in ("emb.weight", "head.weight")}, tmp_path / "two.pth")
    data = bytearray((tmp_path / "two.pth").read_bytes())
    with zipfile.ZipFile(tmp_path / "two.pth") as z:
        by_key = {i.filename.rsplit("/", 1)[1]: i for i in z.infolist() if "/data/" in i.filename}
    entry = data.index(b"PK\x01\x02")  # the central directory: one entry per record
    while not data[entry + 46:].startswith(by_key["1"].filename.encode()):
        entry = data.index(b"PK\x01\x02", entry + 1)
    data[entry + 42:entry + 46] = by_key["0"].header_offset.to_bytes(4, "little")  # data/1 -> data/0's bytes
    (tmp_path / "two.pth").write_bytes(data)
    refused(tmp_path / "two.pth", "zip records overlap", load=read_state_dict)


# ---- finding 9: integer, bool and complex tensors ------------------------------------------------

@pytest.mark.parametrize("key,dtype", [("emb.weight", torch.int64), ("blocks.0.att.w0", torch.int64),
                                       ("head.weight", torch.int8), ("blocks.0.ln1.weight", torch.bool),
                                       ("head.weight", torch.complex64)])
def test_non_float_tensors_are_refused_by_name(tmp_path, capsys, sd, key, dtype):
    path = tmp_path / "ints.pth"
    torch.save({**sd, key: sd[key].to(dtype)}, path)
    refused(path, "must be floating-point", f"{str(dtype).removeprefix('torch.')} {key}")
    refused(path, key, load=describe)  # `aviary info` no longer calls such a file normal
    code, out, err = cli(capsys, "convert", path, tmp_path / "out.safetensors")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and key in err
    assert not (tmp_path / "out.safetensors").exists()


def test_all_int_file_lists_a_few_names_and_the_count(tmp_path, sd):
    torch.save({k: v.long() for k, v in sd.items()}, tmp_path / "allint.pth")
    message = refused(tmp_path / "allint.pth", "int64 emb.weight", f"({len(sd)} tensors)")
    assert len(message) < 400


@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn, torch.float16])
def test_other_float_dtypes_are_cast(tmp_path, sd, dtype):
    torch.save({**sd, "head.weight": sd["head.weight"].to(dtype)}, tmp_path / "cast.pth")
    assert aviary.load(tmp_path / "cast.pth").state_dict()["head.weight"].dtype == torch.float32


def test_pip_converted_int8_file_keeps_its_own_message(tmp_path, sd):
    markers = {"_strategy": "cpu fp32i8", "_version": "0.8", "_rescale_layer": 0}
    torch.save({**sd, "head.weight": sd["head.weight"].to(torch.int8), **markers}, tmp_path / "pip.pth")
    refused(tmp_path / "pip.pth", "rwkv pip package")


# ---- finding 12: NaN and infinite weights --------------------------------------------------------

def test_nan_and_infinite_weights_are_refused(tmp_path, sd):
    torch.save({k: v * float("nan") for k, v in sd.items()}, tmp_path / "nan.pth")
    refused(tmp_path / "nan.pth", "NaN or infinite values in", f"{len(sd)} tensors")
    bf16 = {k: v.bfloat16() for k, v in sd.items()}
    bf16["blocks.1.att.key.weight"][3, 5] = float("-inf")
    write_state_dict(bf16, tmp_path / "inf.safetensors")
    refused(tmp_path / "inf.safetensors", "NaN or infinite values in blocks.1.att.key.weight:")


# ---- finding 13: messages that name the file and the cause ------------------------------------------

@pytest.mark.parametrize("key,change,shape", [("emb.weight", lambda t: t[0], "(64,)"),
                                              ("emb.weight", lambda t: t[None], "(1, 300, 64)"),
                                              ("blocks.0.att.r_k", lambda t: t.flatten(), "(64,)")])
def test_tensors_with_the_wrong_number_of_dimensions(tmp_path, sd, key, change, shape):
    torch.save({**sd, key: change(sd[key]).clone()}, tmp_path / "dims.pth")
    for load in (aviary.load, describe):
        refused(tmp_path / "dims.pth", f"'{key}' has shape {shape}: expected 2 dimensions", load=load)


def test_wrong_time_state_shape_is_a_clear_error(tmp_path):
    tuned = random_state_dict(CONFIG, time_state=True)
    tuned["blocks.1.att.time_state"] = torch.zeros(2, 32, 16)
    torch.save(tuned, tmp_path / "tuned.pth")
    refused(tmp_path / "tuned.pth", "shape mismatch", "blocks.1.att.time_state")
    del tuned["blocks.1.att.time_state"]
    torch.save(tuned, tmp_path / "half.pth")
    refused(tmp_path / "half.pth", "missing tensors ['blocks.1.att.time_state']")


def test_unreadable_file_says_permission_denied(tmp_path, sd, monkeypatch):
    write_state_dict(sd, tmp_path / "locked.pth")
    write_state_dict(sd, tmp_path / "locked.safetensors")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", os.fspath(path))

    monkeypatch.setattr("aviary.io.checkpoint.open", denied, raising=False)  # root reads any file
    for name in ("locked.pth", "locked.safetensors"):
        message = refused(tmp_path / name, "cannot read the file: Permission denied")
        assert "No such file" not in message


def test_files_named_for_the_other_format(tmp_path, sd):
    write_state_dict(sd, tmp_path / "real.safetensors")
    os.rename(tmp_path / "real.safetensors", tmp_path / "wrong.pth")
    refused(tmp_path / "wrong.pth", "this is a safetensors file", "rename it to wrong.safetensors")
    write_state_dict(sd, tmp_path / "real.pth")
    os.rename(tmp_path / "real.pth", tmp_path / "wrong.safetensors")
    refused(tmp_path / "wrong.safetensors", "this is a PyTorch checkpoint", "rename it to .pth")


def test_a_folder_where_a_weight_file_belongs(tmp_path):
    (tmp_path / "model" / "model.safetensors").mkdir(parents=True)
    refused(tmp_path / "model", "is a folder where a weight file was expected")


# ---- finding 10: convert into a folder that is not there, or not writable ------------------------------

def test_convert_into_a_missing_folder(tmp_path, capsys, sd):
    write_state_dict(sd, tmp_path / "good.pth")
    for name in ("out.pth", "out.safetensors"):
        code, out, err = cli(capsys, "convert", tmp_path / "good.pth", tmp_path / "nodir" / name)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
        assert f"{tmp_path / 'nodir'}: no such folder" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_convert_into_a_read_only_folder(tmp_path, capsys, sd):
    write_state_dict(sd, tmp_path / "good.pth")
    (tmp_path / "ro").mkdir(mode=0o555)
    for name in ("out.pth", "out.safetensors", "folder"):
        code, out, err = cli(capsys, "convert", tmp_path / "good.pth", tmp_path / "ro" / name)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "ermission denied" in err
    assert list((tmp_path / "ro").iterdir()) == []


def test_a_failed_write_leaves_nothing_behind(tmp_path, sd, monkeypatch):
    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 4096 vs 0")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"out.pth: cannot write"):
        write_state_dict(sd, tmp_path / "out.pth")
    assert list(tmp_path.iterdir()) == []
