"""`aviary serve --ray`. Live (slow): two app replicas on Ray Serve behind the session router, driven by the
real `openai` client: every endpoint works through the router and names its replica; 32 concurrent streams all
finish; one session stays on one replica (and its second turn starts from the prefix cache there), different
sessions spread over both; a killed replica's sessions move to the other one, and the replica comes back.
Without a cluster (fast): session keys, rendezvous hashing, the router's failover on replicas that die or hang
before answering, and the in-process ASGI call that runs a request on a replica.

Needs the `ray` extra (pip install 'aviary[ray]', ~500 MB: not in `test`); skipped without it."""

import asyncio
import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

ray = pytest.importorskip("ray", reason="needs Ray Serve: pip install 'aviary[ray]'")
serve = pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install 'aviary[ray]'")
ray_app = pytest.importorskip("aviary.serve.ray_app")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = "test-key"
MODEL = "tiny-v7"  # the `checkpoint` fixture's file stem (tests/conftest.py)
REPLICAS = {"aviary-0", "aviary-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def url(checkpoint):
    """Two replicas on a small local Ray cluster (no dashboard, a small object store), from the options of
    `aviary serve MODEL --ray --replicas 2`, through the builder that Ray Serve's own launchers call."""
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False,
             logging_level="warning")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        argv = f"{checkpoint} --replicas 2 --api-key {KEY} --threads 1 --max-tokens 5000 --max-request-bytes 20000"
        serve.run(ray_app.app_builder({"argv": argv}), name=ray_app.APP_NAME, route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def chat(client, text: str, session: str | None = None, **kwargs):
    """(the replica that answered, the parsed completion)."""
    headers = {"X-Session-Id": session} if session else {}
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=4, temperature=0,
        extra_headers=headers, **kwargs)
    return raw.headers["x-aviary-replica"], raw.parse()


def health(url) -> dict:
    return httpx.get(url + "/health", timeout=30).json()


@pytest.mark.slow
def test_every_endpoint_through_the_router(url, client):
    report = health(url)
    assert report["status"] == "ok" and set(report["replicas"]) == REPLICAS
    assert all(r["status"] == "ok" for r in report["replicas"].values())
    assert [m.id for m in client.models.list()] == [MODEL]

    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    assert raw.headers["x-aviary-replica"] in REPLICAS and raw.parse().usage.completion_tokens == 3
    pieces = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0, stream=True))
    assert pieces[-1].choices[0].finish_reason == "length"
    replica, reply = chat(client, "Hi")
    assert replica in REPLICAS and reply.choices[0].finish_reason == "length"
    raw = client.embeddings.with_raw_response.create(model=MODEL, input=["one", "two"])
    assert raw.headers["x-aviary-replica"] in REPLICAS and len(raw.parse().data) == 2

    # the replica's own errors come through unchanged; the router answers the ones it sees first
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    big = httpx.post(url + "/v1/completions", content=b"x" * 30000, headers={"Authorization": f"Bearer {KEY}"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"


@pytest.mark.slow
def test_32_concurrent_streams(client):
    def stream(i: int) -> tuple[str, str, int]:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": f"Tell me about {i}"}], max_tokens=12, stream=True,
            temperature=0, extra_headers={"X-Session-Id": f"stream-{i}"})
        chunks = list(raw.parse())
        return raw.headers["x-aviary-replica"], chunks[-1].choices[0].finish_reason, len(chunks)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(stream, range(32)))
    # every stream ends with a finish reason (a random model may write the chat format's stop text: "stop")
    assert all(reason in ("length", "stop") and n >= 2 for _, reason, n in results), results
    assert {replica for replica, _, _ in results} == REPLICAS  # 32 sessions never all hash to one of two


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_frees_its_rows(url):
    """The disconnect travels proxy -> router -> replica -> app: the replica's batch empties long before the
    5,000 tokens asked for would have been written."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5000, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}", "X-Session-Id": "leaver"}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=60) as response:
        replica = response.headers["x-aviary-replica"]
        lines = response.iter_lines()
        assert [next(lines) for _ in range(3)][0].startswith("data: ")
        assert health(url)["replicas"][replica]["batch_size"] == 1
    deadline = time.time() + 10
    while health(url)["replicas"][replica]["batch_size"]:
        assert time.time() < deadline, "the replica kept generating for a client that left"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_session_stays_on_one_replica(client):
    for session in ("alice", "bob", "carol"):
        assert len({chat(client, f"turn {i}", session)[0] for i in range(3)}) == 1
    spread = {chat(client, "Hi", f"user-{i}")[0] for i in range(12)}
    assert spread == REPLICAS
    # no header: the `user` field, else the conversation's start, keeps a chat on one replica
    assert len({chat(client, f"turn {i}", user="dave")[0] for i in range(3)}) == 1

    first = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=first, max_tokens=4,
                                                            temperature=0)
    answer = raw.parse().choices[0].message.content
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Another."}]
    raw2 = client.chat.completions.with_raw_response.create(model=MODEL, messages=second, max_tokens=4,
                                                             temperature=0)
    assert raw2.headers["x-aviary-replica"] == raw.headers["x-aviary-replica"]
    assert raw2.parse().usage.prompt_tokens_details.cached_tokens > 0  # turn two starts from turn one's state


@pytest.mark.slow
def test_a_killed_replica_fails_over_and_comes_back(url, client):
    victim = chat(client, "Hi", "victim")[0]
    other = (REPLICAS - {victim}).pop()
    before = health(url)["replicas"][victim]["replica_id"]
    actor = ray.get_actor(f"SERVE_REPLICA::{ray_app.APP_NAME}#{victim}#{before}", namespace="serve")
    ray.kill(actor, no_restart=True)
    deployments = serve.status().applications[ray_app.APP_NAME].deployments
    deadline = time.time() + 60  # Ray Serve sees it die, then takes seconds to start a new one
    while deployments[victim].replica_states.get("RUNNING", 0):
        assert time.time() < deadline, f"Ray Serve did not see {victim} die"
        time.sleep(0.05)
        deployments = serve.status().applications[ray_app.APP_NAME].deployments
    while health(url)["replicas"][victim]["status"] != "down":  # the router asks Ray Serve every 0.5 s
        assert time.time() < deadline, f"the router did not see {victim} go down"
        time.sleep(0.05)

    # meanwhile its session moves to the other replica, which keeps serving every session; unless Ray Serve has
    # already started the replacement (this model loads in about a second) and the router found it: then the
    # session is back where it belongs
    moved = chat(client, "Hi", "victim")[0]
    if moved != other:
        report = health(url)["replicas"][victim]
        assert moved == victim and report["status"] == "ok" and report["replica_id"] != before, \
            f"answered by {moved} while it was down: {health(url)}"
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda i: chat(client, "Hi", f"after-{i}")[0], range(8))) <= REPLICAS

    deadline = time.time() + 120  # Ray Serve starts a new replica; the router finds it back
    while (report := health(url)["replicas"][victim])["status"] != "ok" or report["replica_id"] == before:
        assert time.time() < deadline, f"{victim} did not come back: {report}"
        time.sleep(1)
    back = chat(client, "Hi", "victim")[0]
    assert back == victim, f"answered by {back} after {victim} came back: {health(url)}"


# ---- without a cluster --------------------------------------------------------------------------------------


def body(data: dict) -> bytes:
    return json.dumps(data).encode()


def test_session_key_keeps_a_conversation_together():
    key = ray_app.session_key
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    later = first + [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More"}]
    assert key({}, body({"messages": first})) == key({}, body({"messages": later})) is not None
    assert key({}, body({"messages": first})) != key({}, body({"messages": first[:1] + [later[3]]}))
    assert key({}, body({"prompt": "x" * 300})) == key({}, body({"prompt": "x" * 300 + "next turn"}))
    assert key({}, body({"messages": later, "user": "ann"})) == key({}, body({"prompt": "y", "user": "ann"}))
    assert key({"x-session-id": "s1"}, body({"user": "ann"})) == "session:s1"
    for unkeyed in (b"", b"not json", b"[1]", body({"input": ["a"]}), body({"messages": [], "user": ""})):
        assert key({}, unkeyed) is None


def test_rendezvous_hashing_moves_only_the_lost_replicas_keys():
    names = ["aviary-0", "aviary-1", "aviary-2"]
    keys = [f"session:{i}" for i in range(300)]
    owner = {k: ray_app.rank_replicas(k, names)[0] for k in keys}
    assert all(60 < list(owner.values()).count(n) < 140 for n in names)  # spread (expected 100 each)
    survivors = ["aviary-0", "aviary-2"]
    for k in keys:
        assert ray_app.rank_replicas(k, survivors)[0] == (owner[k] if owner[k] in survivors else
                                                          ray_app.rank_replicas(k, names)[1])


class FakeStream:
    """What `handle.options(stream=True).forward.remote(...)` returns: the replica's messages, or a failure."""

    def __init__(self, behaviour: str):
        self.behaviour, self.cancelled = behaviour, False
        self.items = ["accepted", {"status": 200, "headers": [(b"content-type", b"text/plain")]}, b"he", b"llo"]

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.behaviour == "dead":
            raise ray.exceptions.ActorDiedError()
        if self.behaviour == "hangs":
            await asyncio.sleep(3600)
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True


class FakeReplica:
    def __init__(self, behaviour: str):
        self.behaviour, self.streams = behaviour, []

    def options(self, stream: bool):
        return self

    @property
    def forward(self):
        return self

    def remote(self, *args):
        self.streams.append(FakeStream(self.behaviour))
        return self.streams[-1]


def route(router, data: bytes, session: str, replica: str | None = None) -> tuple[int, dict, bytes]:
    async def call():
        headers = [(b"x-session-id", session.encode()), (b"content-length", str(len(data)).encode())]
        headers += [(b"x-aviary-replica", replica.encode())] if replica else []
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
                 "headers": headers}

        async def receive():
            return {"type": "http.request", "body": data, "more_body": False}

        response = await router(Request(scope, receive))
        content = b"".join([chunk async for chunk in response.body_iterator]) \
            if hasattr(response, "body_iterator") else response.body
        return response.status_code, dict(response.headers), content
    return asyncio.run(call())


@pytest.mark.parametrize("failure", ["dead", "hangs"])
def test_router_fails_over_before_the_response_starts(monkeypatch, failure):
    monkeypatch.setattr(ray_app, "ACCEPT_TIMEOUT_S", 0.2)
    replicas = {"aviary-0": FakeReplica(failure), "aviary-1": FakeReplica("ok")}
    router = ray_app.Router(replicas, max_request_bytes=100, body_timeout_s=5)
    router.watcher = "not started"  # it asks Ray Serve for the replicas' states: no cluster here
    session = next(f"s{i}" for i in range(100)
                   if ray_app.rank_replicas(f"session:s{i}", list(replicas))[0] == "aviary-0")
    status, headers, content = route(router, b"{}", session)
    assert (status, headers["x-aviary-replica"], content) == (200, "aviary-1", b"hello")
    assert router.down == {"aviary-0"} and replicas["aviary-0"].streams[0].cancelled
    route(router, b"{}", session)  # a replica marked down is not tried again while another one is up
    assert len(replicas["aviary-0"].streams) == 1 and len(replicas["aviary-1"].streams) == 2

    replicas["aviary-1"].behaviour = "dead"
    status, _, content = route(router, b"{}", session)
    assert status == 503 and json.loads(content)["error"]["code"] == "no_replica"
    status, _, content = route(router, b"x" * 101, session)
    assert status == 413 and json.loads(content)["error"]["code"] == "request_too_large"


def test_asgi_request_streams_and_tells_the_app_when_the_client_leaves():
    finished = []

    async def tokens(request):
        async def pieces():
            try:
                for i in range(1000):
                    yield f"{i} "
                    await asyncio.sleep(0.001)
            finally:
                finished.append(True)
        return StreamingResponse(pieces(), media_type="text/plain")

    app = Starlette(routes=[Route("/t", tokens, methods=["POST"])])
    scope = {"type": "http", "asgi": {"version": "3.0"}, "method": "POST", "path": "/t", "raw_path": b"/t",
             "query_string": b"", "root_path": "", "headers": [], "client": None, "server": None}

    async def first_three():
        stream = ray_app._asgi_request(app, scope, b"")
        got = [await stream.__anext__() for _ in range(3)]
        await stream.aclose()  # the client left
        await asyncio.sleep(0.05)
        return got, list(finished)  # before asyncio.run cancels what is left

    (start, *chunks), finished_then = asyncio.run(first_three())
    assert start["status"] == 200 and chunks == [b"0 ", b"1 "] and finished_then == [True]


def test_without_ray_the_command_names_the_extra(checkpoint, monkeypatch, capsys):
    from aviary.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.delitem(sys.modules, "aviary.serve.ray_app")
    monkeypatch.delattr(sys.modules["aviary.serve"], "ray_app")  # else `from aviary.serve import ray_app` finds it
    assert main(["serve", str(checkpoint), "--ray", "--port", str(free_port())]) == 2
    assert "pip install 'aviary[ray]'" in capsys.readouterr().err


def test_app_builder_refuses_bad_options(checkpoint):
    for config in ({}, {"argv": 3}, {"argv": f"{checkpoint} --replicas 0"}, {"argv": f"{checkpoint} --bogus"}):
        with pytest.raises(ValueError):
            ray_app.app_builder(config)


def test_a_request_can_name_its_replica():
    replicas = {"aviary-0": FakeReplica("ok"), "aviary-1": FakeReplica("ok")}
    router = ray_app.Router(replicas, max_request_bytes=100, body_timeout_s=5)
    router.watcher = "not started"
    for name in replicas:
        assert {route(router, b"{}", f"s{i}", replica=name)[1]["x-aviary-replica"] for i in range(8)} == {name}
    status, _, content = route(router, b"{}", "s", replica="aviary-9")
    assert status == 400 and json.loads(content)["error"]["code"] == "unknown_replica"
