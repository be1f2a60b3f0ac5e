"""Runs each fuzz target in `tests/fuzz/fuzz_*.py` in its own process, so that a crash (a signal from native
code, an allocation past the memory limit, a hang) is a failed test with the target's output, not a dead test
run.

    pytest tests/test_fuzz.py                          # the bounded, derandomised CI run
    pytest tests/test_fuzz.py --fuzz-examples 2000     # fuzz longer, with fresh random cases
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

FUZZ_DIR = Path(__file__).parent / "fuzz"
TARGETS = sorted(FUZZ_DIR.glob("fuzz_*.py"))
MEMORY_LIMIT = 6 << 30  # address space of a target process: a loader that tries to allocate GiBs fails here
SECONDS_PER_EXAMPLE = 3.0


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS, ids=[t.stem for t in TARGETS])
def test_fuzz_target(target: Path, request, tmp_path):
    n = request.config.getoption("--fuzz-examples")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"--rootdir={FUZZ_DIR.parent}",
           str(target), f"--fuzz-examples={n}", f"--basetemp={tmp_path / 'run'}"]
    timeout = 120 + SECONDS_PER_EXAMPLE * n
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=_limit_memory,
                              cwd=FUZZ_DIR.parent.parent)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{target.name} hung: no result after {timeout:.0f} s\n{(e.stdout or '')[-4000:]}")
    out = (proc.stdout + proc.stderr)[-6000:]
    if proc.returncode < 0:
        pytest.fail(f"{target.name} crashed with {signal.Signals(-proc.returncode).name}:\n{out}")
    assert proc.returncode == 0, f"{target.name} failed (exit {proc.returncode}):\n{out}"
