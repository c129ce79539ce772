"""A streaming ``multipart/form-data`` reader (RFC 7578), so uploads go to disk chunk by chunk.

``MultipartReader(boundary).feed(chunk)`` returns the events found so far:
``PartStart(name, filename, content_type)``, ``PartData(bytes)`` and ``PartEnd()``; call
:meth:`MultipartReader.close` at the end of the body (it raises if the closing delimiter was
never seen). Memory stays bounded: part bodies are handed out as they arrive (holding back
only what could be the start of a delimiter), and part headers are limited in size.

The service has no other multipart needs, so this small reader replaces a dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message

MAX_HEADER_BYTES = 8192
MAX_BOUNDARY_CHARS = 70  # RFC 2046


class MultipartError(ValueError):
    pass


@dataclass
class PartStart:
    name: str
    filename: str | None
    content_type: str | None


@dataclass
class PartData:
    data: bytes


@dataclass
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd


def boundary_from_content_type(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type; :class:`MultipartError` otherwise."""
    msg = Message()
    msg["content-type"] = content_type
    if msg.get_content_type() != "multipart/form-data":
        raise MultipartError("the request body must be multipart/form-data")
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= MAX_BOUNDARY_CHARS:
        raise MultipartError("multipart/form-data needs a boundary parameter of 1 to 70 characters")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError as exc:
        raise MultipartError("the multipart boundary must be ASCII") from exc


def _part_headers(block: bytes) -> PartStart:
    msg = Message()
    for line in block.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name.strip():
            raise MultipartError("malformed multipart part header")
        msg[name.strip().decode("latin-1")] = value.strip().decode("utf-8", errors="replace")
    disposition = msg.get("content-disposition")
    if disposition is None or msg.get_content_disposition() != "form-data":
        raise MultipartError("every multipart part needs 'Content-Disposition: form-data'")
    name = msg.get_param("name", header="content-disposition")
    if not isinstance(name, str) or not name:
        raise MultipartError("a multipart part has no field name")
    filename = msg.get_filename()
    content_type = msg.get("content-type")
    return PartStart(name=name, filename=filename, content_type=content_type)


class MultipartReader:
    """Incremental parser; see the module docstring."""

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        # The first delimiter may open the body without a CRLF: pretend one was there.
        self._buf = b"\r\n"
        self._state = "preamble"

    @property
    def done(self) -> bool:
        return self._state == "epilogue"

    def feed(self, chunk: bytes) -> list[Event]:
        if self._state == "epilogue":
            return []  # anything after the closing delimiter is ignored (RFC 2046)
        self._buf += chunk
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def close(self) -> None:
        if self._state != "epilogue":
            raise MultipartError("the multipart body ended before its closing boundary")

    def _step(self, events: list[Event]) -> bool:
        """Advance one state if the buffer allows; False when more input is needed."""
        buf, delim = self._buf, self._delimiter
        if self._state == "preamble":
            at = buf.find(delim)
            if at < 0:
                self._buf = buf[-(len(delim) - 1) :]  # drop the preamble, keep a possible delimiter start
                return False
            self._buf = buf[at + len(delim) :]
            self._state = "after_delimiter"
            return True
        if self._state == "after_delimiter":
            if len(buf) < 2:
                return False
            if buf.startswith(b"--"):
                self._state = "epilogue"
                self._buf = b""
                return False
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 256:
                    raise MultipartError("malformed multipart boundary line")
                return False
            if buf[:end].strip(b" \t"):
                raise MultipartError("malformed multipart boundary line")
            self._buf = buf[end + 2 :]
            self._state = "headers"
            return True
        if self._state == "headers":
            if buf.startswith(b"\r\n"):  # a part without headers
                raise MultipartError("every multipart part needs 'Content-Disposition: form-data'")
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise MultipartError(f"multipart part headers exceed {MAX_HEADER_BYTES} bytes")
                return False
            if end > MAX_HEADER_BYTES:
                raise MultipartError(f"multipart part headers exceed {MAX_HEADER_BYTES} bytes")
            events.append(_part_headers(buf[:end]))
            self._buf = buf[end + 4 :]
            self._state = "body"
            return True
        if self._state == "body":
            at = buf.find(delim)
            if at < 0:
                keep = len(delim) - 1
                if len(buf) > keep:
                    events.append(PartData(buf[:-keep]))
                    self._buf = buf[-keep:]
                return False
            if at:
                events.append(PartData(buf[:at]))
            events.append(PartEnd())
            self._buf = buf[at + len(delim) :]
            self._state = "after_delimiter"
            return True
        return False
