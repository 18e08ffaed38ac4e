"""The front on uvicorn, in a thread beside whatever else the process runs (`fluxexport serve`, the tests)."""

from __future__ import annotations

import threading
import time
from typing import Any

from fluxexport.errors import FluxExportError
from fluxexport.openai_api.app import FrontSettings, create_app


class FrontServer:
    """uvicorn serving `create_app(settings)` on `host:port`; a context manager that returns once it listens."""

    def __init__(self, settings: FrontSettings, host: str = "127.0.0.1", port: int = 8080):
        self.settings, self.host, self.port = settings, host, port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The OpenAI base URL (what `openai.OpenAI(base_url=…)` takes)."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> FrontServer:
        import uvicorn

        config = uvicorn.Config(create_app(self.settings), host=self.host, port=self.port, log_level="warning",
                                access_log=False, lifespan="on", timeout_graceful_shutdown=10)  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="openai-front", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise FluxExportError(
                    f"the OpenAI front could not listen on {self.host}:{self.port} (in use?): pick another "
                    "--openai-port"
                )
            time.sleep(0.05)
        return self

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> FrontServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
