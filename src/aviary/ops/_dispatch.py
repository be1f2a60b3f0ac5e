"""The one place that turns a `backend=` name into a function."""

from collections.abc import Callable, Mapping


def pick(op: str, backends: Mapping[str, Callable], backend: str) -> Callable:
    try:
        return backends[backend]
    except KeyError:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {sorted(backends)}") from None


# A one-token WKV step over a state of at least this many numbers (1 MiB of float32; a batch of 2 for
# an L12-D768 model's 64x64 heads) runs on all threads inside a decode step's one-thread region
# (aviary._threads): a batch-16 RWKV-7 step moves ~18 MB of state per layer, memory-bound on one core.
PARALLEL_STATE_NUMEL = 1 << 18
