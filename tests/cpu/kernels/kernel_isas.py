"""What the kernel tests in this folder share: the instruction sets this CPU runs in C (the conftest's `isa`
fixture runs every test once per set), and the marks that skip a test where `aviary._kernels` is not built.
A plain module, not the conftest, so that test files can import it (this folder is on sys.path: pytest's
default `prepend` import mode puts a test file's folder there)."""

import pytest
import torch

from aviary import cpu

C_ISAS = [isa for isa in cpu.runnable_isas() if isa != "torch"]
built = pytest.mark.skipif(not C_ISAS, reason=f"aviary._kernels is not built: {cpu.build_error()}")
needs = dict.fromkeys((torch.float32, torch.bfloat16, torch.int8), built)  # every C path has all three
