"""Which of Aviary's C kernels run: the instruction set (ISA), chosen once per process and recorded.

At import the best set this CPU runs is picked ("avx512", "avx2", or "generic": portable C that the
compiler vectorises, SSE2 on x86-64 and NEON on aarch64). The environment variable AVIARY_CPU_ISA (read
once, at import) or `use_isa` forces a lower one, or "torch": no C kernels at all. Models record what
their decode step runs on (`aviary.cpu.DecodePath`); `aviary info --system` prints `backend_info()`.

`reference_only()` turns the kernels off in the current thread, for tests and benchmarks that compare.
"""

from __future__ import annotations

import os
import platform
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

try:  # built by setup.py; optional (no compiler): everything falls back to torch
    from aviary import _kernels
    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the build
    _kernels, _IMPORT_ERROR = None, e

__all__ = ["ENV_VAR", "ISAS", "available", "backend_info", "bf16_rounds_x", "build_error", "cpu_isa",
           "reference_only", "runnable_isas", "use_isa"]

WTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # the C code's weight type numbers
# The instruction sets, fastest first. "torch" is no C kernels at all: every product is torch's.
ISAS = ("avx512", "avx2", "generic", "torch")
ENV_VAR = "AVIARY_CPU_ISA"
# rows up to which the C kernel beats torch's matmul, per instruction set (docs/benchmarks.md, Inference items
# 1 and 9: bf16 without the dot-product kernel widens to float32 and loses to torch's AVX512_BF16 matmul past
# 2 rows). int8 reaches it through aviary.quant.Int8Linear. Where the CPU has no AVX-512, torch's bf16 and
# int8 products have no fast instructions either, and the widening kernels keep 16.
_MAX_ROWS = {
    "avx512": {torch.float32: 64, torch.bfloat16: 2, torch.int8: 64},
    "avx512+bf16": {torch.float32: 64, torch.bfloat16: 32, torch.int8: 64},
    "avx2": {torch.float32: 64, torch.bfloat16: 16, torch.int8: 16},
    "generic": {torch.float32: 64, torch.bfloat16: 16, torch.int8: 16},
}
MAX_ROWS: dict = {}  # for the instruction set in use (updated in place by use_isa)
BUILT: frozenset = frozenset()  # weight dtypes with a C kernel now (all three, or none under "torch")
_BF16_DOT = False
_local = threading.local()


def runnable_isas() -> tuple[str, ...]:
    """The instruction sets this build and CPU can run, fastest first, ending with "torch" (no C kernels)."""
    return (*(_kernels.RUNNABLE if _kernels is not None else ()), "torch")


def cpu_isa() -> str:
    """The instruction set Aviary's CPU kernels use now: "avx512", "avx2", "generic" or "torch" (none)."""
    return _kernels.isa()[0] if BUILT else "torch"


def use_isa(name: str | None = None) -> str:
    """Run Aviary's CPU kernels with `name`'s code from now on, in the whole process; returns the previous
    name. None: the best this CPU runs. "torch" turns the C kernels off (every product is torch's).

    The same choice as the environment variable AVIARY_CPU_ISA, which is read once, at import. A name
    this CPU or build cannot run is a ValueError that lists the ones it can."""
    global BUILT, _BF16_DOT
    runnable = runnable_isas()
    name = runnable[0] if name is None else name
    if name not in ISAS:
        raise ValueError(f"unknown CPU instruction set {name!r}; choose one of {', '.join(ISAS)}")
    if name not in runnable:
        why = "this CPU" if _kernels is not None else f"this install (aviary._kernels is missing: {build_error()})"
        raise ValueError(f"{why} cannot run the {name!r} kernels; it runs: {', '.join(runnable)}")
    before = cpu_isa()
    if name == "torch":
        BUILT, _BF16_DOT = frozenset(), False
        MAX_ROWS.clear()
        MAX_ROWS.update(dict.fromkeys(WTYPE, 0))
        return before
    _kernels.use_isa(name)
    _BF16_DOT = bool(_kernels.isa()[1])
    BUILT = frozenset(WTYPE)
    MAX_ROWS.clear()
    MAX_ROWS.update(_MAX_ROWS[name + ("+bf16" if _BF16_DOT else "")])
    return before


def build_error() -> str:
    """Why aviary._kernels is missing (the import error, and the build's own record where there is one),
    or "" when it is there."""
    if _kernels is not None:
        return ""
    note = Path(__file__).parent.parent / "_kernels.build-error.txt"
    record = note.read_text() if note.is_file() else \
        "(no build record: reinstall with `pip install -v .` to see the compiler's output)"
    return f"{_IMPORT_ERROR}\n{record}"


def bf16_rounds_x() -> bool:
    """Whether bfloat16 products use the CPU's bf16 dot-product instruction (AVX512_BF16), which rounds x
    to bfloat16 first, as torch's bf16 matmul does; without it x stays float32."""
    return _BF16_DOT


def available(dtype: torch.dtype) -> bool:
    """Whether a C kernel runs `dtype` weights now (built, on this CPU, not "torch", not switched off)."""
    return dtype in BUILT and not getattr(_local, "off", False)


def switched_off() -> bool:
    """Inside `reference_only()` in this thread."""
    return getattr(_local, "off", False)


@contextmanager
def reference_only():
    """Inside: every product and step takes the reference path (torch), in this thread."""
    before = getattr(_local, "off", False)
    _local.off = True
    try:
        yield
    finally:
        _local.off = before


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def backend_info() -> dict:
    """What runs a CPU decode step in this process: the CPU, the instruction sets built and runnable, the
    one in use, whether bf16 products use a dot-product instruction, torch's thread count, and why the
    C kernels are missing if they are."""
    return {"cpu": _cpu_name(), "machine": platform.machine(), "isa": cpu_isa(),
            "runnable": list(runnable_isas()), "built": list(_kernels.BUILT) if _kernels is not None else [],
            "bf16_dot": _BF16_DOT, "threads": torch.get_num_threads(), "forced": os.environ.get(ENV_VAR) or None,
            "build_error": build_error() or None}


def _choose_at_import() -> None:
    wanted = os.environ.get(ENV_VAR, "").strip().lower() or None
    try:
        use_isa(wanted)
    except ValueError as e:
        if wanted not in ISAS:  # a typo: say so at once
            raise ValueError(f"{ENV_VAR}={wanted!r}: {e}") from None
        warnings.warn(f"{ENV_VAR}={wanted!r}: {e}; using {runnable_isas()[0]!r}", RuntimeWarning, stacklevel=2)
        use_isa(None)


_choose_at_import()
