"""`aviary eval ...` on a small random-weight RWKV-7 with the World vocabulary (the `checkpoint` fixture):
the commands print and write what the Python API computes, and bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import aviary
from aviary.cli import main
from aviary.eval.precision import compare, compare_logits, token_segments

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 4


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": TEXT[i:] + str(i)}) + "\n" for i in range(0, 40, 10)))
    return path


def test_ppl_command_writes_what_the_api_computes(checkpoint, text_file, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "-m", str(checkpoint), str(text_file), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    (r,) = json.loads(out.read_text())["results"]
    model = aviary.load(checkpoint)
    want = aviary.eval.perplexity(model, aviary.load_tokenizer(version=7), [text_file])[0]
    assert r["perplexity"] == pytest.approx(want.perplexity, rel=1e-6) and r["tokens"] == want.tokens
    assert f"{want.perplexity:.2f}" in printed and "bits/byte" in printed


def test_lambada_command(checkpoint, tmp_path, capsys, monkeypatch):
    f = tmp_path / "lam.jsonl"
    f.write_text('{"text": "the cat sat on the mat"}\n{"context": "the dog sat on the", "target": "rug"}\n')
    out = tmp_path / "lam.json"
    assert main(["eval", "lambada", "-m", str(checkpoint), "--file", str(f), "--protocol", "rwkv-lm",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["passages"] == 2 and r["protocol"] == "rwkv-lm" and "lam.jsonl" in capsys.readouterr().out
    from aviary.commands import eval as eval_command

    monkeypatch.setattr(eval_command, "LAMBADA_DEFAULT", tmp_path / "absent.jsonl.xz")
    assert main(["eval", "lambada", "-m", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--file" in err and "absent.jsonl.xz" in err


def test_loss_by_position_command_writes_csv_and_png(checkpoint, text_file, tmp_path, capsys):
    assert main(["eval", "loss-by-position", "-m", str(checkpoint), str(text_file), "--out", str(tmp_path / "o"),
                 "--per-octave", "1"]) == 0
    rows = (tmp_path / "o" / "loss_by_position.csv").read_text().splitlines()
    assert rows[0] == "start,end,count,loss" and rows[1].startswith("0,1,4,")
    pytest.importorskip("matplotlib")
    assert (tmp_path / "o" / "loss_by_position.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_of_a_precision_with_itself_is_exact(checkpoint, text_file, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert main(["eval", "compare", "-m", str(checkpoint), str(text_file), "--dtypes", "fp32,bf16",
                 "--tokens", "96", "--segment", "48", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    same, bf16 = r["variants"]["fp32"], r["variants"]["bf16"]
    assert same["kl_mean"] == 0 and same["top1_agree"] == 1 and same["loss"] == same["loss_ref"] == r["loss_ref"]
    assert bf16["kl_mean"] > 0 and r["positions"] == 96
    assert "bf16" in capsys.readouterr().out


def test_compare_api_and_segments(checkpoint):
    docs = [TEXT] * 3
    tok = aviary.load_tokenizer(version=7)
    segs = token_segments(docs, tok, 50, 20)
    assert [len(s) for s in segs] == [20, 20, 10]
    with pytest.raises(ValueError, match="only"):
        token_segments(["a b"], tok, 50, 20)
    with pytest.raises(ValueError, match="unknown precision"):
        compare(checkpoint, docs, variants=["fp8"])
    x = torch.randn(5, 7)
    assert compare_logits(x, x, torch.tensor([1, 2, 3, 4, -1]))["kl_max"] == 0


@pytest.mark.parametrize("argv, message", [
    (["eval", "ppl", "--window", "0", "X"], "--window must be at least 1"),
    (["eval", "ppl", "no-such-file.txt"], "no-such-file.txt"),
    (["eval", "compare", "--dtypes", "fp8"], "unknown precision 'fp8'"),
])
def test_bad_input_is_one_line(checkpoint, text_file, capsys, argv, message):
    argv = [a if a != "X" else str(text_file) for a in argv]
    assert main([*argv[:2], "-m", str(checkpoint), *argv[2:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


MEMORY_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from aviary.eval.ppl import perplexity
    from aviary.model import RWKV
    from aviary.testing import ByteTokenizer, random_config, random_state_dict
    torch.set_num_threads(1)
    config = random_config(7, n_layer=1, n_embd=32, head_size=16, vocab_size=260)
    model = RWKV(config)
    model.load_state_dict(random_state_dict(config))
    n = int(sys.argv[2])
    with open(sys.argv[1], "w") as f:
        f.write("".join(chr(97 + (i * 7919) % 26) for i in range(n)))
    perplexity(model, ByteTokenizer(), [sys.argv[1]], chunk_len=512)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


@pytest.mark.slow
def test_ppl_memory_is_flat_in_document_length(tmp_path):
    def peak(n: int) -> int:
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / f"{n}.txt"), str(n)],
                             capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1",
                                                                                "PATH": "/usr/bin:/bin"})
        return int(out.stdout.split()[-1])

    small, large = peak(4096), peak(65536)
    assert large <= 1.1 * small, (small, large)
