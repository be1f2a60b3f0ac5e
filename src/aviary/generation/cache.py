"""A prefix-state cache: the state (and next-token logits) after a token sequence, LRU, bounded in bytes.

An RWKV state is a few MB whatever the length of the text behind it, so keeping the state after a
system prompt or a chat history is cheap, and a request that starts with a cached prefix skips
recomputing it: `lookup(tokens)` returns the longest cached prefix of `tokens`.

Entries live in namespaces: a lookup finds only prefixes stored under its own namespace. A server gives each
client (API key) its own, so whether a prefix is cached, and how fast a prompt is prefilled, tells a client
nothing about what another client sent. The byte budget is shared by all namespaces.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from aviary.state import RWKVState

__all__ = ["CachedPrefix", "StateCache"]


@dataclass(frozen=True)
class CachedPrefix:
    length: int  # how many leading tokens this entry covers
    state: RWKVState  # batch of one, after those tokens
    logits: torch.Tensor  # [V] float32, the prediction for the next token

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.logits.numel() * self.logits.element_size()


class StateCache:
    """LRU map from token prefixes to states. `max_bytes` bounds the memory of everything stored."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[Hashable, tuple[int, ...]], CachedPrefix] = OrderedDict()  # (ns, tokens)
        self._lengths: dict[int, int] = {}  # prefix length -> number of entries with it
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: Sequence[int], namespace: Hashable = None) -> CachedPrefix | None:
        """The entry for the longest prefix of `tokens` (possibly all of them) cached in `namespace`, or None."""
        for n in sorted((n for n in self._lengths if n <= len(tokens)), reverse=True):
            key = (namespace, tuple(tokens[:n]))
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
        self.misses += 1
        return None

    def put(self, tokens: Sequence[int], state: RWKVState, logits: torch.Tensor, namespace: Hashable = None) -> None:
        """Remember, in `namespace`, the state after `tokens` (batch of one) and the logits [V] for the next token."""
        if state.batch_size != 1:
            raise ValueError(f"cache entries are single sequences, got a state with batch {state.batch_size}")
        if not tokens:
            return
        key = (namespace, tuple(tokens))
        entry = CachedPrefix(len(tokens), state.detach(), logits.detach().reshape(-1))
        if entry.nbytes > self.max_bytes:
            return
        self._remove(key)
        self._entries[key] = entry
        self._lengths[entry.length] = self._lengths.get(entry.length, 0) + 1
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            self._remove(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self._lengths.clear()
        self.nbytes = 0

    def _remove(self, key: tuple[Hashable, tuple[int, ...]]) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.nbytes -= entry.nbytes
        self._lengths[entry.length] -= 1
        if not self._lengths[entry.length]:
            del self._lengths[entry.length]
