"""Errors in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``): :class:`HTTPError`, the status and
fields of each phitune error, and the app's exception handlers. No answer carries a path of the server's file
system."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    ConflictError,
    DatasetError,
    MissingDependencyError,
    NotFoundError,
    PhituneError,
    SpecError,
    UnsupportedOptionError,
    WontFitError,
    scrub_paths,
)
from ._upload import MalformedUpload, UploadTooLarge

logger = logging.getLogger("phitune.server")
_UNION_TAGS = frozenset({"int", "float", "str", "bool", "dict", "list", "none"})


class HTTPError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = dict(self.headers or {})
        if self.status in (400, 404, 409, 413):
            headers["x-should-retry"] = "false"  # openai-python retries 409 otherwise
        return JSONResponse(body, status_code=self.status, headers=headers)


def from_phitune(exc: PhituneError) -> HTTPError:
    """The HTTP status and OpenAI error fields of a phitune error, its message without the server's paths."""
    message = scrub_paths(exc.message)
    if isinstance(exc, UnsupportedOptionError):
        return HTTPError(400, message, param=exc.field, code="unsupported_option")
    if isinstance(exc, SpecError):
        return HTTPError(400, message, param=exc.field, code="invalid_value")
    if isinstance(exc, DatasetError):
        return HTTPError(400, message, param="file", code="invalid_file")
    if isinstance(exc, WontFitError):
        return HTTPError(400, message, code="wont_fit")
    if isinstance(exc, NotFoundError):
        return HTTPError(404, message, code="not_found")
    if isinstance(exc, ConflictError):
        return HTTPError(409, message, code="conflict")
    if isinstance(exc, MissingDependencyError):
        return HTTPError(501, message, type="server_error", code="missing_dependency")
    return internal_error()


def internal_error() -> HTTPError:
    return HTTPError(500, "The server had an error while processing your request.", type="server_error")


def validation_error(exc: RequestValidationError) -> HTTPError:
    first = exc.errors()[0]
    parts = [str(p) for p in first["loc"][1:]]  # after "body" / "query" / ...
    param = ".".join(p for p in parts if "[" not in p and p not in _UNION_TAGS) or None
    problem = "unknown parameter" if first["type"] == "extra_forbidden" else first["msg"]
    return HTTPError(400, f"{param or 'request'}: {problem}", param=param, code="invalid_value")


def add_error_handlers(app: FastAPI, *, max_upload_bytes: int) -> None:
    """Answer every error in OpenAI's shape; log what is the server's fault."""

    @app.exception_handler(HTTPError)
    async def _http_error(_: Request, exc: HTTPError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(PhituneError)
    async def _phitune_error(request: Request, exc: PhituneError) -> JSONResponse:
        error = from_phitune(exc)
        if error.status >= 500:
            logger.error("%s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc.message)
        return error.response()

    @app.exception_handler(UploadTooLarge)
    async def _upload_too_large(_: Request, exc: UploadTooLarge) -> JSONResponse:
        message = f"The upload is larger than this server's limit of {max_upload_bytes} bytes."
        return HTTPError(413, message, param="file", code="file_too_large").response()

    @app.exception_handler(MalformedUpload)
    async def _malformed_upload(_: Request, exc: MalformedUpload) -> JSONResponse:
        return HTTPError(400, str(exc), param="file", code="invalid_file").response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code in (404, 405):
            message = f"Unknown request URL: {request.method} {request.url.path}"
            return HTTPError(exc.status_code, message, code="unknown_url").response()
        return HTTPError(exc.status_code, str(exc.detail), code="invalid_request").response()  # e.g. a body not JSON

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return internal_error().response()  # Starlette re-raises exc after this, and the server logs it
