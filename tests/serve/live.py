"""A live `aviary serve` for tests: an ASGI app on a free loopback port, in a thread, served by the same
uvicorn server (`aviary.serve.connections.make_server`) that the command runs."""

from __future__ import annotations

import socket
import threading
import time

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
