"""Running the app with uvicorn: in the foreground (`chatrl serve`) or on a background thread (tests, benches)."""

from __future__ import annotations

import threading
import time

from fastapi import FastAPI


def start_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0):
    """Run `app` with uvicorn on a background thread; returns (server, thread, base_url) once it listens.

    Port 0 picks a free port. Stop with `server.should_exit = True; thread.join()`.
    """
    import uvicorn  # lazy: only `chatrl serve` needs the server

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3,
                            lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="chatrl-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    return server, thread, _bound_url(server, host)


def _bound_url(server, host: str) -> str:
    sock = server.servers[0].sockets[0]
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve in the foreground (Ctrl-C stops); prints the page and API URLs once listening."""
    import uvicorn  # lazy: only `chatrl serve` needs the server

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=3))

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            url = _bound_url(server, host)
            print(f"chatrl serve: chat page at {url}/  |  OpenAI API at {url}/v1  (Ctrl-C to stop)", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    server.run()
