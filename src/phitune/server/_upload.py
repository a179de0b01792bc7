"""Receive a ``multipart/form-data`` upload straight to disk, enforcing a size limit while the body streams in."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

_MAX_FIELD_BYTES = 64 * 1024
_MAX_FILENAME_BYTES = 200
"""The longest filename kept, in UTF-8 bytes: file systems take 255 bytes per name."""
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


class UploadTooLarge(Exception):
    """The request body is larger than the limit."""


class MalformedUpload(Exception):
    """The request is not a well-formed multipart upload with exactly one file."""


@dataclass
class Upload:
    """The received file (on disk) and the form's text fields."""

    path: Path
    filename: str
    fields: dict[str, str]


def safe_filename(name: str) -> str:
    """The last path component of a client-supplied name, without control characters or separators, cut to
    :data:`_MAX_FILENAME_BYTES` bytes of UTF-8 (whole characters)."""
    base = _UNSAFE.sub("_", name.replace("\\", "/").rsplit("/", 1)[-1]).strip()
    base = base.encode()[:_MAX_FILENAME_BYTES].decode("utf-8", "ignore")
    return base if base not in ("", ".", "..") else "upload.jsonl"


@dataclass
class _Receiver:
    """python-multipart callbacks: the file part goes to ``folder``, text fields to memory (64 KiB at most)."""

    folder: Path
    file_field: str
    fields: dict[str, str] = field(default_factory=dict)
    upload: Upload | None = None
    ended: bool = False
    """Whether the body's closing boundary came."""
    _headers: dict[bytes, bytes] = field(default_factory=dict)
    _header: tuple[bytearray, bytearray] = field(default_factory=lambda: (bytearray(), bytearray()))
    _name: str = ""
    _out: IO[bytes] | None = None
    _text: bytearray | None = None

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header[0].extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header[1].extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _end(self) -> None:
        self.ended = True

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        name, value = self._header
        self._headers[bytes(name).lower()] = bytes(value)
        name.clear()
        value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            self._text = bytearray()
            return
        if self._name != self.file_field or self.upload is not None:
            raise MalformedUpload(f"send exactly one file, in the {self.file_field!r} field")
        filename = safe_filename(options[b"filename"].decode("utf-8", "replace"))
        path = self.folder / filename
        self._out = open(path, "wb")  # noqa: SIM115 - closed in _part_end or close()
        self.upload = Upload(path, filename, self.fields)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None:
            self._out.write(data[start:end])
        elif self._text is not None:
            if len(self._text) + end - start > _MAX_FIELD_BYTES:
                raise MalformedUpload(f"form field {self._name!r} is longer than {_MAX_FIELD_BYTES} bytes")
            self._text.extend(data[start:end])

    def _part_end(self) -> None:
        if self._text is not None:
            self.fields[self._name] = self._text.decode("utf-8", "replace")
            self._text = None
        self.close()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


async def receive_upload(request: Request, folder: Path, *, file_field: str, max_bytes: int) -> Upload:
    """Stream the request body through the multipart parser into ``folder``; every chunk is parsed and written in a
    worker thread. Raises :class:`UploadTooLarge` as soon as more than ``max_bytes`` arrive (or are announced)."""
    kind, params = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise MalformedUpload("expected a multipart/form-data body")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise UploadTooLarge
    receiver = _Receiver(folder, file_field)
    parser = MultipartParser(params[b"boundary"], receiver.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise UploadTooLarge
            await run_in_threadpool(parser.write, chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise MalformedUpload(f"malformed multipart body: {exc}") from None
    finally:
        receiver.close()
    if not receiver.ended:
        raise MalformedUpload("the multipart body ends before its closing boundary: the upload was cut short")
    if receiver.upload is None:
        raise MalformedUpload(f"no file in the {file_field!r} field")
    return receiver.upload
