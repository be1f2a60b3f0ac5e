"""Serve a model over HTTP with an OpenAI-compatible API (completions and chat, streaming or not).

Every decode step runs all active requests as one batch; new requests are prefilled together (one batch,
exact for each prompt) and join at the next step, finished ones leave. Prompts that start with a text the
server has seen (a system prompt, an earlier part of a conversation: the next turn of a chat starts from the
state after the previous one) start from the cached recurrent state instead of recomputing it. --state FILE
is where every conversation starts (a state-tuned or prompt state), --adapter FILE is merged at load.
Chat messages are formatted in the model's chat format (--chat-format: world "User: ...\\n\\nAssistant:", g1
with its reasoning returned in reasoning_content, raven "Bob: ...\\n\\nAlice:"; docs/serving.md, "Chat formats").

The server listens on 127.0.0.1 only, unless --host says otherwise; set AVIARY_API_KEY (or give
--api-key-file) before exposing it, and put a reverse proxy in front (docs/serving.md, "Running it on a
network"). Point any OpenAI client at http://HOST:PORT/v1, or a browser at http://HOST:PORT/ for a chat page
(--no-ui turns it off).

examples:
  aviary serve
  aviary serve RWKV-x070-World-1.5B.pth --port 8000 --max-batch 64
  aviary serve model.pth --state persona.state --adapter lora.pth --adapter-alpha 32
  AVIARY_API_KEY="$(cat key.txt)" aviary serve model.pth --host 0.0.0.0
  aviary serve model.pth --ray --replicas 4 --threads 2     # pip install 'aviary[ray]'; docs/serving.md
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "MODEL-NAME", "messages": [{"role": "user", "content": "Hi!"}], "stream": true}'
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import sys

from aviary.commands._common import add_chat_format_argument, add_model_arguments, load_model, resolve_model_path

HELP = "an OpenAI-compatible HTTP server with continuous batching and prefix-state caching"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="checkpoint (default: the bundled model)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    server.add_argument("--port", type=int, default=8000, help="(default 8000; 0: any free port)")
    server.add_argument("--api-key", action="append", metavar="KEY",
                        help="require 'Authorization: Bearer KEY'; repeat for several clients, each with its own "
                             "prefix cache (default: $AVIARY_API_KEY, else no key). Prefer the environment "
                             "variable or --api-key-file: a key on the command line shows in `ps`")
    server.add_argument("--api-key-file", metavar="FILE",
                        help="API keys, one a line (blank lines and lines starting with # are skipped)")
    server.add_argument("--model-name", default=None,
                        help="the model id clients send and /v1/models lists (default: the file name)")
    server.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_chat_format_argument(server)
    server.add_argument("--no-ui", action="store_true",
                        help="do not serve the web chat page at / (the API is unchanged)")
    limits = parser.add_argument_group("batching and limits")
    limits.add_argument("--max-batch", type=int, default=32, metavar="N",
                        help="sequences decoded together at most (default 32)")
    limits.add_argument("--max-queue", type=int, default=128, metavar="N",
                        help="requests waiting for a slot at most; beyond it clients get 429 (default 128)")
    limits.add_argument("--max-prompt-tokens", type=int, default=8192, metavar="N", help="(default 8192)")
    limits.add_argument("--max-prefill-tokens", type=int, default=1024, metavar="N",
                        help="prompt tokens prefilled (together, as one batch) between two decode steps at most: a "
                             "longer prompt, or a burst of prompts, is prefilled over several steps while the "
                             "running streams go on. Lower: the first requests of a burst start sooner and streams "
                             "pause less; higher: fewer, larger passes (default 1024)")
    limits.add_argument("--max-tokens", type=int, default=2048, metavar="N",
                        help="the largest max_tokens a request may ask for, and chat's default (default 2048)")
    limits.add_argument("--max-request-bytes", type=int, default=1 << 20, metavar="N",
                        help="request body size limit (default 1 MiB)")
    limits.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's choice; 1-2 is often faster on a busy machine)")
    limits.add_argument("--cache-mb", type=float, default=256, metavar="MB",
                        help="memory for cached prefix states (default 256; 0 turns the cache off). Each API key "
                             "has its own entries; clients that share a key share them")
    conns = parser.add_argument_group("connections")
    conns.add_argument("--max-connections", type=int, default=None, metavar="N",
                       help=f"open connections at most; at the cap a new one replaces the one waiting longest for "
                            f"a request, else gets 503 (default {DEFAULT_MAX_CONNECTIONS}, fewer if the open-file "
                            "limit is lower)")
    conns.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                       help="a request's line and headers must arrive within S seconds, else 408 (default 10)")
    conns.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                       help="a request's body must arrive within S seconds, else 408 (default 30)")
    scale = parser.add_argument_group("scale-out on Ray Serve (pip install 'aviary[ray]'; docs/serving.md)")
    scale.add_argument("--ray", action="store_true",
                       help="serve N copies of the app on Ray Serve, each with its own engine and prefix cache, "
                            "behind a router that keeps each session on one copy (the X-Aviary-Replica header)")
    scale.add_argument("--replicas", type=int, default=None, metavar="N", help="copies of the app (default 2)")
    scale.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="join this Ray cluster ('auto' on one of its nodes, or HOST:6379); default: start a "
                            "local one, without the dashboard")
    add_model_arguments(parser)


DEFAULT_MAX_CONNECTIONS = 512
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def api_keys(args: argparse.Namespace) -> list[str]:
    """The keys from --api-key and --api-key-file, else $AVIARY_API_KEY; [] for none. An empty key is an error:
    `--api-key "$(cat key.txt)"` with key.txt missing must not serve without a key."""
    keys = [_checked_key(key, "--api-key") for key in args.api_key or ()]
    if args.api_key_file is not None:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--api-key-file {args.api_key_file}: {getattr(e, 'strerror', None) or e}") from None
        found = [_checked_key(line, f"--api-key-file {args.api_key_file} line {i}")
                 for i, line in enumerate(lines, 1) if line and not line.startswith("#")]
        if not found:
            raise ValueError(f"--api-key-file {args.api_key_file} has no keys")
        keys += found
    if not keys and "AVIARY_API_KEY" in os.environ:
        keys = [_checked_key(os.environ["AVIARY_API_KEY"], "AVIARY_API_KEY")]
    return list(dict.fromkeys(keys))


def _checked_key(key: str, source: str) -> str:
    key = key.strip()
    if not key:
        raise ValueError(f"{source} is empty: give a key, or leave it out to serve without one")
    if not (key.isascii() and key.isprintable()):
        raise ValueError(f"{source}: an API key must be printable ASCII (it travels in an HTTP header)")
    return key


def check_address(host: str, port: int) -> None:
    """Refuse a host or port the server could not listen on, before the model loads (minutes, for a big one)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is not a TCP port (0-65535)")
    if not host.strip():
        raise ValueError("--host is empty (0.0.0.0 listens on every IPv4 address)")
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:
        raise ValueError(f"--host {host}: not an address of this machine ({getattr(e, 'strerror', None) or e})") \
            from None
    for family, kind, proto, _, address in addresses:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:  # a family this machine lacks (IPv6): the server skips it as well
            continue
        with sock:  # a trial bind: the address must be local and the port free
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as e:
                raise ValueError(f"cannot listen on {host} port {port}: {e.strerror or e}") from None


def server_limits(args: argparse.Namespace):
    """The Limits the options ask for, every number checked."""
    from aviary.serve.app import Limits

    for name in ("max_batch", "max_prompt_tokens", "max_request_bytes", "max_prefill_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_queue < 0 or args.max_tokens < 0 or args.cache_mb < 0:
        raise ValueError("--max-queue, --max-tokens and --cache-mb must be >= 0")
    for name in ("header_timeout", "body_timeout"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a number of seconds > 0, got {value}")
    if args.max_connections is not None and args.max_connections < 1:
        raise ValueError("--max-connections must be >= 1")
    return Limits(max_request_bytes=args.max_request_bytes, max_prompt_tokens=args.max_prompt_tokens,
                  max_tokens=args.max_tokens, header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                  max_connections=args.max_connections or DEFAULT_MAX_CONNECTIONS)


def build(args: argparse.Namespace, limits=None):
    """(Starlette app, scheduler) from the parsed options; the app starts the scheduler when it starts.
    The options it uses are checked before the model loads (`run` checks the address first)."""
    from aviary.chat_format import format_for
    from aviary.generation import Engine, StateCache
    from aviary.serve.app import create_app
    from aviary.serve.scheduler import Scheduler

    limits = limits or server_limits(args)
    keys = api_keys(args)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    chat_format = format_for(args.chat_format, path)  # a bad sidecar file fails before the model loads
    # --state: every conversation starts from it (a file that does not fit the model is a StateError here)
    model, tokenizer, state = load_model(args, path)
    cache = StateCache(int(args.cache_mb * 2**20)) if args.cache_mb > 0 else None
    scheduler = Scheduler(Engine(model, tokenizer, cache=cache, start_state=state), max_batch=args.max_batch,
                          max_queue=args.max_queue, max_prefill_tokens=args.max_prefill_tokens)
    name = args.model_name or os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    return create_app(scheduler, tokenizer, model_name=name, limits=limits, api_key=keys,
                      chat_format=chat_format, web_ui=not args.no_ui), scheduler


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    if args.ray or args.replicas is not None or args.ray_address is not None:
        return run_on_ray(args)
    check_address(args.host, args.port)  # this and every other option: before the model loads
    from aviary.serve.connections import fit_open_file_limit, make_server  # (imports torch: seconds)

    limits = server_limits(args)
    fitting, files = fit_open_file_limit(limits.max_connections)
    if fitting < limits.max_connections:
        if args.max_connections is not None or fitting < 1:
            raise ValueError(f"--max-connections {limits.max_connections} does not fit the open-file limit "
                             f"(ulimit -n) of {files}; lower --max-connections or raise the limit")
        print(f"aviary serve: warning: the open-file limit (ulimit -n) is {files}: serving at most {fitting} "
              "connections (--max-connections)", file=sys.stderr)
        limits = replace(limits, max_connections=fitting)
    app, scheduler = build(args, limits)
    settle_for_serving()
    _warn_if_open(args)
    server = make_server(app, limits, host=args.host, port=args.port, log_level=args.log_level,
                         metrics=scheduler.metrics)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: uvicorn shuts down gracefully, then re-raises it
        server.run()
    return 0


def settle_for_serving() -> None:
    """Process settings for a long-running server, once everything is loaded.

    What is loaded now (the model, the tokenizer's vocabulary, torch's and the web stack's modules: about 300,000
    objects) lives as long as the server: `gc.freeze()` moves it out of the garbage collector's view. A full
    collection walked all of it, about 130 ms on a 2-core EPYC, and stalled the scheduler's thread wherever it
    struck: a prefill pass of 36 prompts took 274 ms instead of ~100, and the time to first token of a whole
    burst moved with it (docs/benchmarks.md, Serving).

    Freed memory is left to the C library: keeping it (`aviary.cpu.malloc.keep_freed_memory`, as training does)
    cut the page faults of prefill passes, the median time to first token at 64 streams by 7-15 % and raised
    throughput ~10 %, but the server's resident memory then grew in 16-32 MB steps over a 4-minute soak
    (447 -> 614 MB) where without it it stays within 456-560 MB (docs/benchmarks.md, Serving).
    """
    import atexit
    import gc

    gc.collect()
    gc.freeze()
    # back in view at exit, so the interpreter's last collections free them (frozen, triton's nanobind bindings
    # reported "leaked instances" on the way out)
    atexit.register(gc.unfreeze)


def run_on_ray(args: argparse.Namespace) -> int:
    """--ray: the app as --replicas copies on Ray Serve (aviary/serve/ray_app.py), on a local Ray or the cluster
    at --ray-address."""
    keys = ray_options(args)
    if args.port == 0:
        raise ValueError("--port 0 does not work with --ray: Ray Serve's proxy needs a fixed port")
    check_address(args.host, args.port)
    try:
        from aviary.serve import ray_app
    except ImportError as e:
        raise ValueError(str(e)) from None
    _warn_if_open(args)
    return ray_app.serve_on_ray(args, keys)


def ray_options(args: argparse.Namespace) -> list[str]:
    """Checks the options of `aviary serve --ray` and returns its API keys. Everything is checked here, before
    Ray starts: a replica that fails to build is retried by Ray Serve, not reported."""
    if not args.ray:
        raise ValueError("--replicas and --ray-address need --ray")
    args.replicas = 2 if args.replicas is None else args.replicas
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if args.max_connections is not None:
        raise ValueError("--max-connections does not apply with --ray: Ray Serve's own HTTP proxy takes the "
                         "connections")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    server_limits(args)
    keys = api_keys(args)
    from aviary.chat_format import format_for

    args.model = os.path.abspath(resolve_model_path(args.model))  # the replicas' working folder is not ours
    format_for(args.chat_format, args.model)
    return keys


def _warn_if_open(args: argparse.Namespace) -> None:
    if args.host not in LOOPBACK and not (args.api_key or args.api_key_file or "AVIARY_API_KEY" in os.environ):
        print(f"aviary serve: warning: listening on {args.host} without an API key: anyone who can reach this "
              "port can use the model", file=sys.stderr)
