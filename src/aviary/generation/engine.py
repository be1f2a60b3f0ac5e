"""Prefill then decode, for many sequences at once.

    prompt tokens --(parallel form, in chunks; or a cached prefix state)--> state, next-token logits
    repeat: sample one token per sequence, then one recurrent step for every running sequence as a batch

Each sequence has its own state row, so prompts of different lengths decode together without padding,
a sequence can join the batch at any step (`add`) and leaves it when it finishes. The `Engine` is the
whole loop; `generate` / `stream` below are the one-call front ends, and a server's scheduler drives
`add` and `step` itself, and prefills many prompts as one batch (`begin_prefill`, `run_prefills`). A sequence
may follow a grammar (`add(..., constraint=)`, aviary.generation.constraints): its forbidden tokens are masked
before sampling, and it stops when the grammar is complete.

Batched prefill cannot pad: a recurrent state takes in every token it is given, padding included, so a
padded prompt's state is not its own (left padding too: the pads come first and shift the state). Prompts of
different lengths are aligned by splitting instead: each model call runs every unfinished prompt for the same
number of tokens, up to the nearest place where one of them ends (or is cached, or reaches its share of a
token budget); that one leaves, the rest go on. The calls are never more than a one-at-a-time prefill's,
the tokens run are the same, and the head runs only for the prompts that end in a call.
"""

from __future__ import annotations

import codecs
import hashlib
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from aviary.generation.cache import StateCache
from aviary.generation.constraints import Constraint
from aviary.generation.sampling import Penalties, SamplingParams, sample_batch
from aviary.state import RWKVState

__all__ = ["Engine", "GenerationError", "Prefill", "SequenceOutput", "generate", "stream"]


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


@dataclass(eq=False)
class Prefill:
    """A prompt on its way into the batch (`Engine.begin_prefill`): its first `done` tokens have run, giving
    `state` (None: the engine's start state, nothing run yet) and, where a run stopped at the prompt's end or at a
    cache point, `logits` [V] for the next token. `Engine.run_prefills` advances it, `Engine.add(...,
    prefilled=)` puts it in the batch once `finished`."""

    tokens: list[int]
    cache_key: Hashable | None = None  # where its prefixes are cached (start state and client); None: not cached
    marks: tuple[int, ...] = ()  # token counts after which the state is cached as well (message ends)
    done: int = 0
    cached_tokens: int = 0  # of `done`, the tokens the prefix cache served
    state: RWKVState | None = None
    logits: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return self.done == len(self.tokens)


class _Running:
    """Engine-side bookkeeping of one sequence: random stream, penalties, UTF-8 and stop-string buffers."""

    def __init__(self, out: SequenceOutput, vocab_size: int, generator: torch.Generator,
                 constraint: Constraint | None = None):
        self.out = out
        self.generator = generator
        self.constraint = constraint  # a grammar the text must follow (aviary.generation.constraints)
        # presence/frequency counts only where a penalty reads them (two [V] tensors, updated every token)
        self.penalties = Penalties(vocab_size) if out.params.presence_penalty or out.params.frequency_penalty \
            else None
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
                 prefill_chunk: int = 512, start_state: RWKVState | None = None, cuda_graphs: bool | None = None):
        """`start_state` (a batch of one): where every prompt starts unless `add` is given a state (a state-tuned
        or prompt state); default the model's own initial state, as it is now. Prefix-cache entries are keyed
        by it too, so engines with different start states can share a cache without mixing.

        `cuda_graphs`: run each decode step of up to 64 sequences as a replayed CUDA graph
        (`aviary.generation.cuda_graph`). None (default): when the model is on a CUDA device; False: never;
        True: always (a ValueError off CUDA). A CPU model decodes as before."""
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.graphs = None  # the GraphDecoder of the decode steps, or None (eager)
        if cuda_graphs or (cuda_graphs is None and getattr(model, "device", None) is not None
                           and model.device.type == "cuda"):
            from aviary.generation.cuda_graph import GraphDecoder

            self.graphs = GraphDecoder(model)
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.prefill_chunk = prefill_chunk
        self.vocab_size = model.config.vocab_size
        if start_state is not None:
            model.check_state(start_state, 1)
        self.start_state = (model.init_state(1) if start_state is None else start_state).detach().to(model.device)
        self._start_key = _fingerprint(self.start_state) if cache is not None else None
        self._running: list[_Running] = []  # rows of the batch, in order
        self._joining: list[tuple[_Running, RWKVState, torch.Tensor]] = []  # added since the last step
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

    def prefill(self, tokens: Sequence[int], state: RWKVState | None = None, cache_at: Sequence[int] = (),
                namespace: Hashable = None) -> tuple[torch.Tensor, RWKVState, int]:
        """Run `tokens` from `state`, or from the start state through the prefix cache (`begin_prefill`).
        Returns (logits [V] for the next token, state after the tokens, number of tokens taken from the cache)."""
        p = self.begin_prefill(tokens, state, cache_at, namespace)
        self.run_prefills([p])
        return p.logits, p.state, p.cached_tokens

    def begin_prefill(self, prompt: str | Sequence[int], state: RWKVState | None = None, cache_at: Sequence[int] = (),
                      namespace: Hashable = None) -> Prefill:
        """A prompt's prefill, nothing run yet. From `state` (a batch of one: a chat history; the prefix cache is
        neither read nor written, its keys do not cover a caller's state), else from the start state after the
        longest prefix of the prompt cached in `namespace` (a server's client; see StateCache). `cache_at`: token
        counts (message ends of a chat) after which the state is cached too, so a later prompt sharing only that
        prefix starts from it; the whole prompt is always cached."""
        tokens = self.encode(prompt)
        if state is not None:
            self.model.check_state(state, 1)
            return Prefill(tokens, state=state)
        if self.cache is None:
            return Prefill(tokens)
        p = Prefill(tokens, cache_key=(self._start_key, namespace))
        hit = self.cache.lookup(tokens, p.cache_key)
        if hit is not None:
            p.done = p.cached_tokens = hit.length
            p.state, p.logits = hit.state, hit.logits
        p.marks = tuple(sorted({n for n in cache_at if p.done < n < len(tokens)}))
        return p

    @torch.no_grad()
    def run_prefills(self, prefills: Sequence[Prefill], max_tokens: int | None = None) -> int:
        """Advance unfinished prefills by `max_tokens` tokens in all at most (None: to their ends), earliest in
        `prefills` first, as one batch (see the module docstring). Returns the number of tokens run.

        Each call runs every prompt still going by m tokens, m up to the nearest stop of any of them: its end,
        a cache point, `prefill_chunk` tokens, its share of the budget. States and logits equal those of a
        prefill one at a time to float32 rounding (the parallel form summed in other chunks)."""
        budget = math.inf if max_tokens is None else max_tokens
        goals: dict[Prefill, int] = {}  # where each prompt stops in this run
        for p in prefills:
            if budget <= 0:
                break
            if not p.finished:
                goals[p] = p.done + min(len(p.tokens) - p.done, budget)
                budget -= goals[p] - p.done
        rows = list(goals)
        if not rows:
            return 0
        state = RWKVState.cat([self.start_state if p.state is None else p.state for p in rows])  # [B], ours
        ran = 0
        while rows:
            m = min(min(goals[p], p.done + self.prefill_chunk, *(n for n in p.marks if n > p.done)) - p.done
                    for p in rows)
            chunk = torch.tensor([p.tokens[p.done:p.done + m] for p in rows], dtype=torch.long,
                                 device=self.model.device)  # [B, m]
            need = [i for i, p in enumerate(rows) if p.done + m == len(p.tokens) or p.done + m in p.marks]
            if len(need) == len(rows):
                logits, state = self.model(chunk, state, last_only=True)
            else:  # the head only for the prompts whose logits are used
                logits, state = self.model(chunk, state, last_only=True, rows=need)
            ran += m * len(rows)
            for p in rows:
                p.done += m
            for j, i in enumerate(need):
                p = rows[i]
                p.logits = logits[j, 0].float().clone()  # its own memory: the cache counts V floats, not the call's
                if p.cache_key is not None:
                    self.cache.put(p.tokens[:p.done], state.select(i), p.logits, p.cache_key)
            keep = [i for i, p in enumerate(rows) if p.done < goals[p]]
            if len(keep) < len(rows):
                for i, p in enumerate(rows):
                    if p.done == goals[p]:
                        p.state = state.select(i)
                rows = [rows[i] for i in keep]
                state = state.select(keep) if keep else None
        return ran

    # ---- the batch ---------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._joining)

    @property
    def batch_size(self) -> int:
        return len(self._running) + len(self._joining)

    def add(self, prompt: str | Sequence[int] | None, params: SamplingParams | None = None, *, tag: object = None,
            state: RWKVState | None = None, seed_offset: int = 0, cache_at: Sequence[int] = (),
            namespace: Hashable = None, prefilled: Prefill | None = None,
            constraint: Constraint | None = None) -> SequenceOutput:
        """Prefill a prompt and put it in the batch; it decodes from the next `step`.

        `state` continues from a given state (batch of one: a chat history); without it the prompt starts from
        the start state, through the prefix cache. `seed_offset` is added to the seed (for n samples of one
        prompt). `cache_at` and `namespace` are passed to `begin_prefill`. `prefilled`: a finished `Prefill`
        to start from instead of running the prompt (which is then ignored); several sequences may share one.
        `constraint`: a grammar the generated text follows (`Grammar.start()`; one per sequence, never shared).
        """
        params = params or SamplingParams()
        params.check_vocab(self.vocab_size)
        if prefilled is None:
            prefilled = self.begin_prefill(prompt, state, cache_at, namespace)
            self.run_prefills([prefilled])
        elif not prefilled.finished:
            raise ValueError(f"the prefill has run {prefilled.done} of its {len(prefilled.tokens)} tokens")
        out = SequenceOutput(prefilled.tokens, params, tag, cached_tokens=prefilled.cached_tokens)
        run = _Running(out, self.vocab_size, params.make_generator(seed_offset), constraint)
        if params.max_new_tokens == 0:
            out.finish_reason = "length"
            out.final_state = prefilled.state
            return out
        self._joining.append((run, prefilled.state, prefilled.logits))
        return out

    def _join(self) -> None:
        """Put the sequences added since the last step into the batch, with one concatenation for all of them.
        The batch state is the engine's own (decode updates it in place): a copy, never the caller's or the
        cache's."""
        if not self._joining:
            return
        runs, states, logits = zip(*self._joining, strict=True)
        self._joining = []
        self._running += runs
        self._state = RWKVState.cat([*([self._state] if self._state is not None else []), *states])
        self._logits = torch.cat([*([self._logits] if self._logits is not None else []),
                                  *(x[None] for x in logits)])

    def cancel(self, seq: SequenceOutput, reason: str = "cancelled") -> None:
        """Drop a sequence from the batch (a client went away)."""
        joining = [j for j in self._joining if j[0].out is not seq]
        keep = [i for i, r in enumerate(self._running) if r.out is not seq]
        if len(keep) != len(self._running) or len(joining) != len(self._joining):
            seq.finish_reason = seq.finish_reason or reason
            self._joining = joining
            if len(keep) != len(self._running):
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
    def step(self, emit: Callable[[list[tuple[SequenceOutput, str]]], None] | None = None
             ) -> list[tuple[SequenceOutput, str]]:
        """Sample one token for every running sequence, then advance them all by one recurrent step.

        Returns (sequence, newly released text) for every sequence that produced text or finished. `emit`, if
        given, is called with the same list as soon as the tokens are sampled, before the model runs them: a
        server streams this step's text while the forward runs, instead of after it (each token reaches its
        client one forward earlier). A finished sequence's `final_state` is set only after the forward.
        """
        self._join()
        if not self._running:
            return []
        # masked in place: the batch's logits are the engine's own (the forward's output or a concatenation of
        # the joining prompts', never the prefix cache's) and the next forward replaces them
        logits = self._logits  # [B, V]
        if self._undecodable:
            logits[:, self._undecodable] = -float("inf")
        for i, run in enumerate(self._running):
            params = run.out.params
            if params.banned_tokens:
                logits[i, list(params.banned_tokens)] = -float("inf")
            if run.penalties is not None:
                run.penalties.apply(logits[i], params)
            if run.constraint is not None:
                run.constraint.mask(logits[i])
        tokens = sample_batch(logits, [r.out.params for r in self._running], [r.generator for r in self._running])
        events, feed, rows = [], [], []
        for i, (run, token) in enumerate(zip(self._running, tokens, strict=True)):
            out, params = run.out, run.out.params
            # a token the grammar refuses comes only from a row it left nothing in (every token banned): stop
            if token in params.stop_token_ids or (run.constraint is not None and not run.constraint.advance(token)):
                out.finish_reason = "stop"
                out.final_state = self._state.select(i)
                events.append((out, run.release(run.utf8.decode(b"", final=True), final=True)))
                continue
            out.tokens.append(token)
            data = self._token_bytes(token)
            if run.penalties is not None:
                run.penalties.update(token, data.decode("utf-8", errors="replace"), params)
            piece = run.release(run.utf8.decode(data))
            if not out.finished and run.constraint is not None and run.constraint.done:  # the grammar is complete
                out.finish_reason = "stop"
                piece += run.release(run.utf8.decode(b"", final=True), final=True)
            elif not out.finished and len(out.tokens) >= params.max_new_tokens:
                out.finish_reason = "length"
                piece += run.release(run.utf8.decode(b"", final=True), final=True)
            if piece or out.finished:
                events.append((out, piece))
            feed.append(token)
            rows.append(i)
        if emit is not None:
            emit(events)
        # every sampled token is fed back, so a finished sequence's final state covers all its tokens
        if feed:
            state = self._state.select(rows) if len(rows) != len(self._running) else self._state
            if self.graphs is not None:
                logits, state = self.graphs.step(feed, state)
            else:
                tokens = torch.tensor(feed, dtype=torch.long, device=self._state.device)[:, None]
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


def _fingerprint(state: RWKVState) -> str:
    """A digest of a state's values: the prefix cache's key for a start state."""
    digest = hashlib.blake2b(digest_size=16)
    for t in (state.shift, state.wkv):
        digest.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


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
