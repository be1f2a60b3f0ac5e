"""Threads for a decode step: the big matrix products on all of torch's threads, the rest on one.

A one-token step is ~75 large matrix-vector products (memory-bound, worth every core) and ~1,000 small
ops on vectors of a few hundred numbers. torch parallelises some of the small ones too (small matmuls,
bmm, group norm), and each parallel region wakes the sleeping worker threads: with
OMP_WAIT_POLICY=PASSIVE (which `aviary` sets, because spinning workers are ruinous on a shared CPU)
those wakes add up to a large share of a step (docs/benchmarks.md, Design measurements item 3).
Inside `small_ops_on_one_thread()` torch runs on one thread. The big products step back up to the full
count: Aviary's C kernels ask `kernel_threads()` (they have their own worker threads, `aviary/_kernels.c`),
and a product that falls back to torch runs inside `all_threads()`.

torch's thread count is process-wide, so two Python threads running models at the same time would
share these settings; Aviary's server runs every model step on one thread.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext

import torch

_local = threading.local()


@contextmanager
def small_ops_on_one_thread():
    """Run the body on one torch thread, remembering the current count for `all_threads`."""
    n = torch.get_num_threads()
    if n == 1 or getattr(_local, "threads", None):  # nothing to save, or already inside
        yield
        return
    _local.threads = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _local.threads = None


def kernel_threads() -> int:
    """Threads for Aviary's C kernels: the remembered count inside `small_ops_on_one_thread` (a decode
    step), 1 elsewhere. Outside a decode step torch's own OpenMP threads are busy with torch's ops, and
    with OpenMP's default wait policy they spin between ops: the kernels' worker threads would then
    fight them for the cores, and a short prefill became many times slower (docs/benchmarks.md, Inference
    item 6)."""
    return getattr(_local, "threads", None) or 1


class all_threads:  # noqa: N801 - used like a function: `with all_threads():`
    """Inside `small_ops_on_one_thread`: run the body on the remembered thread count. Elsewhere: no-op.
    (A class rather than a generator context manager: it runs ~75 times a decode step.)"""

    __slots__ = ("n",)

    def __enter__(self) -> None:
        self.n = getattr(_local, "threads", None)
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        if self.n:
            torch.set_num_threads(1)


# A one-token WKV step in torch over a state of at least this many numbers (1 MiB of float32; a batch of 2
# for an L12-D768 model's 64x64 heads) runs on all threads inside a decode step's one-thread region: a
# batch-16 RWKV-7 step moves ~18 MB of state per layer, memory-bound on one core.
PARALLEL_STATE_NUMEL = 1 << 18


def state_update_threads(numel: int):
    """The threads for a torch one-token state update of `numel` numbers: all (`all_threads`) for a big
    state, else the current ones."""
    return all_threads() if numel >= PARALLEL_STATE_NUMEL else nullcontext()
