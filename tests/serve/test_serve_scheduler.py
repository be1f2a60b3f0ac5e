"""The scheduler without any web code (jobs in, events out through a plain queue) and the chat prompt format."""

import queue
import time

import pytest

from aviary.generation import Engine, SamplingParams, StateCache, generate
from aviary.loading import model_from_state_dict
from aviary.serve.chat_format import ChatMessage, prompt_segments, prompt_tokens
from aviary.serve.scheduler import Done, Failed, Job, Piece, QueueFull, Scheduler, SchedulerClosed
from aviary.testing import ByteTokenizer, random_config, random_state_dict

TOK = ByteTokenizer()
GREEDY = SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=())


@pytest.fixture(scope="module")
def model():
    return model_from_state_dict(random_state_dict(random_config(7, n_layer=2, n_embd=64, head_size=32,
                                                                 vocab_size=257), seed=3))


def run_job(scheduler, prompts, params=GREEDY, n=1, timeout=30.0):
    events: queue.Queue = queue.Queue()
    job = scheduler.submit(Job([TOK.encode(p) for p in prompts], params, events.put, n=n))
    texts = [""] * job.width
    deadline = time.time() + timeout
    while True:
        event = events.get(timeout=max(deadline - time.time(), 0.01))
        if isinstance(event, Piece):
            texts[event.index] += event.text
        elif isinstance(event, Done):
            return texts, event
        else:
            raise AssertionError(event)


def test_jobs_in_one_batch_equal_the_engine_alone(model):
    prompts = ["Hello", "The quick brown fox", "é!"]
    scheduler = Scheduler(Engine(model, TOK, cache=StateCache()), max_batch=8).start()
    try:
        texts, done = run_job(scheduler, prompts, n=2)
        assert texts == [t for t in generate(model, TOK, prompts, GREEDY) for _ in range(2)]
        assert done.prompt_tokens == sum(len(TOK.encode(p)) for p in prompts)
        assert done.completion_tokens == 6 * 10
        assert done.cached_tokens == 0
        again, done = run_job(scheduler, prompts[:1])
        assert again == texts[:1] and done.cached_tokens == len(TOK.encode(prompts[0]))
    finally:
        scheduler.close()
    assert scheduler.metrics.value("requests_total", status="ok") == 2


def test_queue_limit_cancel_and_close(model):
    scheduler = Scheduler(Engine(model, TOK), max_batch=2, max_queue=1)  # not started: jobs stay queued
    long = SamplingParams(temperature=0, max_new_tokens=10_000, stop_token_ids=())
    events: queue.Queue = queue.Queue()
    waiting = scheduler.submit(Job([TOK.encode("a")], long, events.put))
    with pytest.raises(QueueFull):
        scheduler.submit(Job([TOK.encode("b")], long, events.put))
    with pytest.raises(ValueError, match="at most 2"):
        scheduler.submit(Job([TOK.encode("c")], long, events.put, n=3))
    scheduler.cancel(waiting)
    assert scheduler.queue_depth == 0
    running = scheduler.submit(Job([TOK.encode("d")], long, events.put))
    scheduler.start()
    assert isinstance(events.get(timeout=30), Piece)
    scheduler.cancel(running)
    deadline = time.time() + 30
    while scheduler.batch_size:
        assert time.time() < deadline
        time.sleep(0.01)
    scheduler.close()
    assert scheduler.metrics.value("requests_total", status="cancelled") == 2
    assert scheduler.metrics.value("requests_total", status="rejected") == 1


def test_a_failing_prefill_fails_only_its_job(model):
    scheduler = Scheduler(Engine(model, TOK), max_batch=4).start()
    try:
        events: queue.Queue = queue.Queue()
        scheduler.submit(Job([[999]], GREEDY, events.put))  # outside the 257-token vocabulary
        assert isinstance(events.get(timeout=30), Failed)
        assert run_job(scheduler, ["still fine"])[0] == [generate(model, TOK, "still fine", GREEDY)]
    finally:
        scheduler.close()


def test_chat_prompt_format():
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi\n\n\nthere"),
                ChatMessage("assistant", " Hello! "), ChatMessage("user", "Bye")]
    assert "".join(prompt_segments(messages)) == ("System: Be brief.\n\nUser: Hi\nthere\n\n"
                                                  "Assistant: Hello!\n\nUser: Bye\n\nAssistant:")
    assert "".join(prompt_segments(messages[1:2])) == "User: Hi\nthere\n\nAssistant:"
    with pytest.raises(ValueError):
        prompt_segments([])


def test_a_conversation_extends_its_earlier_prompt():
    """The next turn's tokens start with the previous prompt's tokens (and the reply's), so the cache hits."""
    first = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")]
    tokens, boundaries = prompt_tokens(first, TOK)
    reply = " Hello there"  # as generated after "Assistant:"
    nxt = [*first, ChatMessage("assistant", reply.strip()), ChatMessage("user", "More")]
    more, more_boundaries = prompt_tokens(nxt, TOK)
    assert more[:len(tokens)] == tokens
    assert more[len(tokens):].__len__() > 0 and TOK.decode(more[len(tokens):]).startswith(reply)
    assert boundaries == more_boundaries[:len(boundaries)]
    assert TOK.decode(tokens[:boundaries[0]]) == "System: Be brief.\n\n"


def test_close_fails_running_and_waiting_jobs(model):
    scheduler = Scheduler(Engine(model, TOK), max_batch=1).start()
    long = SamplingParams(temperature=0, max_new_tokens=10_000, stop_token_ids=())
    running, waiting = queue.Queue(), queue.Queue()
    scheduler.submit(Job([TOK.encode("a")], long, running.put))
    assert isinstance(running.get(timeout=30), Piece)
    scheduler.submit(Job([TOK.encode("b")], long, waiting.put))
    scheduler.close()
    assert isinstance(waiting.get(timeout=5), Failed)
    events = []
    while not running.empty():
        events.append(running.get_nowait())
    assert isinstance(events[-1], Failed) and all(isinstance(e, Piece) for e in events[:-1])
    with pytest.raises(SchedulerClosed):
        scheduler.submit(Job([TOK.encode("c")], long, waiting.put))
