"""benchmarks/bench_gpu.py: its plumbing, in its --cpu-smoke mode (tiny shapes, the same code paths as on a GPU; the
GPU-only parts are recorded as skipped with their reason). No number here means anything."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules["bench_gpu"]


def test_cpu_smoke_runs_every_part_and_records_what_it_skipped(bench, tmp_path, capsys):
    assert bench.main(["--cpu-smoke", "--out", str(tmp_path), "--peak-tflops", "0.5"]) == 0
    data = json.loads((tmp_path / "gpu_results.json").read_text())
    assert data["environment"]["mode"] == "cpu-smoke" and data["environment"]["peak_bf16_tflops"] == 0.5
    T = data["shapes"]["timemix_tokens"]
    assert sorted(r["T"] for r in data["attention"]) == T and all(r["fwd_bwd_ms"] > 0 for r in data["attention"])
    timemix = data["timemix"]
    for version in (4, 5, 6, 7):
        ran = [r for r in timemix if r["version"] == version and r["backend"] == "chunked"]
        assert sorted(r["T"] for r in ran) == T and all(r["fwd_bwd_ms"] > 0 for r in ran), ran
    fla = [r for r in timemix if r["backend"] == "fla"]
    assert {r["version"] for r in fla} == {5, 6, 7}  # RWKV-4's op has no fla backend
    assert all("needs a CUDA device" in r["skipped"] for r in fla)
    assert not [r for r in timemix if r["backend"] == "recurrent"]
    assert not [r for r in data["timemix"] + data["train"] + data["decode"] if "error" in r]
    (train,) = [r for r in data["train"] if r["backend"] == "chunked"]
    assert train["tokens_per_s"] > 0 and train["mfu"] == pytest.approx(
        train["tokens_per_s"] * train["model_gflop_per_token"] * 1e9 / 0.5e12)
    decode = {(r["batch"], r["mode"]): r for r in data["decode"]}
    assert set(decode) == {(b, m) for b in (1, 4) for m in ("eager", "graph", "engine", "engine+graph")}
    assert all(decode[b, m]["tokens_per_s"] > 0 for b in (1, 4) for m in ("eager", "engine"))
    assert all("CUDA" in decode[b, m]["skipped"] for b in (1, 4) for m in ("graph", "engine+graph"))
    out = capsys.readouterr().out
    assert "| RWKV-7 | chunked |" in out and "| RWKV-5 | fla | skipped | skipped |" in out


def test_a_part_run_again_replaces_its_rows_and_keeps_the_others(bench, tmp_path):
    for _ in range(2):
        assert bench.main(["--cpu-smoke", "--out", str(tmp_path), "--parts", "timemix"]) == 0
    data = json.loads((tmp_path / "gpu_results.json").read_text())
    data["decode"] = [{"batch": 1, "mode": "eager", "tokens_per_s": 1.0}]
    (tmp_path / "gpu_results.json").write_text(json.dumps(data))
    assert bench.main(["--cpu-smoke", "--out", str(tmp_path), "--parts", "timemix"]) == 0
    again = json.loads((tmp_path / "gpu_results.json").read_text())
    assert len(again["attention"]) == len(again["shapes"]["timemix_tokens"])  # not appended to the first run's
    assert len(again["timemix"]) == len(data["timemix"]) and again["decode"] == data["decode"]


def test_a_failing_measurement_is_recorded_and_the_rest_goes_on(bench, tmp_path):
    results = bench.Results(tmp_path / "r.json")

    def broken():
        raise RuntimeError("CUDA out of memory\nmore lines")

    bench.attempt(results, "timemix", {"T": 1}, broken)
    bench.attempt(results, "timemix", {"T": 2}, lambda: {"fwd_bwd_ms": 1.0})
    saved = json.loads((tmp_path / "r.json").read_text())["timemix"]
    assert saved == [{"T": 1, "error": "RuntimeError: CUDA out of memory"}, {"T": 2, "fwd_bwd_ms": 1.0}]
    assert "error: RuntimeError" in bench.markdown({"shapes": {"timemix_tokens": [1]},
                                                    "timemix": [{"version": 7, "backend": "fla", **saved[0]}]})


@pytest.mark.parametrize("name, tflops", [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                          ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0)])
def test_peak_by_device_name(bench, monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert bench.peak_flops(torch.device("cuda"), None)[0] == tflops * 1e12
    assert bench.peak_flops(torch.device("cuda"), 100.0)[0] == 100e12  # --peak-tflops wins


def test_unknown_device_has_no_peak(bench, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    peak, why = bench.peak_flops(torch.device("cuda"), None)
    assert peak is None and "--peak-tflops" in why


def test_model_flops_formula(bench):
    """6 x the matmul parameters (not the embedding) + 3 x the delta rule's 8 N^2 per head and layer."""
    from aviary.model import RWKV
    from aviary.testing import random_config

    model = RWKV(random_config(7, n_layer=2, n_embd=32, head_size=16, vocab_size=50))
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n != "emb.weight")
    assert bench.model_flops_per_token(model) == 6 * matmul + 3 * 2 * 2 * 8 * 16**2


@pytest.mark.parametrize("argv, message", [(["--cpu-smoke", "--parts", "bogus"], "--parts"),
                                           (["--cpu-smoke", "--peak-tflops", "0"], "--peak-tflops")])
def test_bad_arguments(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_asks_for_cpu_smoke(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main([])
    assert "--cpu-smoke" in capsys.readouterr().err


def test_gpu_check_script_runs_its_steps_on_a_cpu(tmp_path):
    """scripts/gpu_check.sh --cpu-smoke: the GPU-marked tests (all skipped here), then the benchmark part asked for;
    its files land in OUT_DIR."""
    out = tmp_path / "out"
    script = BENCH.parents[1] / "scripts" / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script), "--cpu-smoke", "--parts", "decode", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {p.name for p in out.iterdir()} >= {"gpu_tests.log", "gpu_tests.xml", "gpu_results.json", "summary.md"}
    summary = (out / "summary.md").read_text()
    assert "tests exit code 0" in summary and "benchmark part decode: exit code 0" in summary
    assert "### Decode" in summary and "timemix" not in json.loads((out / "gpu_results.json").read_text())
    assert "skipped" in (out / "gpu_tests.log").read_text()


def test_gpu_check_script_usage():
    script = BENCH.parents[1] / "scripts" / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage: bash scripts/gpu_check.sh" in proc.stderr
