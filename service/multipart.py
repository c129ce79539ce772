"""Streaming ``multipart/form-data`` (RFC 7578) on python-multipart, so uploads go to disk chunk by chunk.

``MultipartReader(boundary).feed(chunk)`` returns the events found so far:
``PartStart(name, filename, content_type)``, ``PartData(bytes)`` and ``PartEnd()``; call
:meth:`MultipartReader.close` at the end of the body (it raises if the closing delimiter was
never seen). The upload route consumes these events between chunks, so it can refuse a body
as soon as it is too large without the parser holding anything.

python-multipart's :class:`~python_multipart.multipart.MultipartParser` does the delimiter
search and hands part data out as it arrives; this module adds what the service needs on top:
the events (the route awaits disk writes, which a parser callback cannot), the checks on part
headers (a ``form-data`` disposition with a field name), skipping a preamble (RFC 2046 allows
one; the parser rejects it) and an error at the end when the closing delimiter is missing
(the parser's ``finalize`` does not check).
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_HEADER_BYTES = 8192  # one part header line; python-multipart also caps the headers per part at 8
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
    media_type, params = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        raise MultipartError("the request body must be multipart/form-data")
    boundary = params.get(b"boundary", b"")
    if not 1 <= len(boundary) <= MAX_BOUNDARY_CHARS:
        raise MultipartError("multipart/form-data needs a boundary parameter of 1 to 70 characters")
    if not boundary.isascii():
        raise MultipartError("the multipart boundary must be ASCII")
    return boundary


def _part_start(headers: dict[str, bytes]) -> PartStart:
    """Check a part's headers (names lower-cased, raw values) and say what the part is."""
    disposition, params = parse_options_header(headers.get("content-disposition"))
    if disposition != b"form-data":
        raise MultipartError("every multipart part needs 'Content-Disposition: form-data'")
    # python-multipart hands parameters back as latin-1 bytes; clients send UTF-8 names (HTML5)
    name = params.get(b"name", b"").decode("utf-8", errors="replace")
    if not name:
        raise MultipartError("a multipart part has no field name")
    filename = params.get(b"filename")
    content_type = headers.get("content-type")
    return PartStart(
        name=name,
        filename=None if filename is None else filename.decode("utf-8", errors="replace"),
        content_type=None if content_type is None else content_type.decode("utf-8", errors="replace").strip(),
    )


class MultipartReader:
    """Incremental reader; see the module docstring."""

    def __init__(self, boundary: bytes) -> None:
        self._opening = b"\r\n--" + boundary
        # Until the first delimiter is found, the tail that could be its start; the body may open
        # with the delimiter itself, so pretend a CRLF came before it.
        self._preamble: bytes | None = b"\r\n"
        self._events: list[Event] = []
        self._headers: dict[str, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._ended = False
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._headers.clear,
                "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
                "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
                "on_header_end": self._header_end,
                "on_headers_finished": lambda: self._events.append(_part_start(self._headers)),
                "on_part_data": lambda data, start, end: self._events.append(PartData(data[start:end])),
                "on_part_end": lambda: self._events.append(PartEnd()),
                "on_end": self._end,
            },
            max_header_size=MAX_HEADER_BYTES,
        )

    @property
    def done(self) -> bool:
        return self._ended

    def feed(self, chunk: bytes) -> list[Event]:
        if self._preamble is not None:
            buf = self._preamble + chunk
            at = buf.find(self._opening)
            if at < 0:
                self._preamble = buf[-(len(self._opening) - 1) :]
                return []
            self._preamble = None
            chunk = buf[at + 2 :]  # from the "--" of the first delimiter, where the parser starts
        try:
            self._parser.write(chunk)  # ignores what follows the closing delimiter (RFC 2046)
        except MultipartParseError as exc:
            raise MultipartError(str(exc)) from exc
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        if not self._ended:
            raise MultipartError("the multipart body ended before its closing boundary")

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = bytes(self._value).strip()
        self._field.clear()
        self._value.clear()

    def _end(self) -> None:
        self._ended = True
