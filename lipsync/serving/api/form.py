"""The body of ``POST /v1/jobs``, read as it streams in -- after the key and the key's limits
were checked, never before.

Files (``video``, ``audio``) are written straight into the submission's scratch folder; each
one's content type is checked when its headers arrive, before any of its bytes is read, and
the bytes are counted against the budget (video + audio) and refused at the first one over it
(413). Nothing else is spooled anywhere. Text fields are small (``MAX_FIELD_BYTES``) and few
(``MAX_PARTS`` parts in all). ``application/x-www-form-urlencoded`` bodies (submissions that
only name ``s3://`` inputs) are read whole, up to ``MAX_URLENCODED_BYTES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from lipsync.serving.api.errors import ApiError
from lipsync.serving.inputs import InputRejected, Staged, check_content_type, safe_suffix, too_large

FILE_FIELDS = ("video", "audio")
MAX_FIELD_BYTES = 4096
MAX_PARTS = 16
MAX_URLENCODED_BYTES = 64 * 1024


@dataclass
class Submitted:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, Staged] = field(default_factory=dict)


async def read_form(request: Request, folder: Path, budget: int) -> Submitted:
    """The submission's fields and files (module docstring); ``budget``: bytes of files."""
    ctype, params = parse_options_header(request.headers.get("content-type"))
    try:
        if ctype == b"application/x-www-form-urlencoded":
            return await _read_urlencoded(request)
        if ctype != b"multipart/form-data" or not params.get(b"boundary"):
            raise ApiError(
                415, "unsupported_media_type",
                "send the job as multipart/form-data (curl -F video=@talk.mp4 …)",
            )  # fmt: skip
        reader = _MultipartReader(folder, budget)
        parser = MultipartParser(params[b"boundary"], reader.callbacks())
        try:
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
        finally:
            reader.close()
    except ClientDisconnect:
        raise ApiError(400, "incomplete_body", "the client went away mid-upload") from None
    except FormParserError as exc:
        raise ApiError(422, "bad_form", f"unreadable multipart body: {exc}") from None
    except InputRejected as exc:
        if exc.code == "too_large":
            exc = too_large(budget)
        raise ApiError(exc.status, exc.code, exc.message) from None
    if not reader.complete:
        raise ApiError(422, "bad_form", "the multipart body ended before its closing boundary")
    return reader.result


async def _read_urlencoded(request: Request) -> Submitted:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_URLENCODED_BYTES:
            raise ApiError(413, "too_large", "form fields too large; upload files as multipart")
    text = body.decode("utf-8", "replace")
    return Submitted(fields=dict(parse_qsl(text, keep_blank_values=True)))


class _MultipartReader:
    """python-multipart callbacks that route each part (module docstring)."""

    def __init__(self, folder: Path, budget: int):
        self.folder = folder
        self.budget = budget
        self.used = 0
        self.parts = 0
        self.complete = False
        self.result = Submitted()
        self._reset()

    def _reset(self) -> None:
        self._headers: dict[bytes, bytes] = {}
        self._hname = b""
        self._hvalue = b""
        self._name: str | None = None
        self._file = None
        self._staged: Staged | None = None
        self._value = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.part_begin, "on_header_field": self.header_field,
            "on_header_value": self.header_value, "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
            "on_part_end": self.part_end, "on_end": self.end,
        }  # fmt: skip

    def part_begin(self) -> None:
        self._reset()
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise ApiError(422, "bad_form", f"too many form fields (at most {MAX_PARTS})")

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def header_end(self) -> None:
        self._headers[self._hname.lower()] = self._hvalue
        self._hname, self._hvalue = b"", b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        if b"name" not in options:
            raise ApiError(422, "bad_form", "a form part has no name")
        self._name = options[b"name"].decode("utf-8", "replace")
        if b"filename" not in options:
            return
        role = self._name
        if role not in FILE_FIELDS:
            raise ApiError(422, "bad_form", f"unexpected file field {role!r} (video, audio)")
        if role in self.result.files:
            raise ApiError(422, "bad_form", f"'{role}' was uploaded twice")
        ctype = self._headers.get(b"content-type", b"").decode("latin-1") or None
        check_content_type(role, ctype)
        suffix = safe_suffix(options[b"filename"].decode("utf-8", "replace"))
        path = self.folder / f"{role}{suffix}"
        self._file = open(path, "wb")  # noqa: SIM115 - closed in part_end / close
        self._staged = Staged(path, suffix, 0)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        size = end - start
        if self._file is None:
            self._value += data[start:end]
            if len(self._value) > MAX_FIELD_BYTES:
                raise ApiError(422, "bad_form", f"form field {self._name!r} is too long")
            return
        self.used += size
        if self.used > self.budget:
            raise too_large()
        self._file.write(data[start:end])
        self._staged.size += size

    def part_end(self) -> None:
        if self._file is None:
            self.result.fields[self._name] = self._value.decode("utf-8", "replace")
            return
        self._file.close()
        self._file = None
        if self._staged.size == 0:
            raise ApiError(422, "empty_upload", f"the {self._name} upload is empty")
        self.result.files[self._name] = self._staged

    def end(self) -> None:
        self.complete = True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
