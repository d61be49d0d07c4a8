"""Running the application with uvicorn: in the foreground (``streampress serve``, clean exit
on SIGTERM / SIGINT) or on a background thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time

__all__ = ["run", "BackgroundServer", "uvicorn_config"]

GRACEFUL_SECONDS = 5.0


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", ws_max_size=None):
    import uvicorn

    engine = getattr(app.state, "engine", None)
    if ws_max_size is None and engine is not None:
        # twice a frame as a base64 data URL and 1 MiB: a frame over the limit gets an error
        # event (the session goes on); a message past this closes the socket (1009)
        ws_max_size = 2 * (engine.limits.max_frame_bytes * 4 // 3) + 1024 * 1024
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, ws="websockets-sansio",
                          ws_max_size=ws_max_size or 16 * 1024 * 1024, timeout_graceful_shutdown=GRACEFUL_SECONDS,
                          lifespan="on")


def run(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until SIGTERM or SIGINT; then stop taking connections, close open ones (after at
    most :data:`GRACEFUL_SECONDS`), stop the engine and return."""
    import signal

    import uvicorn

    server = uvicorn.Server(uvicorn_config(app, host, port, log_level))
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again so that the
    # process dies of it; the graceful shutdown is the whole point: exit with status 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


class BackgroundServer:
    """The application on a free loopback port, served from a daemon thread.

    ``with BackgroundServer(app) as server: server.url, server.ws_url``.
    """

    def __init__(self, app, host: str = "127.0.0.1", log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn_config(app, host, self.port, log_level)
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="streampress-serve")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
