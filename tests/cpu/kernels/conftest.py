"""Aviary's C kernels against their references. Every test in this folder runs once for each instruction set
this machine can execute (`cpu.runnable_isas()`: AVX-512, AVX2, the portable path), so a machine with AVX-512
also tests the paths of CPUs without it. (tests/cpu/test_cpu_isa.py, one folder up, picks instruction sets
itself, so it is not in this folder.)"""

import pytest

from aviary import cpu
from kernel_isas import C_ISAS


@pytest.fixture(autouse=True, params=C_ISAS or ["torch"])
def isa(request):
    """Each test, once per instruction set this CPU runs."""
    before = cpu.use_isa(request.param)
    yield request.param
    cpu.use_isa(before)
