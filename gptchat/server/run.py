"""Running the app under uvicorn with a clean SIGTERM (or Ctrl-C).

On the signal the server stops accepting connections and new requests get 503; requests already
running may finish for `grace` seconds, after which each is ended with an error (a streamed reply gets
a final SSE error chunk, then `data: [DONE]`). Then the process exits with status 0: being asked to
stop is not a failure (uvicorn would re-raise the signal and die by it).
"""

from __future__ import annotations

import contextlib

import uvicorn
from fastapi import FastAPI


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, grace: float):
        super().__init__(config)
        self.fastapi_app, self.grace = app, grace

    def handle_exit(self, sig, frame) -> None:
        self.fastapi_app.state.generator.begin_shutdown(self.grace)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals.clear()  # stopped on request: exit normally instead of re-raising


def serve(app: FastAPI, *, host: str, port: int, log_level: str = "info", grace: float = 30.0) -> None:
    # the access log shows method, path and status only: never a prompt or a reply
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=grace + 10)
    GracefulServer(config, app, grace).run()
