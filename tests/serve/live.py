"""A live `aviary serve` for tests: an ASGI app on a free loopback port, in a thread, served by the same
uvicorn server (`aviary.serve.connections.make_server`) that the command runs."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from aviary.serve.app import Limits
from aviary.serve.connections import make_server


class LiveServer:
    def __init__(self, app, limits: Limits | None = None, metrics=None):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        kwargs = {"metrics": metrics} if metrics is not None else {}
        self.server = make_server(app, limits or Limits(), log_level="warning", **kwargs)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)

    @property
    def open_connections(self) -> int:
        return len(self.server.server_state.connections)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class ScriptedSampler:
    """Replaces the engine's sampler (`aviary.generation.engine.sample_batch`) so a test knows what a model
    writes: each new sequence (told apart by its random generator) writes the tokens of the text last given to
    `say` (a string, or pieces tokenised one by one), one a step (`delay` seconds each), then the end-of-text id 0.
    `say(None)` hands new sequences to `real`, the sampler it replaces."""

    def __init__(self, tokenizer, real: Callable | None = None):
        self.tokenizer, self.real, self.ids, self.delay, self.steps = tokenizer, real, [], 0.0, {}

    def say(self, text: str | list[str] | None, delay: float = 0.0) -> None:
        pieces = [text] if isinstance(text, str) else text
        self.ids = None if pieces is None else [t for piece in pieces for t in self.tokenizer.encode(piece)]
        self.delay = delay

    def __call__(self, logits, params, generators) -> list[int]:
        if self.ids is None and self.real is not None:
            return self.real(logits, params, generators)
        if self.delay:
            time.sleep(self.delay)
        out = []
        for g in generators:
            ids = self.steps.setdefault(g, [self.ids or [], 0])  # a new sequence takes the current script
            out.append(ids[0][ids[1]] if ids[1] < len(ids[0]) else 0)
            ids[1] += 1
        return out


@contextlib.contextmanager
def scripted_sampling(tokenizer, real: Callable | None = None) -> Iterator[ScriptedSampler]:
    """A `ScriptedSampler` in place of the engine's sampler while the block runs (a module fixture yields it)."""
    script = ScriptedSampler(tokenizer, real)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("aviary.generation.engine.sample_batch", script)
        yield script


def recording_server(model, tokenizer, *, model_name: str, **app_options) -> LiveServer:
    """A live app over `model` whose `.prompts` lists the prompt text of every request it was sent (what the chat
    format rendered), in order. `app_options` go to `create_app` (chat_format, web_ui, ...)."""
    from aviary.generation import Engine
    from aviary.serve.app import create_app
    from aviary.serve.scheduler import Scheduler

    prompts: list[str] = []

    class Recording(Scheduler):
        def submit(self, job):
            prompts.append(tokenizer.decode(job.prompts[0]))
            return super().submit(job)

    live = LiveServer(create_app(Recording(Engine(model, tokenizer)), tokenizer, model_name=model_name,
                                 **app_options))
    live.prompts = prompts
    return live
