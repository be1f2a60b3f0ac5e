"""Continuous batching: one thread owns the `Engine` and runs every active request in one batch.

    submit(job) --bounded queue--> [scheduler thread]  admit:   while the batch has room (prefix cache first)
                                                       prefill: the admitted prompts together, as one batch,
                                                                `max_prefill_tokens` at most; finished ones join
                                                       step:    one token for every running sequence, its
                                                                text sent before the model runs the tokens
                                   job.sink(event) <-- text pieces, then Done (usage) or Failed

A request (`Job`) is one or more sequences: its prompts times `n` samples. Waiting jobs are admitted while
the batch has room (`max_batch` sequences, counting the rows of jobs still prefilling). Every turn of the loop
prefills the admitted prompts together (`Engine.run_prefills`: one batch, exact for every prompt, oldest first)
for `max_prefill_tokens` tokens at most, then runs one decode step; so a long prompt is prefilled over
several steps while the running streams keep going, and a burst of short ones is prefilled in one pass.
Finished sequences leave the batch at once. `cancel(job)` (a client went away) drops its sequences at the
next step. Events go to `job.sink`, called on the scheduler thread: it must not block (the web layer hands
them to its event loop).

There is no web code here: the scheduler is driven the same way from tests, benchmarks or another front end.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from aviary.generation import Engine, SamplingParams, SequenceOutput
from aviary.generation.constraints import Grammar
from aviary.generation.engine import Prefill
from aviary.serve.metrics import Metrics

__all__ = ["Done", "Failed", "Job", "Piece", "QueueFull", "Scheduler", "SchedulerClosed"]

log = logging.getLogger("aviary.serve")


@dataclass(frozen=True)
class Piece:
    """New text of one choice; `finish_reason` is set on its last piece ("stop" or "length")."""

    index: int
    text: str
    finish_reason: str | None = None


@dataclass(frozen=True)
class Done:
    """Every choice of the job has finished. Token counts as OpenAI's `usage` reports them."""

    prompt_tokens: int  # each prompt counted once, whatever n
    completion_tokens: int  # all choices together
    cached_tokens: int  # prompt tokens served from the prefix cache


@dataclass(frozen=True)
class Failed:
    message: str


Event = Piece | Done | Failed


class QueueFull(Exception):
    """The waiting queue is at its limit; try again later."""


class SchedulerClosed(Exception):
    """The scheduler has been shut down."""


@dataclass(eq=False)
class Job:
    """One request. Choice `i * n + j` is sample j of prompt i (OpenAI's order for a list of prompts)."""

    prompts: list[list[int]]  # token ids, one list per prompt
    params: SamplingParams
    sink: Callable[[Event], None]
    n: int = 1
    cache_at: list[list[int]] | None = None  # per prompt: extra token counts to cache (chat message ends)
    namespace: Hashable = None  # the client's prefix-cache namespace: it never starts from another client's prefix
    grammar: Grammar | None = None  # every choice's text follows it (aviary.generation.constraints)
    seqs: list[SequenceOutput] = field(default_factory=list)
    prefills: list[Prefill] = field(default_factory=list)  # one per prompt, while they are prefilled
    submitted_at: float = 0.0
    first_token_at: float | None = None
    cancelled: bool = False
    finished: bool = False

    @property
    def width(self) -> int:
        """Rows of the batch this job takes."""
        return len(self.prompts) * self.n


class Scheduler:
    """Owns `engine` on a thread of its own. `start()`, `submit(job)`, `cancel(job)`, `close()`."""

    def __init__(self, engine: Engine, *, max_batch: int = 32, max_queue: int = 128,
                 max_prefill_tokens: int = 1024, metrics: Metrics | None = None):
        if max_batch < 1 or max_queue < 0 or max_prefill_tokens < 1:
            raise ValueError("max_batch and max_prefill_tokens must be >= 1, max_queue >= 0")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._cancelled: list[Job] = []
        self._active: set[Job] = set()
        self._prefilling: list[Job] = []  # admitted, prompts not all prefilled yet; oldest first
        self._closed = False
        self._thread: threading.Thread | None = None
        self._register_metrics()

    # ---- called from any thread ---------------------------------------------------------------

    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="aviary-scheduler", daemon=True)
            self._thread.start()
        return self

    def submit(self, job: Job) -> Job:
        """Queue a job. Raises QueueFull, SchedulerClosed, or ValueError if it can never fit the batch."""
        if job.width > self.max_batch:
            raise ValueError(f"the request needs {job.width} sequences; this server runs at most {self.max_batch}")
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                self.metrics.inc("requests_total", status="rejected")
                raise QueueFull(f"{len(self._pending)} requests are waiting already")
            job.submitted_at = time.perf_counter()
            self._pending.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job (its client went away). Safe to call twice, or after it finished."""
        with self._cond:
            if job.cancelled or job.finished:
                return
            job.cancelled = True
            try:
                self._pending.remove(job)
                self.metrics.inc("requests_total", status="cancelled")
            except ValueError:
                self._cancelled.append(job)
                self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; waiting and running jobs get `Failed`."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def batch_size(self) -> int:
        return self.engine.batch_size

    @property
    def active_requests(self) -> int:
        return len(self._active)

    # ---- the scheduler thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._pending or self._cancelled or self._prefilling
                           or self.engine.has_work):
                    self._cond.wait()
                if self._closed:
                    break
                cancelled, self._cancelled = self._cancelled, []
                admitted = self._take_admissible()
            for job in cancelled:
                self._drop(job, "cancelled")
            for job in admitted:
                self._admit(job)
            if self._prefilling:
                self._prefill()
            if self.engine.has_work:
                self._step()
        with self._cond:
            waiting = list(self._pending)
            self._pending.clear()
        for job in [*waiting, *self._active]:
            self._deliver(job, Failed("the server is shutting down"))
            self._drop(job, "failed")

    def _take_admissible(self) -> list[Job]:
        """Jobs to start prefilling now, in arrival order, while the batch has room for their rows."""
        admitted, rows = [], self.engine.batch_size + sum(job.width for job in self._prefilling)
        while self._pending and rows + self._pending[0].width <= self.max_batch:
            job = self._pending.popleft()
            admitted.append(job)
            rows += job.width
        return admitted

    def _admit(self, job: Job) -> None:
        """Look its prompts up in the prefix cache; the prefill runs with the others' (`_prefill`)."""
        if job.cancelled:  # cancelled between leaving the queue and now
            self.metrics.inc("requests_total", status="cancelled")
            job.finished = True
            return
        self._active.add(job)
        try:
            job.prefills = [self.engine.begin_prefill(prompt, cache_at=job.cache_at[i] if job.cache_at else (),
                                                      namespace=job.namespace) for i, prompt in enumerate(job.prompts)]
        except Exception as e:  # a bad prompt that got past the web layer's checks: fail this job only
            log.exception("prefill failed")
            self._deliver(job, Failed(f"prefill failed: {e}"))
            self._drop(job, "failed")
            return
        self._prefilling.append(job)

    def _prefill(self) -> None:
        """One pass of batched prefill over the admitted prompts, oldest first, within the token budget; the jobs
        whose prompts are all done join the batch."""
        t0 = time.perf_counter()
        try:
            ran = self.engine.run_prefills([p for job in self._prefilling for p in job.prefills],
                                           self.max_prefill_tokens)
        except Exception as e:  # never leave clients hanging: fail every job of the pass
            log.exception("prefill failed")
            for job in list(self._prefilling):
                self._deliver(job, Failed(f"prefill failed: {e}"))
                self._drop(job, "failed")
            return
        if ran:
            self.metrics.observe("prefill_seconds", time.perf_counter() - t0)
            self.metrics.inc("prefill_tokens_total", ran)
        ready = [job for job in self._prefilling if all(p.finished for p in job.prefills)]
        self._prefilling = [job for job in self._prefilling if job not in ready]
        for job in ready:
            self._join(job)

    def _join(self, job: Job) -> None:
        """Put a prefilled job's sequences in the batch (n rows per prompt, all from its one prefill)."""
        try:
            for i, prefill in enumerate(job.prefills):
                for j in range(job.n):
                    index = i * job.n + j
                    constraint = job.grammar.start() if job.grammar is not None else None
                    seq = self.engine.add(None, job.params, tag=(job, index), seed_offset=j, prefilled=prefill,
                                          constraint=constraint)
                    job.seqs.append(seq)
                    if seq.finished:  # max_tokens == 0
                        seq.final_state = None
                        self._on_piece(job, index, seq, "")
            job.prefills = []
            self._finish_if_done(job)
        except Exception as e:  # settings the engine refuses that got past the web layer's checks
            log.exception("joining the batch failed")
            self._deliver(job, Failed(f"prefill failed: {e}"))
            self._drop(job, "failed")

    def _step(self) -> None:
        t0 = time.perf_counter()
        rows = self.engine.batch_size
        try:
            events = self.engine.step(emit=self._emit)  # the text goes out before the model runs the tokens
        except Exception as e:  # never leave clients hanging: fail everything that was running
            log.exception("decode step failed")
            for job in list(self._active):
                self._deliver(job, Failed(f"decode failed: {e}"))
                self._drop(job, "failed")
            return
        for seq, _ in events:
            if seq.finished:
                seq.final_state = None  # the server never continues from it; free the memory now
        self.metrics.observe("step_seconds", time.perf_counter() - t0)
        self.metrics.inc("steps_total")
        self.metrics.inc("step_rows_total", rows)

    def _emit(self, events: list[tuple[SequenceOutput, str]]) -> None:
        """A step's sampled text, to the jobs (called by `Engine.step` before its forward)."""
        touched = {}
        for seq, piece in events:
            job, index = seq.tag
            if not job.cancelled:
                self._on_piece(job, index, seq, piece)
                touched[job] = None
        for job in touched:  # after all of this step's pieces, so Done comes last
            self._finish_if_done(job)

    def _on_piece(self, job: Job, index: int, seq: SequenceOutput, text: str) -> None:
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
            self.metrics.observe("time_to_first_token_seconds", job.first_token_at - job.submitted_at)
        self._deliver(job, Piece(index, text, seq.finish_reason))

    def _finish_if_done(self, job: Job) -> None:
        if not job.cancelled and not job.finished and len(job.seqs) == job.width \
                and all(s.finished for s in job.seqs):
            prompt_tokens = sum(len(p) for p in job.prompts)
            completion = sum(len(s.tokens) for s in job.seqs)
            cached = sum(s.cached_tokens for s in job.seqs[::job.n])
            self.metrics.inc("prompt_tokens_total", prompt_tokens)
            self.metrics.inc("cached_prompt_tokens_total", cached)
            self.metrics.inc("completion_tokens_total", completion)
            self.metrics.observe("request_seconds", time.perf_counter() - job.submitted_at)
            self.metrics.inc("requests_total", status="ok")
            job.finished = True
            self._active.discard(job)
            self._deliver(job, Done(prompt_tokens, completion, cached))

    def _deliver(self, job: Job, event: Event) -> None:
        try:
            job.sink(event)
        except Exception:  # the receiver is gone (its event loop closed): treat as a disconnect
            log.debug("could not deliver to a job; cancelling it", exc_info=True)
            job.cancelled = True
            self._drop(job, "cancelled")

    def _drop(self, job: Job, status: str) -> None:
        if job.finished or job not in self._active:
            return
        if job in self._prefilling:
            self._prefilling.remove(job)
        job.prefills = []
        for seq in job.seqs:
            if not seq.finished:
                self.engine.cancel(seq)
            seq.final_state = None
        self.metrics.inc("completion_tokens_total", sum(len(s.tokens) for s in job.seqs))
        self.metrics.inc("requests_total", status=status)
        job.finished = True
        self._active.discard(job)

    def _register_metrics(self) -> None:
        m = self.metrics
        m.counter("requests_total", "Requests by outcome (ok, cancelled, failed, rejected).")
        m.counter("prompt_tokens_total", "Prompt tokens of completed requests.")
        m.counter("cached_prompt_tokens_total", "Prompt tokens served from the prefix-state cache.")
        m.counter("completion_tokens_total", "Generated tokens (cancelled requests included).")
        m.counter("steps_total", "Decode steps run.")
        m.counter("prefill_tokens_total", "Prompt tokens run through the model (cached ones are not).")
        m.counter("step_rows_total", "Sequences decoded, summed over steps (divide by steps_total: mean batch).")
        m.gauge("queue_depth", "Requests waiting to be admitted.", lambda: self.queue_depth)
        m.gauge("batch_size", "Sequences in the running batch.", lambda: self.batch_size)
        m.gauge("active_requests", "Requests admitted and not finished.", lambda: self.active_requests)
        cache = self.engine.cache
        m.gauge("prefix_cache_bytes", "Memory held by cached prefix states.", lambda: cache.nbytes if cache else 0)
        m.gauge("prefix_cache_entries", "Cached prefix states.", lambda: len(cache) if cache else 0)
        m.histogram("time_to_first_token_seconds", "From submission to the first generated text.")
        m.histogram("request_seconds", "From submission to the last token, completed requests.")
        m.histogram("step_seconds", "Duration of one batched decode step.")
        m.histogram("prefill_seconds", "Duration of one batched prefill pass (at most max_prefill_tokens tokens).")
