"""Serve a model over HTTP with an OpenAI-compatible API (completions and chat, streaming or not).

Every decode step runs all active requests as one batch; new requests are prefilled and join at the
next step, finished ones leave. Prompts that start with a text the server has seen (a system prompt, an
earlier part of a conversation) start from the cached recurrent state instead of recomputing it.
Chat messages are formatted as the RWKV World chat prompt ("User: ...\\n\\nAssistant:").

The server listens on 127.0.0.1 only, unless --host says otherwise; give --api-key (or set
AVIARY_API_KEY) before exposing it. Point any OpenAI client at http://HOST:PORT/v1 (see docs/serving.md).

examples:
  aviary serve
  aviary serve RWKV-x070-World-1.5B.pth --port 8000 --max-batch 64
  aviary serve model.pth --host 0.0.0.0 --api-key "$(cat key.txt)"
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "MODEL-NAME", "messages": [{"role": "user", "content": "Hi!"}], "stream": true}'
"""

from __future__ import annotations

import argparse
import os
import sys

from aviary.commands._common import add_model_arguments, load_model, resolve_model_path

HELP = "an OpenAI-compatible HTTP server with continuous batching and prefix-state caching"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="checkpoint (default: the bundled model)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    server.add_argument("--port", type=int, default=8000, help="(default 8000)")
    server.add_argument("--api-key", default=os.environ.get("AVIARY_API_KEY"), metavar="KEY",
                        help="require 'Authorization: Bearer KEY' (default: $AVIARY_API_KEY, else no key)")
    server.add_argument("--model-name", default=None,
                        help="the model id clients send and /v1/models lists (default: the file name)")
    server.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    limits = parser.add_argument_group("batching and limits")
    limits.add_argument("--max-batch", type=int, default=32, metavar="N",
                        help="sequences decoded together at most (default 32)")
    limits.add_argument("--max-queue", type=int, default=128, metavar="N",
                        help="requests waiting for a slot at most; beyond it clients get 429 (default 128)")
    limits.add_argument("--max-prompt-tokens", type=int, default=8192, metavar="N", help="(default 8192)")
    limits.add_argument("--max-tokens", type=int, default=2048, metavar="N",
                        help="the largest max_tokens a request may ask for, and chat's default (default 2048)")
    limits.add_argument("--max-request-bytes", type=int, default=1 << 20, metavar="N",
                        help="request body size limit (default 1 MiB)")
    limits.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's choice; 1-2 is often faster on a busy machine)")
    limits.add_argument("--cache-mb", type=float, default=256, metavar="MB",
                        help="memory for cached prefix states (default 256; 0 turns the cache off)")
    add_model_arguments(parser)


def build(args: argparse.Namespace):
    """(Starlette app, scheduler) from the parsed options; the app starts the scheduler when it starts."""
    from aviary.generation import Engine, StateCache
    from aviary.serve.app import Limits, create_app
    from aviary.serve.scheduler import Scheduler

    for name in ("max_batch", "max_prompt_tokens", "max_request_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_queue < 0 or args.max_tokens < 0 or args.cache_mb < 0:
        raise ValueError("--max-queue, --max-tokens and --cache-mb must be >= 0")
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    model, tokenizer, state = load_model(args, path)
    if state is not None:
        raise ValueError("aviary serve does not take --state yet: every request starts from the model's state")
    cache = StateCache(int(args.cache_mb * 2**20)) if args.cache_mb > 0 else None
    scheduler = Scheduler(Engine(model, tokenizer, cache=cache), max_batch=args.max_batch, max_queue=args.max_queue)
    limits = Limits(max_request_bytes=args.max_request_bytes, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens)
    name = args.model_name or os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    return create_app(scheduler, tokenizer, model_name=name, limits=limits, api_key=args.api_key or None), scheduler


def run(args: argparse.Namespace) -> int:
    import uvicorn

    app, _ = build(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"aviary serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "port can use the model", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
