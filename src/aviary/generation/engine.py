"""Prefill then decode, for many sequences at once.

    prompt tokens --(parallel form, in chunks; or a cached prefix state)--> state, next-token logits
    repeat: sample one token per sequence, then one recurrent step for every running sequence as a batch

Each sequence has its own state row, so prompts of different lengths decode together without padding,
a sequence can join the batch at any step (`add`) and leaves it when it finishes. The `Engine` is the
whole loop; `generate` / `stream` below are the one-call front ends, and a server's scheduler drives
`add` and `step` itself.
"""

from __future__ import annotations

import codecs
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from aviary.generation.cache import StateCache
from aviary.generation.sampling import Penalties, SamplingParams, sample_batch
from aviary.state import RWKVState

__all__ = ["Engine", "GenerationError", "SequenceOutput", "generate", "stream"]


class GenerationError(ValueError):
    """A request the engine cannot run (empty prompt, token ids outside the vocabulary, ...)."""


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...


@dataclass(eq=False)
class SequenceOutput:
    """One sequence being generated. `text` is what has been released so far (stop strings excluded)."""

    prompt_tokens: list[int]
    params: SamplingParams
    tag: object = None  # the caller's handle (a prompt index, a request id)
    tokens: list[int] = field(default_factory=list)  # generated token ids
    text: str = ""
    finish_reason: str | None = None  # "stop" (stop string or stop token) or "length"
    cached_tokens: int = 0  # prompt tokens served by the prefix cache
    final_state: RWKVState | None = None  # state after the prompt and every generated token fed back

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _Running:
    """Engine-side bookkeeping of one sequence: random stream, penalties, UTF-8 and stop-string buffers."""

    def __init__(self, out: SequenceOutput, vocab_size: int, generator: torch.Generator):
        self.out = out
        self.generator = generator
        self.penalties = Penalties(vocab_size)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded text held back because it may be the start of a stop string
        self.hold = max((len(s) for s in out.params.stop), default=1) - 1

    def release(self, piece: str, final: bool = False) -> str:
        """Add decoded text; return what can be shown now (never part of a stop string)."""
        out, params = self.out, self.out.params
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in params.stop) if i >= 0), default=-1)
        if cut >= 0:
            shown, self.pending = self.pending[:cut], ""
            out.finish_reason = "stop"
        elif final:
            shown, self.pending = self.pending, ""
        else:
            n = max(len(self.pending) - self.hold, 0)
            shown, self.pending = self.pending[:n], self.pending[n:]
        out.text += shown
        return shown


class Engine:
    """Continuous-batching generation over one model.

        engine = Engine(model, tokenizer, cache=StateCache())
        seq = engine.add("User: hi\\n\\nAssistant:", SamplingParams(temperature=0))
        while engine.has_work:
            for s, piece in engine.step(): print(piece, end="")
    """

    def __init__(self, model, tokenizer: TokenizerLike, *, cache: StateCache | None = None,
                 prefill_chunk: int = 512):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.prefill_chunk = prefill_chunk
        self.vocab_size = model.config.vocab_size
        self._running: list[_Running] = []  # rows of the batch, in order
        self._state: RWKVState | None = None  # [B] batch state of the running sequences
        self._logits: torch.Tensor | None = None  # [B, V] next-token logits of the running sequences
        self._bytes_cache: dict[int, bytes] = {}
        # model rows the tokenizer has no text for (World: ids 65530..65535 of a 65536-row head) are never
        # sampled, so one stray logit cannot fail a whole batch with a decode error
        self._undecodable = _undecodable_ids(tokenizer, self.vocab_size)

    # ---- prefill -----------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not tokens:
            raise GenerationError("the prompt is empty: give at least one token")
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise GenerationError(f"prompt token id {bad[0]} is outside the model's vocabulary [0, {self.vocab_size})")
        return tokens

    @torch.no_grad()
    def prefill(self, tokens: Sequence[int], state: RWKVState | None = None, cache_at: Sequence[int] = (),
                namespace: Hashable = None) -> tuple[torch.Tensor, RWKVState, int]:
        """Run `tokens` from `state` (or from the start, through the prefix cache).

        `cache_at`: token counts (message boundaries of a chat, say) after which the state is cached too,
        so a later prompt that shares only that prefix starts from it. The whole prompt is always cached.
        `namespace`: the prefix-cache namespace to look up and store in (a server's client; see StateCache).
        Returns (logits [V] for the next token, state after the tokens, number of tokens taken from the cache).
        """
        tokens = list(tokens)
        done, logits = 0, None
        if state is None and self.cache is not None:
            hit = self.cache.lookup(tokens, namespace)
            if hit is not None:
                done, state, logits = hit.length, hit.state, hit.logits
        device = self.model.device
        marks = sorted({n for n in cache_at if done < n < len(tokens)} if self.cache is not None else ())
        start = done
        while start < len(tokens):
            end = min([start + self.prefill_chunk, *(n for n in marks if n > start)])
            chunk = torch.tensor([tokens[start:end]], dtype=torch.long, device=device)
            out, state = self.model(chunk, state, last_only=True)
            logits = out[0, -1]
            if end in marks:
                self.cache.put(tokens[:end], state, logits.float(), namespace)
            start = end
        if state is None:  # unreachable with a non-empty prompt; kept for the type checker
            raise GenerationError("nothing to prefill")
        if self.cache is not None and done < len(tokens):
            self.cache.put(tokens, state, logits, namespace)
        return logits.float(), state, done

    # ---- the batch ---------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self._running)

    @property
    def batch_size(self) -> int:
        return len(self._running)

    def add(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *, tag: object = None,
            state: RWKVState | None = None, seed_offset: int = 0, cache_at: Sequence[int] = (),
            namespace: Hashable = None) -> SequenceOutput:
        """Prefill a prompt and put it in the batch; it decodes from the next `step`.

        `state` continues from a given state (batch of one: a chat history, a state-tuned start);
        without it the prefix cache is used. `seed_offset` is added to the seed (for n samples of one prompt).
        `cache_at` and `namespace` are passed to `prefill`.
        """
        params = params or SamplingParams()
        params.check_vocab(self.vocab_size)
        if state is not None:
            self.model.check_state(state, 1)
        tokens = self.encode(prompt)
        out = SequenceOutput(tokens, params, tag)
        logits, seq_state, out.cached_tokens = self.prefill(tokens, state, cache_at, namespace)
        run = _Running(out, self.vocab_size, params.make_generator(seed_offset))
        if params.max_new_tokens == 0:
            out.finish_reason = "length"
            out.final_state = seq_state
            return out
        self._running.append(run)
        # the batch state is the engine's own (decode updates it in place): never the caller's or the cache's
        self._state = seq_state.clone() if self._state is None else RWKVState.cat([self._state, seq_state])
        self._logits = logits[None] if self._logits is None else torch.cat([self._logits, logits[None]])
        return out

    def cancel(self, seq: SequenceOutput, reason: str = "cancelled") -> None:
        """Drop a sequence from the batch (a client went away)."""
        keep = [i for i, r in enumerate(self._running) if r.out is not seq]
        if len(keep) != len(self._running):
            seq.finish_reason = seq.finish_reason or reason
            self._keep(keep)

    def _keep(self, rows: list[int]) -> None:
        self._running = [self._running[i] for i in rows]
        if not rows:
            self._state = self._logits = None
        else:
            self._state = self._state.select(rows)
            self._logits = self._logits[rows]

    def _token_bytes(self, token: int) -> bytes:
        data = self._bytes_cache.get(token)
        if data is None:
            data = self._bytes_cache[token] = self.tokenizer.decode_bytes([token])
        return data

    @torch.no_grad()
    def step(self) -> list[tuple[SequenceOutput, str]]:
        """Sample one token for every running sequence, then advance them all by one recurrent step.

        Returns (sequence, newly released text) for every sequence that produced text or finished.
        """
        if not self._running:
            return []
        logits = self._logits.clone()  # [B, V]
        if self._undecodable:
            logits[:, self._undecodable] = -float("inf")
        for i, run in enumerate(self._running):
            params = run.out.params
            if params.banned_tokens:
                logits[i, list(params.banned_tokens)] = -float("inf")
            run.penalties.apply(logits[i], params)
        tokens = sample_batch(logits, [r.out.params for r in self._running], [r.generator for r in self._running])
        events, feed, rows = [], [], []
        for i, (run, token) in enumerate(zip(self._running, tokens, strict=True)):
            out, params = run.out, run.out.params
            if token in params.stop_token_ids:
                out.finish_reason = "stop"
                out.final_state = self._state.select(i)
                events.append((out, run.release(run.utf8.decode(b"", final=True), final=True)))
                continue
            out.tokens.append(token)
            data = self._token_bytes(token)
            run.penalties.update(token, data.decode("utf-8", errors="replace"), params)
            piece = run.release(run.utf8.decode(data))
            if not out.finished and len(out.tokens) >= params.max_new_tokens:
                out.finish_reason = "length"
                piece += run.release(run.utf8.decode(b"", final=True), final=True)
            if piece or out.finished:
                events.append((out, piece))
            feed.append(token)
            rows.append(i)
        # every sampled token is fed back, so a finished sequence's final state covers all its tokens
        if feed:
            tokens = torch.tensor(feed, dtype=torch.long, device=self._state.device)[:, None]
            state = self._state.select(rows) if len(rows) != len(self._running) else self._state
            logits, state = self.model(tokens, state, last_only=True, inplace=True)
            self._state, self._logits = state, logits[:, 0].float()
            self._running = [self._running[i] for i in rows]
        else:
            self._running, self._state, self._logits = [], None, None
        self._finish_done()
        return events

    def _finish_done(self) -> None:
        keep = []
        for i, run in enumerate(self._running):
            if run.out.finished:
                run.out.final_state = self._state.select(i)
            else:
                keep.append(i)
        if len(keep) != len(self._running):
            self._keep(keep)


def _undecodable_ids(tokenizer: TokenizerLike, vocab_size: int) -> list[int]:
    bad = []
    for i in range(vocab_size):
        try:
            tokenizer.decode_bytes([i])
        except (ValueError, KeyError, IndexError):
            bad.append(i)
    return bad


# ---- one-call front ends --------------------------------------------------------------------------


def _params(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    if params is not None and overrides:
        from dataclasses import replace

        return replace(params, **overrides)
    return params if params is not None else SamplingParams(**overrides)


def stream(model, tokenizer: TokenizerLike, prompts: str | Sequence[str], params: SamplingParams | None = None, *,
           state: RWKVState | None = None, cache: StateCache | None = None,
           **sampling) -> Iterator[str] | Iterator[tuple[int, str]]:
    """Stream generated text. One prompt yields text pieces; a list yields (prompt index, piece)
    pairs, decoded together as one batch. `sampling` keywords override fields of `params`."""
    params = _params(params, sampling)
    single = isinstance(prompts, str)
    engine = Engine(model, tokenizer, cache=cache)
    for i, prompt in enumerate([prompts] if single else prompts):
        engine.add(prompt, params, tag=i, state=state)
    return _pieces(engine, single)


def _pieces(engine: Engine, single: bool):
    while engine.has_work:
        for out, piece in engine.step():
            if piece:
                yield piece if single else (out.tag, piece)


def generate(model, tokenizer: TokenizerLike, prompts: str | Sequence[str], params: SamplingParams | None = None, *,
             state: RWKVState | None = None, cache: StateCache | None = None, **sampling) -> str | list[str]:
    """Generate text for one prompt (returns str) or a batch of prompts (returns list[str])."""
    params = _params(params, sampling)
    single = isinstance(prompts, str)
    engine = Engine(model, tokenizer, cache=cache)
    outs = [engine.add(p, params, tag=i, state=state) for i, p in enumerate([prompts] if single else prompts)]
    while engine.has_work:
        engine.step()
    texts = [o.text for o in outs]
    return texts[0] if single else texts
