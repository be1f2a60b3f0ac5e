"""The HTTP connection guards that uvicorn's h11 protocol lacks, and the uvicorn server `aviary serve` runs.

h11 has no deadline for reading a request, so a client that sends half a request line and waits holds a socket
(a file descriptor) for as long as it likes, before any API key is checked (a "slowloris"). Here:

    request head   must be complete within `header_timeout_s` of the connection opening, or of the end of the
                   previous response on a kept-alive connection: else 408 and close (no answer if the client
                   has sent nothing at all)
    request body   the app answers 408 after `body_timeout_s` (app.py); a body the app never reads (a GET with
                   a body, a request answered early) is cut off `BODY_GRACE_S` later, here
    connections    at most `max_connections` open. At the cap a new connection replaces the one that has waited
                   longest for a request head (stalled or idle), so stalled sockets cannot lock clients out;
                   when every connection has a request in progress the new one gets 503 and is closed
    accept errors  out of file descriptors (EMFILE), asyncio logs every failed accept() with a traceback,
                   thousands a second: here one line a minute, with a count
    open files     `fit_open_file_limit` raises the soft RLIMIT_NOFILE to the hard one and fits the cap under it

Connections closed by these guards are counted in `aviary_connections_closed_total{reason}`. None of this
limits one client against another (per-address limits, TLS): that is the reverse proxy's job (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import time
from collections import OrderedDict

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from aviary.serve.app import Limits
from aviary.serve.metrics import Metrics
from aviary.serve.protocol import error_body

__all__ = ["OTHER_FILES", "fit_open_file_limit", "make_server"]

log = logging.getLogger("aviary.serve")

BODY_GRACE_S = 5.0  # after body_timeout_s: the app's own 408 goes out first
LISTEN_BACKLOG = 64  # also the most connections asyncio accepts in one go, before any of them can be refused
# descriptors that are not counted connections: sockets accepted and not yet refused, or closing (they take a
# few turns of the event loop: two accept batches), and the process's own (the log, the event loop: about ten)
OTHER_FILES = 2 * LISTEN_BACKLOG + 32
REPORT_EVERY_S = 60.0  # repeated warnings (accept errors, connections refused) at most this often


class _Throttle:
    """Lets the first event be reported, then at most one per `interval_s`; counts the ones held back."""

    def __init__(self, interval_s: float = REPORT_EVERY_S):
        self.interval_s, self.next_at, self.held = interval_s, 0.0, 0

    def __call__(self) -> int | None:
        """None: do not report this one. Else report it, with this many held back since the last report."""
        now = time.monotonic()
        if now < self.next_at:
            self.held += 1
            return None
        held, self.held, self.next_at = self.held, 0, now + self.interval_s
        return held


def _since(held: int) -> str:
    return f" ({held} more since the last report)" if held else ""


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with read deadlines and a connection cap. `_protocol_class` makes one per server."""

    limits: Limits
    metrics: Metrics | None
    waiting: OrderedDict  # this server's connections that wait for a request head, longest-waiting first
    over_limit: _Throttle

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._phase: str | None = None  # what the client owes: "head", "body", or nothing
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False
        if len(self.connections) >= self.limits.max_connections and not self._replace_a_waiting_connection():
            self._refused = True
            self.transport = transport
            self._close("refused", _FULL)
            return
        super().connection_made(transport)
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:  # never became a connection of the server's
            return
        self._set_phase(None)
        super().connection_lost(exc)

    def handle_events(self) -> None:  # after new data, and after each response: the client's state may change
        super().handle_events()
        self._watch()

    def _watch(self) -> None:
        state = self.conn.their_state
        phase = None if self.transport.is_closing() else \
            "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if phase != self._phase:
            self._set_phase(phase)

    def _set_phase(self, phase: str | None) -> None:
        """Start the deadline for what the client now owes (or stop the clock)."""
        self._phase = phase
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.waiting.pop(self, None)
        if phase == "head":
            self.waiting[self] = None
            self._deadline = self.loop.call_later(self.limits.header_timeout_s, self._expire)
        elif phase == "body":
            self._deadline = self.loop.call_later(self.limits.body_timeout_s + BODY_GRACE_S, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        if self._phase == "body":  # a body the app did not read (when it reads one, it answers 408 itself)
            self._close("body_timeout")
        elif self.conn.trailing_data[0]:  # half a request head
            self._close("header_timeout", _answer(408, "The request head did not arrive within "
                                                       f"{self.limits.header_timeout_s:g} s.", "request_timeout"))
        else:  # not a byte of a request (a new or kept-alive connection): close without a word
            self._close("idle")

    def _replace_a_waiting_connection(self) -> bool:
        oldest = next(iter(self.waiting), None)
        if oldest is not None:
            oldest._close("replaced", _REPLACED)
        return oldest is not None

    def _close(self, reason: str, answer: bytes = b"") -> None:
        """Close the connection, after writing `answer` straight to the socket (no request is being answered)."""
        self._set_phase(None)
        # no longer one of the connections the cap counts (its socket closes at the loop's next turn; the
        # open-file budget, OTHER_FILES, covers sockets accepted or closing in between)
        self.connections.discard(self)
        self._count(reason)
        if reason in ("refused", "replaced"):
            held = self.over_limit()
            if held is not None:
                log.warning("at the connection limit (%d): connections refused or replaced%s",
                            self.limits.max_connections, _since(held))
        transport = self.transport
        if answer:
            transport.write(answer)
        transport.close()
        # close() waits for the answer to be sent: a client that reads nothing must not hold the socket
        self.loop.call_later(2.0, transport.abort)

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("connections_closed_total", reason=reason)


def _answer(status: int, message: str, code: str) -> bytes:
    """A whole HTTP response with OpenAI error JSON, that closes the connection."""
    body = json.dumps(error_body(message, "invalid_request_error" if status < 500 else "server_error",
                                 code=code)).encode()
    return (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


_FULL = _answer(503, "The server has too many open connections; retry later.", "too_many_connections")
_REPLACED = _answer(503, "The server is at its connection limit, and this connection waited longest for a request.",
                    "too_many_connections")


def _protocol_class(limits: Limits, metrics: Metrics | None) -> type[H11Protocol]:
    if metrics is not None:
        metrics.counter("connections_closed_total", "Connections the server closed: idle or header_timeout (no "
                                                    "request, or half of one, within --header-timeout), "
                                                    "body_timeout, refused or replaced (at --max-connections).")
    attributes = dict(limits=limits, metrics=metrics, waiting=OrderedDict(), over_limit=_Throttle())
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), attributes)


class _Server(uvicorn.Server):
    """uvicorn's server, with asyncio's reports of failed accept() calls throttled on its event loop."""

    async def startup(self, sockets=None) -> None:
        _throttle_accept_errors(asyncio.get_running_loop())
        await super().startup(sockets=sockets)


def _throttle_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    # CPython's accept loop retries up to `backlog` times per wake-up and reports each EMFILE with a traceback
    # (a flood of log: docs/benchmarks.md, Design measurements item 11): report the first, then one line a
    # minute with a count.
    previous = loop.get_exception_handler()
    throttle = _Throttle()

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if context.get("message") != "socket.accept() out of system resource":
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        held = throttle()
        if held is not None:
            log.error("cannot accept connections: %s%s; raise the open-file limit (ulimit -n) or lower "
                      "--max-connections", context.get("exception"), _since(held))

    loop.set_exception_handler(handler)


def make_server(app, limits: Limits, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                metrics: Metrics | None = None) -> uvicorn.Server:
    """The uvicorn server for `app`, guarded as above: `.run()` serves until Ctrl-C (or `.should_exit`)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=_protocol_class(limits, metrics),
                            ws="none", backlog=LISTEN_BACKLOG, timeout_graceful_shutdown=5)
    return _Server(config)


def fit_open_file_limit(max_connections: int) -> tuple[int, int | None]:
    """Raise the soft open-file limit (RLIMIT_NOFILE) to the hard limit, and fit `max_connections` under it.

    Descriptors are cheap, and headroom absorbs a burst of sockets being accepted or closed (Go programs raise
    the limit the same way at startup). Returns (the connections that fit, at most `max_connections`; the
    limit, None if there is none).
    """
    try:
        import resource
    except ImportError:  # not a Unix
        return max_connections, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux refuses more than nr_open (2^20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return max_connections, None
    return min(max_connections, soft - OTHER_FILES), soft
