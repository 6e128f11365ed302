"""Receive one uploaded file to disk as it streams in, with a size limit.

Starlette's form parsing spools every file part to a temporary file before the route runs, whatever its size, so
a limit checked afterwards comes too late (the disk is already full). Here the body is fed to python-multipart's
streaming parser chunk by chunk and the `file` part is written straight to the destination; once it passes the
limit the request is answered 413 without reading the rest. A body that is not multipart is taken as the archive
itself (`curl --data-binary @ds.zip`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import ApiError

FIELD_MAX = 4096  # bytes of a text field (`name`): such fields are held in memory
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers on top of the file, for the Content-Length check


@dataclass
class Upload:
    size: int = 0
    filename: str | None = None
    name: str | None = None  # the `name` form field, if sent


class _TooLarge(Exception):
    pass


class _Receiver:
    """The callbacks of the multipart parser: the `file` part goes to `out`, short text fields are kept."""

    def __init__(self, out: BinaryIO, max_bytes: int) -> None:
        self.out, self.max_bytes, self.upload = out, max_bytes, Upload()
        self.files = 0
        self._header = b""
        self._value = b""
        self._disposition = b""
        self._field: str | None = None
        self._is_file = False
        self._text = bytearray()

    def write(self, data: bytes) -> None:
        self.upload.size += len(data)
        if self.upload.size > self.max_bytes:
            raise _TooLarge
        self.out.write(data)  # a local file: short blocking writes, as Starlette's own spooling does

    # ---- python-multipart callbacks ----
    def on_part_begin(self) -> None:
        self._disposition, self._field, self._is_file, self._text = b"", None, False, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition = self._value
        self._header = self._value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._field = options.get(b"name", b"").decode("utf-8", "replace")
        self._is_file = self._field == "file"
        if self._is_file:
            self.files += 1
            if self.files > 1:
                raise ApiError(422, "invalid_request", "send one archive in the `file` field")
            raw = options.get(b"filename")
            self.upload.filename = Path(raw.decode("utf-8", "replace").replace("\\", "/")).name[:200] if raw else None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.write(data[start:end])
        else:
            self._text += data[start:end]
            if len(self._text) > FIELD_MAX:
                raise ApiError(422, "invalid_request", f"form field {self._field!r} is longer than {FIELD_MAX} bytes")

    def on_part_end(self) -> None:
        if self._field == "name":
            self.upload.name = self._text.decode("utf-8", "replace").strip()[:200] or None


def too_large(max_bytes: int) -> ApiError:
    return ApiError(413, "upload_too_large", f"the upload exceeds {max_bytes / 2**20:g} MB (SIDETUNE_MAX_UPLOAD_MB)")


async def receive_file(request: Request, dest: Path, max_bytes: int) -> Upload:
    """Write the request's file (multipart field `file`, or the whole body) to `dest`; raises ApiError 413
    `upload_too_large` as soon as more than `max_bytes` arrived, 422 for a malformed or fileless request."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise too_large(max_bytes)  # refused before reading a byte
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    with open(dest, "wb") as out:
        receiver = _Receiver(out, max_bytes)
        try:
            if content_type == b"multipart/form-data":
                boundary = params.get(b"boundary")
                if not boundary:
                    raise ApiError(422, "invalid_request", "multipart/form-data without a boundary")
                callbacks = {name: getattr(receiver, name) for name in dir(receiver) if name.startswith("on_")}
                parser = MultipartParser(boundary, callbacks)
                async for chunk in request.stream():
                    parser.write(chunk)
                parser.finalize()
                if receiver.files == 0:
                    raise ApiError(
                        422, "invalid_request", "no `file` field: upload the archive as multipart field `file`"
                    )
            else:
                async for chunk in request.stream():
                    receiver.write(chunk)
        except _TooLarge:
            raise too_large(max_bytes) from None
        except FormParserError as e:
            raise ApiError(422, "invalid_request", f"malformed multipart body: {e}") from None
    return receiver.upload
