"""benchmarks/bench_scheduler.py runs end to end on a tiny model and reports every level and budget it was asked for."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scheduler.py"


@pytest.mark.slow  # a fresh interpreter imports torch and writes a 65,536-token model: ~10 s
def test_bench_scheduler_runs(tmp_path):
    out = tmp_path / "scheduler.json"
    subprocess.run([sys.executable, str(SCRIPT), "--layers", "1", "--width", "64", "--levels", "2", "3",
                    "--budgets", "16", "1024", "--repeats", "2", "--max-tokens", "4", "--json", str(out)],
                   check=True, timeout=300)
    runs = json.loads(out.read_text())["runs"]
    assert [(r["concurrency"], r["max_prefill_tokens"]) for r in runs] == [(2, 16), (2, 1024), (3, 16), (3, 1024)]
    for r in runs:
        assert r["errors"] == 0 and len(r["runs"]) == 2
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] and r["tokens_per_s"] > 0
