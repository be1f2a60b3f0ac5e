"""A batch's one-token decode step, captured in a CUDA graph and replayed.

On a GPU a decode step of a small model is launch-bound: each block launches a few dozen small kernels, and for
a batch of 64 their arithmetic takes less time than launching them one by one from Python. A CUDA graph records
the launches of one step once; a replay then issues all of them in one call.

A graph has fixed shapes and addresses, so each batch bucket (1, 2, 4, ..., 64) gets its own graph, captured on
first use, with its own static tokens [b, 1], state (`model.init_state(b)`) and logits [b, 1, V]. A batch of B runs
in the smallest bucket b >= B:

    tokens, state rows -> static rows [:B]      (the rows B..b-1 are padding: they hold whatever the last replay
    replay                                       left there, and no operation of a step mixes rows, so they
    logits [:B] (a copy), state rows <- [:B]     change nothing in the first B)

The state handed back is the static buffer's first B rows, so a batch that does not change between steps (the
usual case) is neither copied in nor out; a changed batch (`RWKVState.select` / `cat` make new tensors) is copied
in once. Batches above the largest bucket, and every step after a capture failed, run eagerly (`model(...,
inplace=True)`), and `GraphDecoder.eager_reason` says why. The replay runs the same kernels as the eager step of
batch b; for B < b the eager step of batch B may pick other matrix kernels, so the two agree to float rounding
(tests/generation/test_cuda_graph.py).

The graphs hold the addresses of the model's weights: weights changed in place are seen by the next replay,
weights replaced by new tensors (another `load_state_dict(assign=True)`, `.to()`) are not: make a new decoder.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from aviary.state import RWKVState

__all__ = ["BUCKETS", "GraphDecoder"]

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _require_cuda(model) -> None:
    if model.device.type != "cuda":
        raise ValueError(f"CUDA-graph decode needs a model on a CUDA device, this one is on {model.device}")


class _Bucket:
    """One captured step: static inputs and outputs, and the replay that refreshes them."""

    def __init__(self, tokens: torch.Tensor, state: RWKVState, logits: torch.Tensor, replay: Callable[[], None]):
        self.tokens, self.state, self.logits, self.replay = tokens, state, logits, replay


class GraphDecoder:
    """`step(tokens, state)` == `model(torch.tensor(tokens)[:, None], state, last_only=True, inplace=True)`, one token
    id per sequence, by CUDA graphs. `buckets`: the batch sizes captured (each on first use)."""

    def __init__(self, model, buckets: Sequence[int] = BUCKETS):
        _require_cuda(model)
        if not buckets or any(int(b) < 1 for b in buckets):
            raise ValueError(f"buckets must be positive batch sizes, got {list(buckets)}")
        self.model = model
        self.buckets = tuple(sorted({int(b) for b in buckets}))
        self.graphs: dict[int, _Bucket] = {}
        self.eager_reason: str | None = None  # set when a capture failed: every step is eager from then on

    def bucket_for(self, batch: int) -> int | None:
        """The bucket a batch of `batch` runs in, or None (eager)."""
        if self.eager_reason is not None:
            return None
        return next((b for b in self.buckets if b >= batch), None)

    @torch.no_grad()
    def step(self, tokens: Sequence[int], state: RWKVState) -> tuple[torch.Tensor, RWKVState]:
        """One token for each of B sequences; state [B] (held by no one else: it is updated in place, or its rows
        are copied into the graph's). Returns (logits [B, 1, V] float32, new state [B])."""
        B, V = len(tokens), self.model.config.vocab_size
        if not B or any(not 0 <= t < V for t in tokens):  # on the host: the captured forward cannot check
            raise ValueError(f"a decode step takes one token id in [0, {V}) per sequence, got {list(tokens)[:8]}")
        ids = torch.tensor(tokens, dtype=torch.long)[:, None]  # [B, 1]
        b = self.bucket_for(B)
        if b is not None and b not in self.graphs:
            self._add(b)
            b = self.bucket_for(B)  # None if the capture failed
        if b is None:
            return self.model(ids.to(self.model.device), state, last_only=True, inplace=True)
        g = self.graphs[b]
        rows = RWKVState(g.state.version, g.state.shift[:B], g.state.wkv[:B])
        g.tokens[:B].copy_(ids)
        if not _same_memory(state, rows):
            self.model.check_state(state, B)
            rows.shift.copy_(state.shift)
            rows.wkv.copy_(state.wkv)
        g.replay()
        return g.logits[:B].clone(), rows

    def _add(self, b: int) -> None:
        model = self.model
        tokens = torch.zeros(b, 1, dtype=torch.long, device=model.device)
        state = model.init_state(b)

        def run() -> torch.Tensor:
            return model(tokens, state, last_only=True, inplace=True)[0]

        try:
            replay, logits = self._capture(run)
        except Exception as e:  # any capture failure: run eagerly (exact), and say so once
            self.eager_reason = f"capturing the batch-{b} decode step failed ({type(e).__name__}: {e})"
            warnings.warn(f"{self.eager_reason}; decoding without CUDA graphs", RuntimeWarning, stacklevel=3)
            return
        self.graphs[b] = _Bucket(tokens, state, logits, replay)

    @staticmethod
    def _capture(run: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Record `run` in a CUDA graph. Returns (replay, the static output that each replay refreshes)."""
        side = torch.cuda.Stream()  # warm-up on a side stream before capture, as torch's CUDA-graph notes ask
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread may use the GPU meanwhile (the server embeds texts beside the scheduler)
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            logits = run()
        return graph.replay, logits


def _same_memory(a: RWKVState, b: RWKVState) -> bool:
    """Whether a's tensors are b's (the state a previous step handed back), so no copy is needed."""
    return all(x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride()
               for x, y in ((a.shift, b.shift), (a.wkv, b.wkv)))
