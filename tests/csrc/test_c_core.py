"""The numeric C core (src/aviary/csrc/*.c without module.c) built alone, without Python headers, with its C
self-test (tests/csrc/selftest.c: every instruction-set table the CPU runs against double-precision reference
loops and hand-computed values): natively, and cross-compiled for aarch64 with Debian's
gcc-aarch64-linux-gnu and run under qemu-user (`apt-get install gcc-aarch64-linux-gnu qemu-user`; these
tests skip without them). scripts/check_c_core.sh does the same from the shell and also checks the NEON
code of the generic path."""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "src" / "aviary" / "csrc"
SELFTEST = Path(__file__).resolve().with_name("selftest.c")
CORE = sorted(p for p in CSRC.glob("*.c") if p.name != "module.c")
LAST = re.compile(r"^selftest: (\d+) passed, (\d+) failed$")
XCC = "aarch64-linux-gnu-gcc"
INSTALL = "apt-get install gcc-aarch64-linux-gnu qemu-user"
BUILD_TIMEOUT = 300  # seconds per compiler run (~10 s on 2 cores)

pytestmark = pytest.mark.slow


def _native_cc():
    if os.environ.get("CC"):
        cc = shlex.split(os.environ["CC"])
        return cc if shutil.which(cc[0]) else None
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return None


def _qemu():
    return next((q for q in ("qemu-aarch64", "qemu-aarch64-static") if shutil.which(q)), None)


def _build(cc, flags, out):
    """The self-test and the core, one compiler process per file (in parallel), then linked."""
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    objs, procs = [], []
    for src in [SELFTEST, *CORE]:
        obj = out.parent / f"{out.name}-{src.stem}.o"
        cmd = [*nice, *cc, *flags, "-Wall", "-Wextra", f"-I{CSRC}", "-c", str(src), "-o", str(obj)]
        procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        objs.append(str(obj))
    errors = []
    for cmd, p in procs:
        try:
            log, _ = p.communicate(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            log, _ = p.communicate()
            errors.append(f"timed out: {shlex.join(cmd)}")
        if p.returncode:
            errors.append(f"{shlex.join(cmd)}\n{log}")
    if errors:
        pytest.fail("the C core does not compile:\n" + "\n".join(errors))
    link = subprocess.run(
        [*cc, *flags, *objs, "-lm", "-o", str(out)], capture_output=True, text=True, timeout=BUILD_TIMEOUT
    )
    if link.returncode:
        pytest.fail(f"linking the self-test failed:\n{link.stdout}{link.stderr}")
    return out


def _run(cmd, timeout=300):
    """Runs the self-test; returns its output after checking it ends `selftest: N passed, 0 failed`."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    lines = out.strip().splitlines()
    m = LAST.match(lines[-1]) if lines else None
    assert m, f"no summary line (exit {r.returncode}):\n{out[-4000:]}"
    failures = "\n".join(line for line in lines if line.startswith("FAIL"))
    assert int(m.group(2)) == 0 and r.returncode == 0, f"{lines[-1]}:\n{failures[-6000:]}"
    assert int(m.group(1)) > 0
    return out


@pytest.fixture(scope="session")
def native_selftest(tmp_path_factory):
    cc = _native_cc()
    if cc is None:
        pytest.skip("no C compiler (cc, gcc, clang or $CC)")
    return _build(cc, ["-O3", "-pthread"], tmp_path_factory.mktemp("c_core") / "selftest-native")


@pytest.fixture(scope="session")
def aarch64_selftest(tmp_path_factory):
    if not shutil.which(XCC):
        pytest.skip(f"no {XCC} to cross-compile for aarch64 ({INSTALL})")
    # -static: runs under qemu-user without an aarch64 sysroot; the default -march=armv8-a has NEON
    return _build([XCC], ["-O3", "-static", "-pthread"], tmp_path_factory.mktemp("c_core") / "selftest-aarch64")


def test_core_has_no_python_headers():
    """Only module.c may include Python.h: the rest builds alone (and cross-compiles)."""
    assert CORE and SELFTEST.exists()
    include = re.compile(r'#\s*include\s*[<"](Python|py\w*)\.h')
    offenders = [p.name for p in [*CORE, *CSRC.glob("*.h")] if include.search(p.read_text())]
    assert offenders == [], f"Python headers in the numeric core: {offenders}"


def test_native_selftest(native_selftest):
    out = _run([str(native_selftest)])
    isas = re.search(r"ISAs run: ([^;]*);", out)
    assert isas and "generic" in isas.group(1).split(), out.splitlines()[0]


def test_aarch64_cross_compiles(aarch64_selftest):
    with open(aarch64_selftest, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64


def test_aarch64_selftest_under_qemu(aarch64_selftest):
    qemu = _qemu()
    if qemu is None:
        pytest.skip(f"no qemu-aarch64 or qemu-aarch64-static to run the aarch64 self-test ({INSTALL})")
    # cortex-a53: plain ARMv8.0-A with NEON, what every aarch64 CPU has
    out = _run([qemu, "-cpu", "cortex-a53", str(aarch64_selftest)])
    assert "selftest: aarch64; ISAs run: generic;" in out, out.splitlines()[0]
