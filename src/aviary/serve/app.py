"""The HTTP layer: an OpenAI-compatible Starlette app in front of a `Scheduler`.

    GET  /health               liveness, queue depth and batch size (no key needed)
    GET  /metrics              Prometheus text: requests, tokens, queue depth, batch size, latencies
    GET  /v1/models            the one model this server runs
    POST /v1/completions       prompt -> text; "stream": true for server-sent events ending with [DONE]
    POST /v1/chat/completions  messages -> reply, in the server's chat format (aviary/chat_format.py: world, g1,
                               raven); a G1 reply's reasoning comes apart from its answer, in reasoning_content;
                               tools, tool_choice, response_format: aviary/serve/tool_calls.py
    POST /v1/embeddings        input -> vectors (aviary/serve/embeddings.py)
    GET  /, /static/NAME       the web chat page (aviary/serve/webui.py; no key needed: it holds no data)

Everything a client can get wrong is answered with OpenAI's error JSON and a 4xx status: no or wrong key
(401), an unknown route (404) or model (404), a body too large (413) or too slow to arrive (408), malformed
JSON, text that is not valid Unicode or a bad field (400), a prompt or `max_tokens` over the limits (400), a
full queue (429 with Retry-After). A client that disconnects, while sending, waiting or mid-stream, has its
request cancelled and its batch rows freed (counted as code 499, never as a server error).

Each API key is a tenant of the prefix cache: a client never starts from (nor learns of) another key's
prefixes. Deadlines for the request head and a cap on connections are the HTTP protocol's (connections.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from aviary.chat_format import ChatFormat, get_format
from aviary.generation.params import SETTINGS, SamplingParams
from aviary.serve import webui
from aviary.serve.embeddings import Embeddings
from aviary.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    error_body,
    lone_surrogate_error,
    validation_error,
)
from aviary.serve.scheduler import Done, Failed, Job, Piece, QueueFull, Scheduler, SchedulerClosed
from aviary.serve.tool_calls import ToolCallParser, grammar_param, plan_chat

__all__ = ["Limits", "create_app"]

log = logging.getLogger("aviary.serve")


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 1 << 20  # request body
    max_prompt_tokens: int = 8192  # per prompt (a chat's whole conversation)
    max_tokens: int = 2048  # the largest max_tokens a request may ask for; chat's default
    retry_after_s: int = 1  # the Retry-After of a 429
    body_timeout_s: float = 30.0  # the whole request body must arrive within it (408)
    # enforced by the HTTP protocol (connections.py), not by the app:
    header_timeout_s: float = 10.0  # the request line and headers must arrive within it (408)
    max_connections: int = 512  # open connections at most (503 past it)


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


class _Api:
    def __init__(self, scheduler: Scheduler, tokenizer, model_name: str, limits: Limits, api_keys: list[str],
                 chat_format: str | ChatFormat = "world"):
        self.scheduler, self.tokenizer, self.model_name = scheduler, tokenizer, model_name
        self.chat_format = get_format(chat_format)
        self.limits = limits
        self.api_keys = [key.encode() for key in api_keys]
        self.vocab_size = scheduler.engine.vocab_size
        self._grammars = None  # aviary.generation.constraints.Grammars, built on the first request that needs it
        self.created = int(time.time())
        self.metrics = scheduler.metrics
        self.metrics.counter("http_responses_total", "HTTP responses by route and status code.")

    # ---- checks shared by every endpoint ------------------------------------------------------

    def authorize(self, request: Request) -> int | None:
        """The client's tenant: the index of its API key (None when the server has no keys: one tenant)."""
        if not self.api_keys:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip().encode()
        matches = [hmac.compare_digest(token, key) for key in self.api_keys]  # all of them: the time tells nothing
        if scheme.lower() != "bearer" or not any(matches):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        return matches.index(True)

    async def read_json(self, request: Request) -> dict:
        timeout = self.limits.body_timeout_s
        try:  # a deadline for the whole body: a client sending a byte now and then cannot hold the request open
            body = await asyncio.wait_for(self._read_body(request), timeout)
        except TimeoutError:
            raise ApiError(408, f"The request body did not arrive within {timeout:g} s.", code="request_timeout",
                           headers={"Connection": "close"}) from None
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from None
        except ValueError:  # Python refuses to convert integers of more than 4,300 digits
            raise ApiError(400, "The request body holds a number too long to read (an integer of more than "
                                "4,300 digits).", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "The request body's JSON is nested too deeply.", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
        error = lone_surrogate_error(data)
        if error is not None:
            raise error
        return data

    async def _read_body(self, request: Request) -> bytearray:
        limit = self.limits.max_request_bytes
        too_large = ApiError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                             code="request_too_large", headers={"Connection": "close"})  # the rest is not read
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return body

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"The model '{name}' does not exist; this server runs '{self.model_name}'.",
                           param="model", code="model_not_found")

    def check_prompt(self, tokens: list[int], param: str) -> list[int]:
        if not tokens:
            raise ApiError(400, f"The {param} is empty.", param=param, code="invalid_value")
        if len(tokens) > self.limits.max_prompt_tokens:
            raise ApiError(400, f"The {param} is {len(tokens)} tokens; this server accepts at most "
                                f"{self.limits.max_prompt_tokens}.", param=param, code="context_length_exceeded")
        bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"Token id {bad} is outside the vocabulary [0, {self.vocab_size}).", param=param,
                           code="invalid_value")
        return tokens

    def token_lists(self, raw, param: str, max_items: int | None = None) -> list[list[int]]:
        """A request's `prompt`/`input` (a string, a list of token ids, or a list of either) -> one checked
        token list per item; `max_items` caps how many items one request may hold."""
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise ApiError(400, f"The {param} is empty.", param=param, code="invalid_value")
        if max_items is not None and len(raw) > max_items:
            raise ApiError(400, f"The {param} has {len(raw)} items; this server accepts at most {max_items}.",
                           param=param, code="invalid_value")
        return [self.check_prompt(self.tokenizer.encode(x) if isinstance(x, str) else list(x), param) for x in raw]

    def sampling(self, req, max_tokens: int | None, stop: tuple[str, ...] = ()) -> SamplingParams:
        if req.unsupported():
            raise ApiError(400, f"This server does not support '{req.unsupported()}'.", param=req.unsupported(),
                           code="unsupported_parameter")
        if max_tokens is None:
            max_tokens = self.limits.max_tokens
        if max_tokens > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {self.limits.max_tokens}.",
                           param="max_tokens", code="invalid_value")
        user_stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        # a field left out (None) keeps SamplingParams' default, which is OpenAI's (aviary.generation.params)
        given = {s.name: getattr(req, s.name) for s in SETTINGS if s.api and getattr(req, s.name) is not None}
        try:
            return SamplingParams(max_new_tokens=max_tokens, stop=stop + user_stop, **given)
        except ValueError as e:  # the ranges above are OpenAI's; the sampler checks its own as well
            raise ApiError(400, str(e), code="invalid_value") from None

    # ---- endpoints ----------------------------------------------------------------------------

    async def health(self, request: Request):
        return JSONResponse({"status": "ok", "model": self.model_name, "queue_depth": self.scheduler.queue_depth,
                             "batch_size": self.scheduler.batch_size})

    async def metrics_text(self, request: Request):
        self.authorize(request)
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(self, request: Request):
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request):
        self.authorize(request)
        self.check_model(request.path_params["name"])
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "aviary"}

    async def completions(self, request: Request):
        tenant = self.authorize(request)
        req = _validate(CompletionRequest, await self.read_json(request))
        self.check_model(req.model)
        prompts = self.token_lists(req.prompt, "prompt")
        params = self.sampling(req, req.max_tokens)
        job = Job(prompts, params, sink=None, n=req.n or 1, namespace=tenant)
        return await self.respond(request, req, job, _TextFormat())

    async def chat(self, request: Request):
        tenant = self.authorize(request)
        req = _validate(ChatRequest, await self.read_json(request))
        self.check_model(req.model)
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise ApiError(400, "Give max_tokens or max_completion_tokens, not both.", param="max_tokens",
                           code="invalid_value")
        chat_format = self.chat_format
        param = grammar_param(req)  # tools, tool_choice, response_format: aviary/serve/tool_calls.py
        if param is None:
            plan = plan_chat(req, chat_format, None)
        else:  # compiling a grammar takes a millisecond or more: not on the event loop
            plan = await asyncio.to_thread(plan_chat, req, chat_format, await self.grammars(param))
        tokens, boundaries = chat_format.tokens(plan.messages, self.tokenizer, effort=plan.effort)
        self.check_prompt(tokens, "messages")
        max_tokens = req.max_completion_tokens if req.max_tokens is None else req.max_tokens
        # a reply never runs into the next turn; a constrained one ends where its grammar does
        params = self.sampling(req, max_tokens, () if plan.grammar else chat_format.stop)
        job = Job([tokens], params, sink=None, n=req.n or 1, cache_at=[boundaries], namespace=tenant,
                  grammar=plan.grammar)
        return await self.respond(request, req, job, _ChatFormat(chat_format, plan.effort, plan.tool_names))

    async def grammars(self, param: str):
        """The grammar compiler for this server's tokenizer (built once, ~0.4 s, off the event loop); a 400
        naming `param` when llguidance is not installed."""
        from aviary.generation import constraints

        if not constraints.available():
            raise ApiError(400, f"{param} needs constrained decoding, which this server cannot do: install "
                                "aviary[structured] (llguidance).", param=param, code="unsupported_parameter")
        if self._grammars is None:
            eos = SamplingParams().stop_token_ids[0]  # the end-of-text id the server's sequences stop at
            self._grammars = await asyncio.to_thread(constraints.Grammars, self.tokenizer, self.vocab_size, eos)
        return self._grammars

    # ---- running a job ------------------------------------------------------------------------

    async def respond(self, request: Request, req, job: Job, fmt: _TextFormat):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.sink = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"The server is busy ({e}); retry after {self.limits.retry_after_s} s.",
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.limits.retry_after_s)}) from None
        except ValueError as e:
            raise ApiError(400, str(e), param="n", code="invalid_value") from None
        except SchedulerClosed as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
        meta = {"id": f"{fmt.prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = self._stream(job, events, fmt, meta, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(request, job, events, fmt, meta)

    async def _stream(self, job: Job, events: asyncio.Queue, fmt: _TextFormat, meta: dict, include_usage: bool):
        try:
            for index in range(job.width):
                first = fmt.first_chunk(index)
                if first is not None:
                    yield _sse({**meta, "object": fmt.chunk_object, "choices": [first]})
            while True:
                event = await events.get()
                if isinstance(event, Piece):
                    delta = fmt.feed(event.index, event.text, event.finish_reason is not None)
                    if delta or event.finish_reason:
                        choice = fmt.chunk_choice(event.index, delta, event.finish_reason)
                        yield _sse({**meta, "object": fmt.chunk_object, "choices": [choice]})
                elif isinstance(event, Done):
                    if include_usage:
                        yield _sse({**meta, "object": fmt.chunk_object, "choices": [], "usage": _usage(event)})
                    break
                else:
                    yield _sse(error_body(event.message, "server_error"))
                    break
            yield "data: [DONE]\n\n"
        finally:  # finished, or the client went away (the task is cancelled): free its rows either way
            self.scheduler.cancel(job)

    async def _collect(self, request: Request, job: Job, events: asyncio.Queue, fmt: _TextFormat, meta: dict):
        async def watch_disconnect():  # the only reader of `receive` once the body is in (no stream is open)
            while (await request.receive())["type"] != "http.disconnect":
                pass
            events.put_nowait(None)

        watcher = asyncio.create_task(watch_disconnect())
        reasons = [None] * job.width
        try:
            while True:
                event = await events.get()
                if event is None:  # the client went away (closed, or timed out)
                    return PlainTextResponse("", status_code=499)  # nobody reads it
                if isinstance(event, Piece):
                    fmt.feed(event.index, event.text, event.finish_reason is not None)
                    reasons[event.index] = event.finish_reason or reasons[event.index]
                elif isinstance(event, Failed):
                    raise ApiError(500, event.message, type="server_error", code="generation_failed")
                else:
                    choices = [fmt.choice(i, r) for i, r in enumerate(reasons)]
                    return JSONResponse({**meta, "object": fmt.object, "choices": choices, "usage": _usage(event)})
        finally:
            watcher.cancel()
            self.scheduler.cancel(job)


class _TextFormat:
    """`/v1/completions` objects. `feed` takes each new piece of a choice's text and returns its delta (the
    fields of a streamed chunk that changed); `choice` is the whole choice, once every piece is in."""

    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self):
        self.texts: dict[int, str] = {}

    def feed(self, index: int, text: str, final: bool) -> dict:
        self.texts[index] = self.texts.get(index, "") + text
        return {"text": text} if text else {}

    def first_chunk(self, index: int) -> dict | None:
        return None

    def chunk_choice(self, index: int, delta: dict, finish_reason: str | None) -> dict:
        return {"index": index, "text": delta.get("text", ""), "logprobs": None, "finish_reason": finish_reason}

    def choice(self, index: int, finish_reason: str | None) -> dict:
        return {"index": index, "text": self.texts.get(index, ""), "logprobs": None, "finish_reason": finish_reason}


class _ChatFormat(_TextFormat):
    """`/v1/chat/completions` objects. Each choice's text goes through the chat format's `ReplySplitter`: the
    reasoning (formats with a think block) to `reasoning_content`, the answer to `content`, both without the
    whitespace around them (the reply's leading space after "Assistant:" is not part of it). With `tool_names`,
    the calls of those tools are parsed out of the answer into `tool_calls` (aviary/serve/tool_calls.py), and a
    choice that made calls finishes with "tool_calls"."""

    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, chat_format: ChatFormat, effort: str | None, tool_names: frozenset[str] = frozenset()):
        self.chat_format, self.effort, self.tool_names = chat_format, effort, tool_names
        self.reasons = chat_format.think is not None and effort != "none"  # reasoning_content in the reply
        self.splitters: dict = {}
        self.parts: dict[int, list[str]] = {}
        self.parsers: dict[int, ToolCallParser] = {}
        self.calls: dict[int, list[dict]] = {}

    def feed(self, index: int, text: str, final: bool) -> dict:
        if index not in self.splitters:
            self.splitters[index] = self.chat_format.splitter(self.effort)
            self.parts[index] = ["", ""]
        splitter, parts = self.splitters[index], self.parts[index]
        reasoning, content = splitter.feed(text)
        if final:
            more = splitter.finish()
            reasoning, content = reasoning + more[0], content + more[1]
        calls = []
        if self.tool_names:
            parser = self.parsers.setdefault(index, ToolCallParser(self.tool_names))
            content, calls = parser.feed(content)
            content += parser.finish() if final else ""
        parts[0] += reasoning
        parts[1] += content
        delta = {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}
        if calls:
            made = self.calls.setdefault(index, [])
            delta["tool_calls"] = [{"index": len(made) + k, **call} for k, call in enumerate(calls)]
            made += calls
        return delta

    def first_chunk(self, index: int) -> dict | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def chunk_choice(self, index: int, delta: dict, finish_reason: str | None) -> dict:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": self._reason(index, finish_reason)}

    def choice(self, index: int, finish_reason: str | None) -> dict:
        reasoning, content = self.parts.get(index, ("", ""))
        calls = self.calls.get(index)
        message = {"role": "assistant", "content": content or (None if calls else "")}
        if self.reasons:
            message["reasoning_content"] = reasoning or None
        if calls:
            message["tool_calls"] = calls
        return {"index": index, "message": message, "logprobs": None,
                "finish_reason": self._reason(index, finish_reason)}

    def _reason(self, index: int, finish_reason: str | None) -> str | None:
        return "tool_calls" if finish_reason == "stop" and self.calls.get(index) else finish_reason


def _validate(model, data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def _usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(scheduler: Scheduler, tokenizer, *, model_name: str, limits: Limits | None = None,
               api_key: str | Sequence[str] | None = None, chat_format: str | ChatFormat = "world",
               web_ui: bool = True) -> Starlette:
    """The ASGI app. It starts the scheduler's thread on startup and stops it on shutdown.

    `api_key`: one key or several (each its own prefix-cache tenant); None or () serves without a key.
    `chat_format`: how chat messages become a prompt (`aviary.chat_format.FORMATS`: world, g1, raven).
    `web_ui`: serve the web chat page at `/` (aviary/serve/webui.py); without it `/` is a 404.
    """
    keys = [api_key] if isinstance(api_key, str) else list(api_key or ())
    if not all(isinstance(key, str) and key.strip() == key and key for key in keys):
        raise ValueError("an API key is empty or has surrounding whitespace")
    api = _Api(scheduler, tokenizer, model_name, limits or Limits(), keys, chat_format)

    def endpoint(name: str, handler):
        async def call(request: Request):
            try:
                response = await handler(request)
            except ApiError as e:
                response = _error_response(e)
            except ClientDisconnect:  # gone while sending its request: nobody reads an answer, nothing failed
                response = PlainTextResponse("", status_code=499)
            except Exception:  # a bug: say so in OpenAI's format, keep serving
                log.exception("unhandled error in %s", name)
                response = _error_response(ApiError(500, "Internal server error.", type="server_error"))
            api.metrics.inc("http_responses_total", route=name, code=str(response.status_code))
            return response
        return call

    async def http_error(request: Request, exc: HTTPException):
        message = {404: f"Unknown route: {request.method} {request.url.path}",
                   405: f"Method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                         str(exc.detail))
        api.metrics.inc("http_responses_total", route="other", code=str(exc.status_code))
        return _error_response(ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404
                                        else None))

    routes = [
        Route("/health", endpoint("health", api.health), methods=["GET"]),
        Route("/metrics", endpoint("metrics", api.metrics_text), methods=["GET"]),
        Route("/v1/models", endpoint("models", api.models), methods=["GET"]),
        Route("/v1/models/{name:path}", endpoint("models", api.model), methods=["GET"]),
        Route("/v1/completions", endpoint("completions", api.completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint("chat", api.chat), methods=["POST"]),
        Route("/v1/embeddings", endpoint("embeddings", Embeddings(api)), methods=["POST"]),
    ]
    if web_ui:
        routes += webui.routes()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.close)

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
