"""Training data: binidx round trip and compatibility with the Megatron/RWKV-LM layout, `prepare` on
text / JSONL / compressed inputs, clear errors for bad input, and the window sampler."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import random
import signal
import struct

import numpy as np
import pytest

from aviary.cli import main
from aviary.train.data import BinIdx, DataError, prepare, write_binidx
from aviary.train.sampler import WindowSampler, is_prime, magic_prime


def fake_encode(texts):
    """A stand-in tokenizer (ids 1..96) so these tests need no vocabulary and run in milliseconds."""
    return [[(ord(c) % 96) + 1 for c in t] for t in texts]


def megatron_binidx(prefix, docs):
    """Write binidx the way Megatron's MMapIndexedDatasetBuilder (used by RWKV-LM's make_data.py) does,
    independently of aviary's writer."""
    arrays = [np.asarray(d, dtype=np.uint16) for d in docs]
    with open(f"{prefix}.bin", "wb") as f:
        for a in arrays:
            f.write(a.tobytes(order="C"))
    sizes = [a.size for a in arrays]
    pointers, addr = [], 0
    for s in sizes:
        pointers.append(addr)
        addr += s * 2
    doc_idx = list(range(len(sizes) + 1))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", 8))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(np.array(sizes, dtype=np.int32).tobytes(order="C"))
        f.write(np.array(pointers, dtype=np.int64).tobytes(order="C"))
        f.write(np.array(doc_idx, dtype=np.int64).tobytes(order="C"))


def test_reads_megatron_binidx_and_writes_the_same_bytes(tmp_path):
    docs = [[5, 6, 7, 0], [65535, 1, 0], [9, 0]]
    megatron_binidx(tmp_path / "ref", docs)
    ds = BinIdx(tmp_path / "ref")
    assert len(ds) == 9 and ds.n_documents == 3 and ds.dtype == np.uint16
    assert ds.document(1).tolist() == [65535, 1, 0]
    assert ds.get(2, 4).tolist() == [7, 0, 65535, 1]  # the flat stream crosses documents
    write_binidx(tmp_path / "ours", docs)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes()


@pytest.mark.parametrize("suffix,opener", [(".jsonl", open), (".jsonl.gz", gzip.open), (".jsonl.xz", lzma.open),
                                           (".jsonl.bz2", bz2.open)])
def test_prepare_jsonl_any_compression(tmp_path, suffix, opener):
    path = tmp_path / f"docs{suffix}"
    with opener(path, "wt", encoding="utf-8") as f:
        for text in ("hello", "world!", "é ü"):
            f.write(json.dumps({"text": text, "source": "t"}) + "\n")
    r = prepare([path], tmp_path / "out", encode_batch=fake_encode, progress=False)
    assert (r.documents, r.tokens) == (3, 5 + 1 + 6 + 1 + 3 + 1)
    ds = BinIdx(tmp_path / "out")
    assert ds.document(0).tolist() == fake_encode(["hello"])[0] + [0]
    assert ds.document(2).tolist()[-1] == 0


def test_prepare_text_files_are_one_document_each(tmp_path):
    (tmp_path / "a.txt").write_text("first file\nsecond line")
    (tmp_path / "b.txt").write_text("other")
    r = prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", encode_batch=fake_encode,
                progress=False)
    assert r.documents == 2 and len(BinIdx(tmp_path / "out")) == 22 + 1 + 5 + 1


@pytest.mark.parametrize("content,message", [
    (b"", "empty"),
    (b"ok text then \xff\xfe bad bytes", "not UTF-8"),
    (b"   \n\n", "no text"),
])
def test_bad_inputs_fail_before_tokenizing(tmp_path, content, message):
    good = tmp_path / "good.txt"
    good.write_text("fine")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    calls = []
    with pytest.raises(DataError, match=message) as e:
        prepare([good, bad], tmp_path / "out", encode_batch=lambda t: calls.append(t) or fake_encode(t),
                progress=False)
    assert "bad.txt" in str(e.value) and not calls  # named the file; nothing was tokenized
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()


def test_missing_input_and_bad_jsonl(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        prepare([tmp_path / "nope.jsonl"], tmp_path / "out", encode_batch=fake_encode, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not a JSON object with a 'text' field"):
        prepare([bad], tmp_path / "out", encode_batch=fake_encode, progress=False)
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.parametrize("suffix,compress", [(".gz", gzip.compress), (".xz", lzma.compress)])
def test_truncated_compressed_input_names_the_file(tmp_path, suffix, compress):
    rng = random.Random(0)  # text that does not compress to under 64 KiB, so the cut is past check_input's look
    lines = "".join(json.dumps({"text": rng.randbytes(100).hex()}) + "\n" for _ in range(1500)).encode()
    path = tmp_path / f"cut.jsonl{suffix}"
    path.write_bytes(compress(lines)[:65536])
    with pytest.raises(DataError, match=r"cut\.jsonl\.\w+: not a readable \.\w+ file \(truncated or corrupt\?\) "
                                        r"after line \d+"):
        prepare([path], tmp_path / "out", encode_batch=fake_encode, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no output, no temporary files


def test_lone_surrogate_names_the_file_and_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "a\\ud800b"}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'text' has a lone surrogate '\\ud800' at character 1"):
        prepare([path], tmp_path / "out", encode_batch=fake_encode, progress=False)


def test_output_that_is_a_directory_leaves_nothing_behind(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    (tmp_path / "out.bin").mkdir()
    with pytest.raises(DataError, match=r"out\.bin: is a directory"):
        prepare([tmp_path / "x.txt"], tmp_path / "out", encode_batch=fake_encode, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "x.txt"]


def test_a_failed_rename_leaves_no_temporary_files(tmp_path, monkeypatch):
    def fail(src, dst):
        raise PermissionError(f"cannot replace {dst}")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(PermissionError):
        write_binidx(tmp_path / "out", [[1, 2, 0]])
    assert list(tmp_path.iterdir()) == []


def _idx_with(tmp_path, name, edit):
    """A copy of a good 3-document dataset whose index has been changed by `edit(bytearray)`."""
    write_binidx(tmp_path / name, [[5, 6, 7, 0], [8, 0], [9, 9, 0]])
    idx = bytearray((tmp_path / f"{name}.idx").read_bytes())
    edit(idx)
    (tmp_path / f"{name}.idx").write_bytes(idx)
    return tmp_path / name


def test_damaged_binidx_names_the_file(tmp_path):
    def huge(idx):
        idx[18:26] = struct.pack("<Q", 2**40)

    with pytest.raises(DataError, match=r"huge\.idx: lists 1,099,511,627,776 documents"):
        BinIdx(_idx_with(tmp_path, "huge", huge))

    def negative(idx):  # sizes 4, 2, 3 -> 4, -2, 7: the same total, so only the sign check catches it
        idx[34:46] = np.array([4, -2, 7], dtype=np.int32).tobytes()

    with pytest.raises(DataError, match=r"negative\.idx: document 1 has a negative size \(-2\)"):
        BinIdx(_idx_with(tmp_path, "negative", negative))

    def far(idx):
        idx[46:54] = struct.pack("<q", 10**6)

    with pytest.raises(DataError, match=r"far\.idx: a document pointer lies outside far\.bin"):
        BinIdx(_idx_with(tmp_path, "far", far))
    odd = _idx_with(tmp_path, "odd", lambda idx: None)
    with open(f"{odd}.bin", "ab") as f:
        f.write(b"\x01")
    with pytest.raises(DataError, match=r"odd\.bin: 19 bytes is not a whole number of uint16 tokens"):
        BinIdx(odd)


def test_bad_binidx_is_refused(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        BinIdx(tmp_path / "missing")
    (tmp_path / "x.bin").write_bytes(b"\x01\x00")
    (tmp_path / "x.idx").write_bytes(b"NOTANIDX" + b"\x00" * 40)
    with pytest.raises(DataError, match="bad magic"):
        BinIdx(tmp_path / "x")


def test_cli_prepare_and_inspect(tmp_path, capsys):
    pytest.importorskip("aviary.tokenizer")
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"Document number {i}. " * 20}) for i in range(30)) + "\n")
    assert main(["data", "prepare", str(src), str(tmp_path / "ds"), "--quiet"]) == 0
    assert "30 documents" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path / "ds"), "--ctx-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "windows" in out and "Document number 0" in out
    # the World tokenizer's ids, each document ended by 0
    from aviary.tokenizer import WorldTokenizer

    assert BinIdx(tmp_path / "ds").document(3).tolist() == WorldTokenizer().encode("Document number 3. " * 20) + [0]
    assert main(["data", "prepare", str(tmp_path / "missing.txt"), str(tmp_path / "o")]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err


@pytest.fixture
def fake_tokenizer(monkeypatch):
    """`aviary data prepare` with fake_encode instead of the World tokenizer."""
    monkeypatch.setattr("aviary.train.data._default_encoder", lambda num_threads: fake_encode)


def test_cli_prepare_replaces_a_dataset_only_with_force(tmp_path, capsys, fake_tokenizer):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    out = str(tmp_path / "ds")
    assert main(["data", "prepare", str(tmp_path / "a.txt"), out, "--quiet"]) == 0
    assert main(["data", "prepare", str(tmp_path / "b.txt"), out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "ds.bin and " in err and "ds.idx already exist; pass --force" in err
    assert BinIdx(out).document(0).tolist() == fake_encode(["first"])[0] + [0]
    assert main(["data", "prepare", str(tmp_path / "b.txt"), out, "--quiet", "--force"]) == 0
    assert BinIdx(out).document(0).tolist() == fake_encode(["second"])[0] + [0]


def test_cli_prepare_cleans_up_on_sigterm(tmp_path, monkeypatch):
    """SIGTERM in the middle of tokenizing: the temporary files go, and the exit code is 128 + 15."""
    def encode_then_terminated(texts):
        os.kill(os.getpid(), signal.SIGTERM)
        return fake_encode(texts)

    monkeypatch.setattr("aviary.train.data._default_encoder", lambda num_threads: encode_then_terminated)
    (tmp_path / "a.txt").write_text("text")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        main(["data", "prepare", str(tmp_path / "a.txt"), str(tmp_path / "ds"), "--quiet"])
    assert e.value.code == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("argv, message", [
    (["--ctx-len", "0"], "--ctx-len 0: must be >= 1"),
    (["--show", "-1"], "--show and --chars must be >= 0"),
])
def test_cli_inspect_bad_options(tmp_path, capsys, argv, message):
    write_binidx(tmp_path / "ds", [[1, 2, 3, 0]] * 10)
    assert main(["data", "inspect", str(tmp_path / "ds"), *argv]) == 2
    assert capsys.readouterr().err.strip() == f"aviary data: error: {message}"


def test_sampler_refuses_ctx_len_0():
    with pytest.raises(ValueError, match="ctx_len=0 must be >= 1"):
        WindowSampler(1000, 0)


@pytest.mark.parametrize("n_tokens,ctx", [(1000, 16), (12345, 64), (50_001, 100)])
def test_sampler_visits_every_window_once_per_epoch(n_tokens, ctx):
    s = WindowSampler(n_tokens, ctx, seed=3)
    W = s.n_windows
    assert (n_tokens - 1) // ctx == W
    for epoch in range(2):
        windows = [s.window(epoch * W + i) for i in range(W)]
        assert sorted(windows) == list(range(W))
    first, second = [s.window(i) for i in range(W)], [s.window(W + i) for i in range(W)]
    assert first != second  # a new order each epoch
    assert [s.window(i) for i in range(20)] == [WindowSampler(n_tokens, ctx, seed=3).window(i) for i in range(20)]
    assert max(s(k) for k in range(W)) + ctx + 1 <= n_tokens  # every sample fits in the stream


def test_magic_prime_is_rwkv_lms():
    for n in (1000, 26_668, 12_345):
        p = magic_prime(n)
        assert is_prime(p) and p % 3 == 2 and p <= n - 1 and p / n > 0.9
        assert not any(is_prime(q) and q % 3 == 2 for q in range(p + 1, n))
