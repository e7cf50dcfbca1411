"""`tops-serve`: an OpenAI-compatible HTTP server over one Pipeline (docs/serve.md).

    from tops_edge.runtime import Pipeline
    from tops_edge.serve import ServerConfig, create_app
    app = create_app(Pipeline.load("out/shapes"), ServerConfig(api_key="secret"))  # any ASGI server runs it

Needs the `serve` extra (starlette, uvicorn): pip install -e ".[serve]".
"""

from __future__ import annotations

import socket
import sys

from ..errors import BackendUnavailableError, InputError
from .media import MediaPolicy

__all__ = ["MediaPolicy", "ServerConfig", "create_app", "serve"]


def _require_extra() -> None:
    missing = []
    for name in ("starlette", "uvicorn", "pydantic"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise BackendUnavailableError(f"tops-serve needs {', '.join(missing)}: pip install 'tops-edge[serve]'")


def __getattr__(name):  # create_app and ServerConfig import starlette: only when asked for
    if name in ("create_app", "ServerConfig"):
        _require_extra()
        from . import app

        return getattr(app, name)
    raise AttributeError(name)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or a one-line InputError."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InputError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(directory, host: str = "127.0.0.1", port: int = 8000, backend: str = "ort", quiet: bool = False,
          **config) -> None:
    """Load the export, listen on host:port and serve until interrupted (SIGINT / SIGTERM)."""
    _require_extra()
    import uvicorn

    from ..runtime import Pipeline
    from .app import ServerConfig, create_app

    pipe = Pipeline.load(directory, backend=backend)
    settings = ServerConfig(**config)
    sock = listen(host, port)
    app = create_app(pipe, settings)
    if not quiet:
        key = "an API key" if settings.api_key else "no API key"
        print(f"tops-serve: {app.state.model_id} from {directory} on http://{host}:{sock.getsockname()[1]}/v1 "
              f"({key}, queue {settings.max_queue})", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=not quiet,
                                           timeout_graceful_shutdown=10))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the SIGINT it caught
        pass
