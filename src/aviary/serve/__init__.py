"""Serving: an OpenAI-compatible HTTP server (`aviary serve`) over a continuous-batching scheduler.

    scheduler.py    the thread that owns the Engine: bounded queue, admission, batched steps, cancellation
    chat_format.py  re-exports aviary.chat_format: chat messages -> a prompt (world, g1, raven), in segments
    protocol.py     the OpenAI request bodies (strict) and error JSON
    app.py          the Starlette app: routes, auth, limits, server-sent events
    connections.py  the uvicorn server it runs on: read deadlines, a connection cap, the open-file limit
    metrics.py      Prometheus text counters and histograms
    ray_app.py      `aviary serve --ray`: N copies of the app on Ray Serve behind a session router (aviary[ray])

The web stack (starlette, uvicorn) is imported only by `app.py`, `connections.py`, `ray_app.py` and the `serve`
command.
"""

from aviary.serve.scheduler import Done, Failed, Job, Piece, QueueFull, Scheduler

__all__ = ["Done", "Failed", "Job", "Piece", "QueueFull", "Scheduler"]
