"""Scale-out on Ray Serve: N copies of the `aviary serve` app behind one router that keeps each session on one copy.

    client -> Ray Serve's HTTP proxy -> Router -> AppReplica "aviary-0" | "aviary-1" | ...

Each `AppReplica` is a deployment of one replica that builds the same Starlette app as `aviary serve`
(`aviary.commands.serve.build`: its own model, continuous-batching scheduler and prefix-state cache) and runs
the requests the router forwards through that app in-process, as ASGI. One deployment per replica, rather than
one deployment of N replicas, is what lets the router choose the replica: a second turn of a conversation is
cheap only where the state after the first turn is cached.

The router picks a replica by a session key: the `X-Session-Id` header, else the request's `user` field, else
the start of the conversation (a chat's messages up to and including its first user message; a completion's
first `PROMPT_HEAD_CHARS` characters), so every turn of one chat lands on one replica. Requests without a key
(GET, embeddings) go round-robin; a request that names a replica in `X-Aviary-Replica` goes to it (a scraper
reading each replica's /metrics). Keys map to replicas by rendezvous hashing over the live replicas: when one
goes down, only its sessions move (they restart, cold, elsewhere: correctness over affinity), and they move
back when Ray Serve has restarted it. Every response names its replica in `X-Aviary-Replica`; `GET /health`
answers for every replica.

A replica is down while Ray Serve has no running copy of it (the router asks every `WATCH_INTERVAL_S`), or
after it failed a request, until it answers again. A request is retried on the next replica while nothing of
its response has been sent: the replica died, or did not take the request within `ACCEPT_TIMEOUT_S` (Ray
Serve holds requests for a deployment that is restarting). A stream cut by a replica dying mid-response is
not retried: the client has part of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import shlex
import signal
import sys
import time

try:
    import ray
    from ray import serve
except ImportError as e:
    raise ImportError(f"aviary serve --ray needs Ray Serve: pip install 'aviary[ray]' ({e})") from e
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from aviary.serve.protocol import error_body

__all__ = ["APP_NAME", "REPLICA_HEADER", "SESSION_HEADER", "AppReplica", "Router", "app_builder",
           "build_application", "serve_on_ray", "session_key"]

APP_NAME = "aviary"  # the Ray Serve application; its deployments are "router" and "aviary-0" ... "aviary-{N-1}"
REPLICA_HEADER = "x-aviary-replica"
SESSION_HEADER = "x-session-id"
PROMPT_HEAD_CHARS = 256  # a completion's session key: the start of its prompt (a later turn repeats it)
ACCEPT_TIMEOUT_S = 5.0  # a replica answers "accepted" at once; silence this long means it is gone
WATCH_INTERVAL_S = 0.5  # how often the router asks Ray Serve which replicas are running
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding"}  # one connection's business, not forwarded


# ---- the replica: one `aviary serve` app, run in-process ---------------------------------------------------


class AppReplica:
    """One copy of the `aviary serve` app (its own engine and prefix cache), built from the command's options."""

    async def __init__(self, options: dict, name: str):
        from aviary.commands.serve import build, settle_for_serving

        self.name = name
        self.app, self.scheduler = build(argparse.Namespace(**options))
        settle_for_serving()  # this replica's process serves from now on
        self.lifespan = _Lifespan(self.app)
        await self.lifespan.startup()  # starts the scheduler's thread

    async def forward(self, method: str, path: str, query: bytes, headers: list, body: bytes):
        """Run one HTTP request through the app. Yields "accepted" at once (the router's sign of life), then the
        response's {"status", "headers"}, then its body chunks. Cancelled (the client left): the app is told."""
        yield "accepted"
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
                 "root_path": "", "headers": headers, "client": None, "server": None,
                 "state": dict(self.lifespan.state)}
        async for message in _asgi_request(self.app, scope, body):
            yield message

    def health(self) -> dict:
        return {"status": "ok", "replica_id": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(),
                "queue_depth": self.scheduler.queue_depth, "batch_size": self.scheduler.batch_size}

    async def __del__(self):  # Ray Serve calls it when it stops the replica
        await self.lifespan.shutdown()


async def _asgi_request(app, scope: dict, body: bytes):
    """One request through an ASGI app in this process: yields the response's {"status", "headers"}, then the
    non-empty body chunks. Closing the generator early makes the app see the client disconnect."""
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_read = False

    async def receive() -> dict:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()  # after the body, the only message left is the disconnect
        return {"type": "http.disconnect"}

    async def run():
        try:
            await app(scope, receive, sent.put)
        finally:
            sent.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": list(message.get("headers", ()))}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
        await task  # the app's own error, if it had one
    finally:
        gone.set()
        if not task.done():
            task.cancel()  # a streaming response's generator frees its batch rows in its `finally`
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Lifespan:
    """The ASGI lifespan protocol for an app run in-process: its startup starts the scheduler, shutdown stops it."""

    def __init__(self, app):
        self.app, self.state = app, {}
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.task = None

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        self.task = asyncio.create_task(self.app(scope, self.inbox.get, self.outbox.put))
        await self._event("startup")

    async def shutdown(self) -> None:
        if self.task is not None and not self.task.done():
            await self._event("shutdown")

    async def _event(self, name: str) -> None:
        await self.inbox.put({"type": f"lifespan.{name}"})
        message = await self.outbox.get()
        if message["type"] != f"lifespan.{name}.complete":
            raise RuntimeError(f"the app's lifespan {name} failed: {message.get('message', message['type'])}")


# ---- the router ----------------------------------------------------------------------------------------------


def session_key(headers, body: bytes) -> str | None:
    """What keeps a conversation on one replica: the X-Session-Id header, else the `user` field, else the start
    of the conversation (a chat's messages up to its first user message, a completion's prompt head); None for
    a request with none of them."""
    session = headers.get(SESSION_HEADER)
    if session:
        return "session:" + session
    try:
        data = json.loads(body) if body else None
    except (ValueError, RecursionError):  # the replica answers it with a 400
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("user"), str) and data["user"]:
        return "user:" + data["user"]
    messages = data.get("messages")
    if isinstance(messages, list) and messages:
        first_user = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
                          len(messages) - 1)
        return "chat:" + json.dumps(messages[:first_user + 1], sort_keys=True)
    prompt = data.get("prompt")
    if isinstance(prompt, str) and prompt:
        return "prompt:" + prompt[:PROMPT_HEAD_CHARS]
    return None


def rank_replicas(key: str, names: list[str]) -> list[str]:
    """Rendezvous (highest-random-weight) hashing: `names` ordered by their score for `key`. The first live name
    is the key's replica; removing a name moves only the keys that ranked it first."""
    def score(name: str) -> bytes:
        return hashlib.blake2b(f"{name}\0{key}".encode(), digest_size=8).digest()
    return sorted(names, key=score, reverse=True)


class Router:
    """The HTTP ingress: picks a replica per request (session affinity, failover) and streams its response back."""

    def __init__(self, replicas: dict, max_request_bytes: int, body_timeout_s: float):
        self.replicas = replicas  # {name: DeploymentHandle}
        self.max_request_bytes, self.body_timeout_s = max_request_bytes, body_timeout_s
        self.down: set[str] = set()  # replicas not to send requests to, while another one is up
        self.last_report: dict[str, dict] = {}
        self.turn = itertools.count()
        self.watcher = None

    async def __call__(self, request: Request) -> Response:
        if self.watcher is None:  # started here: the constructor may run outside the replica's event loop
            self.watcher = asyncio.get_running_loop().create_task(self._watch_replicas())
        if request.method == "GET" and request.scope["path"] == "/health":
            return await self.health()
        try:
            body = await asyncio.wait_for(self._read_body(request), self.body_timeout_s)
        except _TooLarge:
            return _error(413, f"The request body is larger than this server's limit of {self.max_request_bytes} "
                               "bytes.", "request_too_large")
        except TimeoutError:
            return _error(408, f"The request body did not arrive within {self.body_timeout_s:g} s.",
                          "request_timeout")
        except ClientDisconnect:
            return Response(status_code=499)
        pinned = request.headers.get(REPLICA_HEADER)
        if pinned is not None and pinned not in self.replicas:
            return _error(400, f"There is no replica '{pinned}' ({REPLICA_HEADER}); this server has "
                               f"{', '.join(self.replicas)}.", "unknown_replica")
        for name in self._candidates(pinned or session_key(request.headers, body)):
            stream, start = await self._start(name, request, body)
            if start is not None:
                headers = [(k, v) for k, v in start["headers"] if k.lower() not in HOP_BY_HOP]
                response = StreamingResponse(_chunks(stream), status_code=start["status"])
                response.raw_headers = headers + [(REPLICA_HEADER.encode(), name.encode())]
                return response
        return _error(503, "No replica is serving; retry shortly.", "no_replica", type="server_error")

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            raise _TooLarge
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_request_bytes:
                raise _TooLarge
        return bytes(body)

    def _candidates(self, key: str | None) -> list[str]:
        """Replicas to try in order: the live ones (the one a request names, else by the key's ranking, else
        round-robin), then the down ones."""
        names = list(self.replicas)
        if key in self.replicas:
            ranked = [key] + [n for n in names if n != key]
        elif key is None:
            shift = next(self.turn) % len(names)
            ranked = names[shift:] + names[:shift]
        else:
            ranked = rank_replicas(key, names)
        return [n for n in ranked if n not in self.down] + [n for n in ranked if n in self.down]

    async def _start(self, name: str, request: Request, body: bytes):
        """(stream, the response's start message) from replica `name`, or (None, None) when it failed before
        sending anything (it is marked down; the caller tries the next one)."""
        handle = self.replicas[name].options(stream=True)
        stream = handle.forward.remote(request.method, request.scope["path"], request.scope["query_string"],
                                       list(request.headers.raw), body)
        try:
            if await asyncio.wait_for(stream.__anext__(), ACCEPT_TIMEOUT_S) != "accepted":
                raise RuntimeError("the replica broke the protocol")
            start = await stream.__anext__()  # a whole non-streamed response is generated before its start
        except (ray.exceptions.RayError, TimeoutError, StopAsyncIteration, RuntimeError) as e:
            stream.cancel()
            self.down.add(name)
            print(f"aviary router: replica {name} is down ({type(e).__name__}); trying another", file=sys.stderr)
            return None, None
        except asyncio.CancelledError:  # the client left while waiting: the replica's work stops too
            stream.cancel()
            raise
        self.down.discard(name)
        return stream, start

    async def health(self) -> JSONResponse:
        """Every replica's own report ({"status": "down"} for one that is not serving); 503 if none is."""
        async def ask(name: str) -> dict:
            if name not in self.down and await self._answers(name):
                return self.last_report[name]
            return {"status": "down"}

        reports = dict(zip(self.replicas, await asyncio.gather(*map(ask, self.replicas)), strict=True))
        up = sum(r["status"] == "ok" for r in reports.values())
        status = "ok" if up == len(reports) else "degraded" if up else "down"
        return JSONResponse({"status": status, "replicas": reports}, status_code=200 if up else 503)

    async def _answers(self, name: str) -> bool:
        try:
            self.last_report[name] = await asyncio.wait_for(self.replicas[name].health.remote(), ACCEPT_TIMEOUT_S)
            return True
        except (ray.exceptions.RayError, TimeoutError):
            return False

    async def _watch_replicas(self) -> None:
        """Keeps `down` current: a replica is down while Ray Serve has no running copy of it (it died and is
        restarting), and one that failed a request stays down until it answers again."""
        app = serve.get_replica_context().app_name
        while True:
            try:
                deployments = (await asyncio.to_thread(serve.status)).applications[app].deployments
            except Exception as e:  # the controller is restarting: keep the last view
                print(f"aviary router: no status from Ray Serve ({type(e).__name__}: {e})", file=sys.stderr)
            else:
                for name in self.replicas:
                    if name not in deployments or not deployments[name].replica_states.get("RUNNING", 0):
                        self.down.add(name)
                    elif name in self.down and await self._answers(name):
                        self.down.discard(name)
                        print(f"aviary router: replica {name} is back", file=sys.stderr)
            await asyncio.sleep(WATCH_INTERVAL_S)


class _TooLarge(Exception):
    pass


async def _chunks(stream):
    try:
        async for chunk in stream:
            yield chunk
    finally:  # the client left mid-stream: stop the replica's work
        stream.cancel()


def _error(status: int, message: str, code: str, type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, type, code=code), status_code=status)


# ---- the application and the command ---------------------------------------------------------------------


def build_application(args: argparse.Namespace, keys: list[str]):
    """The Ray Serve application for `aviary serve --ray`: a router and `args.replicas` app replicas, each built
    from the same options. `keys` are the API keys, resolved here (a cluster's nodes do not share environments)."""
    options = {k: v for k, v in vars(args).items() if not k.startswith("_")}  # no parser or function: picklable
    options.update(api_key=keys, api_key_file=None)
    # The app answers 429 past --max-queue itself, so Ray must not queue in front of it.
    ongoing = args.max_batch + args.max_queue + 16
    logs = {"log_level": args.log_level.upper()}  # Ray Serve's request log is at INFO: --log-level warning quiets it
    replica = serve.deployment(AppReplica).options(
        num_replicas=1, max_ongoing_requests=ongoing, ray_actor_options={"num_cpus": 1},
        health_check_period_s=2, health_check_timeout_s=10, logging_config=logs)
    replicas = {f"aviary-{i}": replica.options(name=f"aviary-{i}").bind(options, f"aviary-{i}")
                for i in range(args.replicas)}
    router = serve.deployment(Router).options(name="router", num_replicas=1, ray_actor_options={"num_cpus": 0},
                                              max_ongoing_requests=ongoing * args.replicas, logging_config=logs)
    return router.bind(replicas, args.max_request_bytes, args.body_timeout)


def app_builder(config: dict):
    """The application for Ray Serve's own launchers (`serve run`, `serve deploy`, KubeRay's serveConfigV2):
    `import_path: aviary.serve.ray_app:app_builder` with `args: {argv: "MODEL --replicas 2 ..."}`, the options of
    `aviary serve --ray`. The address and port are then Ray Serve's settings, not --host and --port."""
    from aviary.cli import build_parser
    from aviary.commands.serve import ray_options

    argv = config.get("argv") if isinstance(config, dict) else None
    if not isinstance(argv, str):
        raise ValueError('app_builder takes args {"argv": "MODEL [options of aviary serve]"}')
    try:
        args = build_parser().parse_args(["serve", *shlex.split(argv), "--ray"])
    except SystemExit:  # argparse has printed why
        raise ValueError(f"app_builder: bad options in {argv!r} (the reason is on stderr)") from None
    return build_application(args, ray_options(args))


def start_ray(args: argparse.Namespace) -> None:
    """Join the cluster at --ray-address, or start a local one with no dashboard and room for every replica."""
    if args.ray_address:
        ray.init(address=args.ray_address, logging_level="warning")
    else:
        # each replica asks Ray for one CPU: a machine with fewer cores than replicas still fits them all
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, args.replicas), include_dashboard=False,
                 logging_level="warning")
    serve.start(http_options={"host": args.host, "port": args.port})


def serve_on_ray(args: argparse.Namespace, keys: list[str]) -> int:
    """`aviary serve --ray`: deploy, serve until Ctrl-C, then remove the application (and a local cluster)."""
    start_ray(args)
    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which sets its own: a service manager's stop
    try:
        serve.run(build_application(args, keys), name=APP_NAME, route_prefix="/", blocking=False)
        print(f"aviary serve: {args.replicas} replicas on Ray Serve at http://{args.host}:{args.port}/v1",
              file=sys.stderr)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    finally:
        if args.ray_address:
            serve.delete(APP_NAME)  # the cluster is someone else's: leave Serve and Ray running
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM: shut down as on Ctrl-C
