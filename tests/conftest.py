"""Suite-wide options. Fixtures stay in the test files that use them."""

from __future__ import annotations

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
