"""Which window of the token stream each training sample reads: every window exactly once per epoch, in a
fixed pseudo-random order that depends only on (seed, epoch, sample number).

The stream of n tokens is cut into W = (n - 1) // ctx_len aligned windows (each sample reads ctx_len + 1
tokens: inputs and the targets shifted by one). RWKV-LM's "magic prime" scheme (reference section 8.5)
maps sample ii to window (factor * ii^3) mod p, with p a prime, p % 3 == 2, so that cubing is a
bijection on Z_p; it takes p <= W and so skips the last few percent of windows. Here p is the smallest
such prime >= W and a sample whose image lands at or beyond W walks the cycle again ("cycle walking"),
which keeps the map a bijection on exactly the W windows. The order is a pure function of the sample
number, so a run resumes by restarting at a step number, and any rank of a distributed run can compute its
own samples.
"""

from __future__ import annotations

import math

__all__ = ["WindowSampler", "is_prime", "magic_prime"]

GOLDEN = (math.sqrt(5) - 1) / 2


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def magic_prime(n_windows: int) -> int:
    """RWKV-LM's prime for a dataset of `n_windows` = data_size // ctx_len: the largest prime p <=
    n_windows - 1 with p % 3 == 2 (what `compute_magic_prime.py` prints), for interoperability."""
    p = n_windows - 1
    while p > 1 and not (p % 3 == 2 and is_prime(p)):
        p -= 1
    if p < 2:
        raise ValueError(f"too few windows ({n_windows}) for a magic prime")
    return p


def _prime_at_least(n: int) -> int:
    p = max(n, 2)
    while not (p % 3 == 2 and is_prime(p)):
        p += 1
    return p


class WindowSampler:
    """`sampler(k)` -> token offset of global sample k (k = 0, 1, ...; epoch = k // n_windows)."""

    def __init__(self, n_tokens: int, ctx_len: int, seed: int = 0):
        if ctx_len < 1:
            raise ValueError(f"ctx_len={ctx_len} must be >= 1")
        self.ctx_len = ctx_len
        self.n_windows = (n_tokens - 1) // ctx_len
        if self.n_windows < 1:
            raise ValueError(f"the data has {n_tokens} tokens, fewer than one window of ctx_len+1 = {ctx_len + 1}")
        self.p = _prime_at_least(self.n_windows)
        self.factor = max(1, int(self.p * GOLDEN))
        self.seed = seed

    def window(self, k: int) -> int:
        epoch, i = divmod(k, self.n_windows)
        shift = (self.seed * 1_000_003 + epoch * 40_320) % self.p  # a different order each epoch and seed
        x = i
        while True:  # cycle walking: at most a few steps since p is close to n_windows
            x = (self.factor * pow((x + shift) % self.p, 3, self.p)) % self.p
            if x < self.n_windows:
                return x

    def __call__(self, k: int) -> int:
        return self.window(k) * self.ctx_len
