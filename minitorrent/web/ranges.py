"""HTTP Range and If-Range (RFC 9110 section 14) for one byte range, without I/O.

Only a single range is honoured: a multi-range request is answered with the
whole file (which RFC 9110 allows), as is a header this module cannot parse.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# A number longer than 40 digits is no byte position (and past 4300 digits int() raises): the header is ignored.
_SINGLE_RANGE = re.compile(r"bytes=(\d{0,40})-(\d{0,40})")


class Unsatisfiable(Exception):
    """The range starts at or beyond the end of the file: answer 416."""


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``start`` to ``end`` inclusive, as HTTP counts them."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The range ``header`` asks of a file of ``size`` bytes; None: send it whole.

    Raises ``Unsatisfiable`` when the range is well formed but holds no byte
    of the file (a start at or past the end, a suffix of 0 bytes).
    """
    match = _SINGLE_RANGE.fullmatch((header or "").replace(" ", ""))
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # bytes=-N: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable()
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    if last != "" and int(last) < start:
        return None  # invalid: ignored, as RFC 9110 says
    if start >= size:
        raise Unsatisfiable()
    return ByteRange(start, size - 1 if last == "" else min(int(last), size - 1))


def range_applies(if_range: str | None, etag: str, last_modified: str) -> bool:
    """True if a Range header may be honoured given the request's ``If-Range``.

    An entity tag must equal ours exactly (a weak one never matches); a date
    must equal our Last-Modified. Otherwise the file may have changed since
    the client's partial copy: it gets the whole file.
    """
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith(("\"", "W/")):
        return value == etag
    return value == last_modified
