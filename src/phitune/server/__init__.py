"""``phitune serve``: a self-hosted, OpenAI-compatible fine-tuning and inference service over the local backend.

The official ``openai`` client works against it unchanged (``openai.OpenAI(base_url="http://127.0.0.1:8000/v1")``);
so does ``phitune.Client.openai(base_url=...)``. Routes, options and limits: docs/server.md. This module stays light:
FastAPI and uvicorn load only when a server starts (:mod:`phitune.server.app` wires the application from one router
per resource: :mod:`.files`, :mod:`.jobs`, :mod:`.models`, :mod:`.chat`, :mod:`.dashboard`).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from .._third_party import quiet_libraries
from ..errors import SpecError
from .hosts import is_loopback

__all__ = ["API_KEY_ENV", "StripQueryStrings", "check_bind", "cli", "is_loopback", "serve"]

API_KEY_ENV = "PHITUNE_API_KEY"
"""The environment variable ``cli`` reads the API key from when ``--api-key`` is not given."""


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if not api_key and not is_loopback(host):
        raise SpecError(
            "host",
            f"{host!r} is not a loopback address: serving beyond this machine needs an API key "
            f"(set ${API_KEY_ENV}, or pass --api-key)",
        )


class StripQueryStrings(logging.Filter):
    """Cut query strings from uvicorn's access log lines: a client may put a credential in one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, version, status = record.args
            record.args = (client, method, str(path).split("?", 1)[0], version, status)
        return True


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    home: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    max_upload_bytes: int | None = None,
    generation_seconds: float | None = None,
    log_level: str = "info",
) -> int:
    """Run the server in the foreground until interrupted; returns the exit status.

    Binds to loopback by default; any other address needs ``api_key``. ``home`` defaults to ``$PHITUNE_HOME`` or
    ``~/.phitune``. ``max_upload_bytes`` caps a dataset upload (default 1 GiB), ``generation_seconds`` one chat
    request's generation (default 120 s).
    """
    check_bind(host, api_key)
    import uvicorn

    from .._client import default_home
    from .app import DEFAULT_GENERATION_SECONDS, DEFAULT_MAX_UPLOAD_BYTES, create_app

    app = create_app(
        Path(home) if home is not None else default_home(),
        api_key=api_key or None,
        max_upload_bytes=max_upload_bytes or DEFAULT_MAX_UPLOAD_BYTES,
        generation_seconds=generation_seconds or DEFAULT_GENERATION_SECONDS,
    )
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    logging.getLogger("uvicorn.access").addFilter(StripQueryStrings())
    server.run()
    return 0


def cli(argv: Sequence[str] | None = None, *, home: str | None = None) -> int:
    """``phitune serve [--host H] [--port P] [--api-key KEY] [--max-upload-mb N] [--generation-timeout S]
    [--log-level L]``."""
    parser = argparse.ArgumentParser(
        prog="phitune serve", description="OpenAI-compatible fine-tuning and inference over the local backend."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--home", default=home, help="local state folder (default $PHITUNE_HOME or ~/.phitune)")
    parser.add_argument("--api-key", default=None, help=f"require this key (default ${API_KEY_ENV}, if set)")
    parser.add_argument("--max-upload-mb", type=int, default=None, help="largest dataset upload (default 1024)")
    parser.add_argument(
        "--generation-timeout",
        type=float,
        default=None,
        help="seconds one chat request may generate before it ends with finish_reason length (default 120)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="the server's log (default info); debug also shows what the libraries underneath print",
    )
    args = parser.parse_args(argv)
    quiet_libraries(verbose=args.log_level == "debug")
    try:
        return serve(
            host=args.host,
            port=args.port,
            home=args.home,
            api_key=args.api_key or os.environ.get(API_KEY_ENV),
            max_upload_bytes=args.max_upload_mb * (1 << 20) if args.max_upload_mb else None,
            generation_seconds=args.generation_timeout,
            log_level=args.log_level,
        )
    except SpecError as exc:
        parser.error(exc.message)
