"""Suite-wide options and the fixtures that tests in more than one folder share. A fixture that one folder's
tests share lives in that folder's conftest.py (tokenizer/, cpu/kernels/); one used by a single file stays in
that file, as do fixtures that differ from file to file (several `model`s: their versions and sizes differ).

The tests mirror the package: tests/X/ holds the tests of aviary/X/ (cli/ those of aviary/cli.py and
aviary/commands/), tests/test_Y.py those of aviary/Y.py. There are no __init__.py files: pytest's default
`prepend` import mode puts each test file's folder on sys.path and imports it by its basename, so basenames
are unique across the suite. This file's folder, tests/, goes on sys.path the same way before any test is
imported, which is how `from oracle import run_oracle` (tests/oracle.py, a helper module that is also run as
a script) works from every folder."""

from __future__ import annotations

import pytest

FUZZ_EXAMPLES_CI = 40


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-examples", type=int, default=FUZZ_EXAMPLES_CI, metavar="N",
        help=f"cases per fuzz target in tests/fuzz/ (default {FUZZ_EXAMPLES_CI}, derandomised so every run "
             "checks the same cases; any other value draws fresh random cases: fuzz longer on demand)")


def pytest_configure(config):
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # only tests/fuzz needs it, and tests/test_fuzz.py skips without it
        return
    n = config.getoption("--fuzz-examples")
    settings.register_profile(
        "aviary", max_examples=max(1, n), deadline=None, derandomize=(n == FUZZ_EXAMPLES_CI), database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile("aviary")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small random-weight RWKV-7 with the World vocabulary size, `tiny-v7.safetensors` (seed 5), written
    once per test module: for the CLI verbs (cli/) and the server (serve/, whose model id is the file's stem)."""
    from aviary.testing import random_config, save_random_checkpoint  # here: the fuzz runs need no torch

    path = tmp_path_factory.mktemp("checkpoint") / "tiny-v7.safetensors"
    save_random_checkpoint(path, random_config(7, n_layer=2, n_embd=64, head_size=32, vocab_size=65536), seed=5)
    return path


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test: tiny matrices gain nothing from a second thread, which on a shared 2-core
    machine only waits (use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
