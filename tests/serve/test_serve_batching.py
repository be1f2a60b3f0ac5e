"""Server speed and state: batched prefill is exact and fair, `--state` and `--adapter` in `aviary serve`, and the
next turn of a conversation continues from the state the prefix cache kept (its prefill cost independent of the
history's length), with least-recently-used eviction.

Invariants: a batched prefill of prompts of mixed lengths (cache hits, cache points, chunks and token budgets in
between) gives every prompt the state and next-token logits of a prefill one at a time and of one plain forward,
to 1e-5 in float32; a long prompt is prefilled over several decode steps; a different start state never reuses
another's cache entries."""

import contextlib
import math
import queue
import time

import httpx
import pytest
import torch

import aviary
from aviary.cli import build_parser, main
from aviary.generation import Engine, SamplingParams, StateCache, generate
from aviary.loading import model_from_state_dict
from aviary.serve.scheduler import Done, Job, Piece, Scheduler
from aviary.state import RWKVState, StateError
from aviary.testing import ByteTokenizer, random_config, random_state_dict
from live import LiveServer

TOK = ByteTokenizer()
GREEDY = SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=())
ATOL = 1e-5  # float32
LONG = "".join(f"line {i}: the quick brown fox.\n" for i in range(40))[:1000]  # 1,000 tokens of ByteTokenizer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(version=7, seed=3, n_embd=64):
    config = random_config(version, n_layer=2, n_embd=n_embd, head_size=32, vocab_size=257)
    return model_from_state_dict(random_state_dict(config, seed=seed))


@pytest.fixture(scope="module")
def model():
    return tiny()


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 257, (n,), generator=g).tolist() for n in lengths]


def assert_same(got_logits, got_state, want_logits, want_state):
    torch.testing.assert_close(got_logits, want_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_state.shift, want_state.shift, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_state.wkv, want_state.wkv, atol=ATOL, rtol=0)


def forward(model, tokens, state=None):
    with torch.no_grad():
        logits, state = model(torch.tensor([tokens]), state)
    return logits[0, -1], state


# ---- batched prefill ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_batched_prefill_equals_one_at_a_time(version):
    """Mixed lengths (1 to 70 tokens), chunks of 16, a cache point and a cached prefix: every prompt's state and
    logits equal its own prefill and a plain forward of the whole prompt."""
    model = tiny(version)
    prompts = prompts_of([1, 3, 17, 40, 40, 70, 2, 33])
    cache = StateCache()
    engine = Engine(model, TOK, cache=cache, prefill_chunk=16)
    engine.prefill(prompts[6][:1])  # prompt 6 starts from a cache hit
    batch = [engine.begin_prefill(p, cache_at=[5] if len(p) > 5 else ()) for p in prompts]
    assert batch[6].cached_tokens == 1
    with _counting_calls(model) as batched_calls:
        engine.run_prefills(batch)
    one_by_one = Engine(model, TOK, prefill_chunk=16)
    with _counting_calls(model) as single_calls:
        singles = [one_by_one.prefill(tokens) for tokens in prompts]
    for p, tokens, (logits, state, _) in zip(batch, prompts, singles, strict=True):
        assert p.finished
        assert_same(p.logits, p.state, logits, state)
        assert_same(p.logits, p.state, *forward(model, tokens))
    assert batched_calls[0] < single_calls[0]  # one batch: fewer model calls than prompts x chunks
    assert engine.begin_prefill(prompts[5][:5]).cached_tokens == 5  # the cache point was stored on the way


def test_a_token_budget_splits_a_prefill_without_changing_it(model):
    prompts = prompts_of([90, 7, 45, 12], seed=1)
    engine = Engine(model, TOK)
    batch = [engine.begin_prefill(p) for p in prompts]
    runs = 0
    while not all(p.finished for p in batch):
        assert engine.run_prefills(batch, max_tokens=20) <= 20
        runs += 1
        assert batch[0].done >= min(20 * runs, 90)  # the oldest first
    assert runs == math.ceil(sum(map(len, prompts)) / 20)
    for p, tokens in zip(batch, prompts, strict=True):
        assert_same(p.logits, p.state, *forward(model, tokens))


def test_a_burst_of_requests_is_prefilled_in_one_pass_and_decodes_as_alone(model):
    texts = ["Hello", "The quick brown fox jumps", "é!", "A much longer prompt than the others here", "x"]
    scheduler = Scheduler(Engine(model, TOK, cache=StateCache()), max_batch=16)  # not started: they all wait
    events = [queue.Queue() for _ in texts]
    for text, sink in zip(texts, events, strict=True):
        scheduler.submit(Job([TOK.encode(text)], GREEDY, sink.put))
    scheduler.start()
    try:
        got = [_collect(sink)[0] for sink in events]
    finally:
        scheduler.close()
    assert got == [generate(model, TOK, t, GREEDY) for t in texts]
    assert scheduler.metrics._histograms["prefill_seconds"].count == 1
    assert scheduler.metrics.value("prefill_tokens_total") == sum(len(TOK.encode(t)) for t in texts)


def test_a_long_prompt_does_not_stall_running_streams(model):
    """With a budget of 64 prompt tokens between decode steps, a 1,000-token prompt is prefilled over 16 steps
    of the stream already running, which keeps getting tokens meanwhile."""
    scheduler = Scheduler(Engine(model, TOK), max_batch=4, max_prefill_tokens=64).start()
    try:
        running = queue.Queue()
        scheduler.submit(Job([TOK.encode("a")], SamplingParams(temperature=0, max_new_tokens=10_000,
                                                               stop_token_ids=()), running.put))
        assert isinstance(running.get(timeout=30), Piece)
        steps = []

        def on_long(event):  # on the scheduler thread: the step count when the long prompt's first token comes
            if not steps:
                steps.append(scheduler.metrics.value("steps_total"))
            long_events.put(event)

        long_events = queue.Queue()
        before = scheduler.metrics.value("steps_total")
        scheduler.submit(Job([TOK.encode(LONG)], GREEDY, on_long))
        text, _ = _collect(long_events)
        assert steps[0] - before >= math.ceil(1000 / 64) - 1
    finally:
        scheduler.close()
    assert text == generate(model, TOK, LONG, GREEDY)


# ---- start states: --state -------------------------------------------------------------------------------------


def test_a_start_state_changes_outputs_and_keys_the_cache(model):
    start = Engine(model, TOK).prefill(TOK.encode("User: my name is Ada.\n\n"))[1]
    text = "Assistant: your name is"
    prompt = TOK.encode(text)
    cache = StateCache()
    plain = Engine(model, TOK, cache=cache)
    stated = Engine(model, TOK, cache=cache, start_state=start)
    a = plain.add(prompt, GREEDY)
    b = stated.add(prompt, GREEDY)  # same tokens, same cache, another start: no hit
    assert (a.cached_tokens, b.cached_tokens) == (0, 0)
    for engine in (plain, stated):
        while engine.has_work:
            engine.step()
    assert b.text == generate(model, TOK, text, GREEDY, state=start)
    logits, state, cached = stated.prefill(prompt)
    assert cached == len(prompt)
    assert_same(logits, state, *forward(model, prompt, start))
    assert (logits - plain.prefill(prompt)[0]).abs().max() > 1e-2  # (a random model's greedy text may not move)
    with pytest.raises(StateError, match="do not fit"):
        Engine(model, TOK, start_state=RWKVState.cat([start, start]))


def _serve_args(checkpoint, *more):
    return build_parser().parse_args(["serve", str(checkpoint), "--threads", "1", "--log-level", "warning", *more])


def test_serve_state_option(checkpoint, tmp_path):
    """--state FILE: every request starts from it (over HTTP); one that does not fit the model fails at startup."""
    from aviary.commands.serve import build

    tok = aviary.load_tokenizer(version=7)
    base = aviary.load(str(checkpoint))
    start = Engine(base, tok).prefill(tok.encode("System: You are a pirate.\n\n"))[1]
    start.save(tmp_path / "pirate.state")
    app, scheduler = build(_serve_args(checkpoint, "--state", str(tmp_path / "pirate.state")))
    live = LiveServer(app)
    try:
        body = {"model": "tiny-v7", "prompt": "User: hello\n\nAssistant:", "max_tokens": 8, "temperature": 0}
        first = httpx.post(live.url + "/v1/completions", json=body, timeout=60).json()
        again = httpx.post(live.url + "/v1/completions", json=body, timeout=60).json()
    finally:
        live.close()
    params = SamplingParams(temperature=0, max_new_tokens=8)
    want = generate(base, tok, body["prompt"], params, state=start)
    assert first["choices"][0]["text"] == again["choices"][0]["text"] == want
    plain, stated = (Engine(base, tok).prefill(tok.encode(body["prompt"]), s)[0] for s in (None, start))
    assert (plain - stated).abs().max() > 1e-2
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"]

    other = tiny(7, n_embd=32)  # another model's state: refused in one line before serving
    other.init_state(1).save(tmp_path / "other.state")
    with pytest.raises(StateError, match="do not fit"):
        build(_serve_args(checkpoint, "--state", str(tmp_path / "other.state")))


def test_serve_refuses_a_state_of_another_model_in_one_line(checkpoint, tmp_path, capsys):
    tiny(7, n_embd=32).init_state(1).save(tmp_path / "other.state")
    assert main(["serve", str(checkpoint), "--port", "0", "--threads", "1",
                 "--state", str(tmp_path / "other.state")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aviary serve: error:") and "other.state" in err and "do not fit" in err
    assert len(err.strip().splitlines()) == 1


def test_serve_refuses_a_prefill_budget_below_one(checkpoint, capsys):
    assert main(["serve", str(checkpoint), "--port", "0", "--max-prefill-tokens", "0"]) == 2
    assert "--max-prefill-tokens must be >= 1" in capsys.readouterr().err


def test_serve_adapter_option(checkpoint, tmp_path):
    """--adapter FILE is merged at load: the server's greedy text is the merged model's."""
    from aviary.commands.serve import build
    from aviary.io import read_state_dict
    from aviary.peft import PeftConfig, adapter_state_dict, apply_peft, load_adapter_state_dict, save_adapter
    from aviary.peft import merged_state_dict as merged

    sd, _ = read_state_dict(checkpoint)
    adapted = apply_peft(model_from_state_dict(sd), PeftConfig("lora", rank=4, targets=("att.value", "ffn.key")))
    g = torch.Generator().manual_seed(1)
    load_adapter_state_dict(adapted, {k: torch.randn(v.shape, generator=g)
                                      for k, v in adapter_state_dict(adapted).items()})
    save_adapter(adapted, None, tmp_path / "adapter.pth")
    merged = model_from_state_dict(merged(adapted))
    _, scheduler = build(_serve_args(checkpoint, "--adapter", str(tmp_path / "adapter.pth")))
    tok = aviary.load_tokenizer(version=7)
    prompt = "The Eiffel tower is in"
    scheduler.start()
    try:
        sink = queue.Queue()
        scheduler.submit(Job([tok.encode(prompt)], GREEDY, sink.put))
        text, _ = _collect(sink)
    finally:
        scheduler.close()
    assert text == generate(merged, tok, prompt, GREEDY) != generate(aviary.load(str(checkpoint)), tok, prompt,
                                                                       GREEDY)


# ---- sessions: the next turn continues from the cached state ----------------------------------------------------


@pytest.mark.parametrize("history_turns", [1, 6])
def test_next_turn_continues_from_the_previous_turns_state(model, history_turns):
    """Turn 2 of a conversation runs only its reply and new message, however long the history, and its
    next-token logits are those of a prefill of the whole conversation."""
    history = "".join(f"User: question {i} about the weather\n\nAssistant: answer {i}, sunny.\n\n"
                      for i in range(history_turns))
    turn1 = TOK.encode(history + "User: and tomorrow?\n\nAssistant:")
    scheduler = Scheduler(Engine(model, TOK, cache=StateCache()), max_batch=4).start()
    try:
        reply, done = _run(scheduler, turn1)
        assert done.cached_tokens == 0
        new = TOK.encode(f"{reply}\n\nUser: thanks!\n\nAssistant:")
        ran = scheduler.metrics.value("prefill_tokens_total")
        _, done = _run(scheduler, turn1 + new)
        assert done.cached_tokens == len(turn1)
        assert scheduler.metrics.value("prefill_tokens_total") - ran == len(new)  # not the history
    finally:
        scheduler.close()
    logits, state, cached = scheduler.engine.prefill(turn1 + new)  # the state turn 2 left in the cache
    assert cached == len(turn1 + new)
    assert_same(logits, state, *forward(model, turn1 + new))


def test_old_conversations_are_evicted_least_recently_used_first(model):
    conversations = prompts_of([30, 31, 32, 33], seed=4)
    one = Engine(model, TOK, cache=StateCache())
    one.prefill(conversations[0])
    entry = one.cache.nbytes
    engine = Engine(model, TOK, cache=StateCache(3 * entry))  # room for three conversations' states
    for tokens in conversations[:3]:
        engine.prefill(tokens)
    engine.prefill(conversations[0])  # conversation 0 comes back: now the most recent
    engine.prefill(conversations[3])  # a fourth one: conversation 1, the least recently used, goes
    assert engine.cache.nbytes <= engine.cache.max_bytes
    hits = [engine.begin_prefill(tokens + [5]).cached_tokens for tokens in conversations]
    assert hits == [30, 0, 32, 33]


# ---- helpers -------------------------------------------------------------------------------------------------


def _collect(sink: queue.Queue, timeout: float = 60.0):
    text, deadline = "", time.time() + timeout
    while True:
        event = sink.get(timeout=max(deadline - time.time(), 0.01))
        if isinstance(event, Piece):
            text += event.text
        elif isinstance(event, Done):
            return text, event
        else:
            raise AssertionError(event)


def _run(scheduler: Scheduler, tokens: list[int]):
    sink = queue.Queue()
    scheduler.submit(Job([tokens], SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=()), sink.put))
    return _collect(sink)


@contextlib.contextmanager
def _counting_calls(model):
    """Count the model's forward calls inside the block: yields a list whose [0] is the count."""
    count = [0]
    original = model.forward

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    model.forward = counting
    try:
        yield count
    finally:
        del model.forward
