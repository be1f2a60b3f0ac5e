"""benchmarks/bench_precision.py: its comparison is right, and the script runs end to end on a small model."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aviary.testing import random_config, save_random_checkpoint

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_precision.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_precision", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_against_torch(bench):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(300, 50, generator=g) * 3
    x = ref + torch.randn(300, 50, generator=g) * 0.1
    targets = torch.randint(0, 50, (300,), generator=g)
    targets[[10, 299]] = -1  # segment ends: no next token
    r = bench.compare(x, ref, targets)
    has = targets >= 0
    assert r["loss"] == pytest.approx(float(F.cross_entropy(x[has], targets[has])), rel=1e-5)
    assert r["loss_ref"] == pytest.approx(float(F.cross_entropy(ref[has], targets[has])), rel=1e-5)
    kl = F.kl_div(torch.log_softmax(x, -1), torch.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1)
    assert r["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert r["kl_max"] == pytest.approx(float(kl.max()), rel=1e-4)
    assert r["top1_agree"] == pytest.approx(float((x.argmax(-1) == ref.argmax(-1)).float().mean()))
    assert r["max_abs"] == pytest.approx(float((x - ref).abs().max()))


def test_compare_ignores_a_shift_of_the_logits(bench):
    ref = torch.randn(40, 30)
    targets = torch.randint(0, 30, (40,))
    r = bench.compare(ref + 5.0, ref, targets)  # same distribution: no KL, same loss, yet every logit moved
    assert abs(r["kl_mean"]) < 1e-10 and r["loss"] == pytest.approx(r["loss_ref"], abs=1e-6)  # float32 rounding of +5
    assert r["top1_agree"] == 1.0 and r["max_abs"] == pytest.approx(5.0)


def test_segments_come_from_spread_documents(bench):
    class Chars:
        def encode(self, s):
            return [ord(c) for c in s]

    docs = [chr(65 + i) * 50 for i in range(10)]
    segs = bench.token_segments(docs, Chars(), 40, 10)
    assert [len(s) for s in segs] == [10, 10, 10, 10]
    assert [chr(s[0]) for s in segs] == ["A", "C", "E", "G"]  # every other document
    with pytest.raises(SystemExit, match="only"):
        bench.token_segments(docs[:1], Chars(), 100, 10)


def test_script_end_to_end(tmp_path):
    ckpt = tmp_path / "m.pth"
    save_random_checkpoint(ckpt, random_config(6, n_layer=1, n_embd=64, head_size=32, vocab_size=65536))
    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps({"text": f"Document {i}: the quick brown fox jumps over the lazy dog."}) + "\n"
                            for i in range(6)))
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(ckpt), "--text", str(text), "--tokens", "24",
                           "--segment", "8", "--chunk", "3", "--no-pip", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["positions"] == 24 and r["segments"] == 3 and r["version"] == 6
    for name in ("bf16", "int8"):
        for path in ("decode", "prefill"):
            e = r["aviary"][name][path]
            assert 0 < e["rel_rms"] < 0.5 and e["kl_mean"] >= 0 and 0 <= e["top1_agree"] <= 1
    same = r["aviary"]["fp32 decode vs prefill"]  # two forms of the same fp32 math
    assert same["rel_rms"] < 1e-4 and same["loss"] == pytest.approx(same["loss_ref"], abs=1e-5)
    assert "| aviary int8 | prefill |" in proc.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--tokens", "0", "--no-pip"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--tokens must be at least 1" in bad.stderr
