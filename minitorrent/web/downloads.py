"""/files/<sha256>/<name>: a shared file over HTTP, resumable (Range, If-Range), by sendfile.

The URL names the content (its SHA-256) as well as the file, so a resumed
download can never splice bytes of a replaced file onto the old ones: a
file replaced under the same name has another address, and the old one
answers 410 (STALE_VERSION) once no name holds that content any more.
"""
from __future__ import annotations

import mimetypes
import os
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from database import FileRecord
from minitorrent.server.engine import ServerEngine
from minitorrent.web.errors import HttpError
from minitorrent.web.ranges import ByteRange, Unsatisfiable, parse_range, range_applies
from minitorrent.web.views import file_url
from minitorrent.wire.protocol import ErrorCode

SEND_PIECE_BYTES = 1 << 20  # sendfile per call: the upload limit paces the file in pieces, rates stay live


@dataclass(frozen=True)
class Reply:
    """What to send for one file request: status, headers, and which bytes of which blob."""

    status: int
    headers: dict[str, str]
    blob: Path
    part: ByteRange | None  # None: no body (an empty file)
    record: FileRecord


def find_file(engine: ServerEngine, sha256: str, name: str) -> FileRecord:
    """The catalog record of ``name`` holding content ``sha256``; ``HttpError`` if there is none."""
    db = engine.catalog.db
    if name in db.names_with_sha256(sha256):
        record = db.get_file(name)
        if record is not None and record.sha256 == sha256:
            return record
    current = db.get_file(name)
    if current is not None:
        raise HttpError(ErrorCode.STALE_VERSION, f"{name} now has other content, at {file_url(current.sha256, name)}")
    raise HttpError(ErrorCode.NOT_FOUND, f"no file named {name!r} with sha256 {sha256}")


def plan_reply(engine: ServerEngine, record: FileRecord, range_header: str | None, if_range: str | None) -> Reply:
    """Status and headers for a GET of ``record`` with these Range/If-Range headers (no I/O but a stat)."""
    blob = engine.catalog.blob_path(record.sha256)
    etag, modified = f'"{record.sha256}"', formatdate(record.added_at, usegmt=True)
    headers = {"ETag": etag, "Last-Modified": modified, "Accept-Ranges": "bytes",
               "Content-Type": mimetypes.guess_type(record.name)[0] or "application/octet-stream",
               "Content-Disposition": f"attachment; filename*=UTF-8''{quote(record.name, safe='')}",
               # The address is the content: what it names never changes.
               "Cache-Control": "public, max-age=31536000, immutable"}
    size = record.size
    try:
        part = parse_range(range_header, size) if range_applies(if_range, etag, modified) else None
    except Unsatisfiable:
        raise HttpError(ErrorCode.OUT_OF_RANGE, f"{record.name} has {size} bytes",
                        headers={"Content-Range": f"bytes */{size}"}) from None
    if part is None:
        whole = ByteRange(0, size - 1) if size else None
        return Reply(200, {**headers, "Content-Length": str(size)}, blob, whole, record)
    headers.update({"Content-Range": part.content_range(size), "Content-Length": str(part.length)})
    return Reply(206, headers, blob, part, record)


def open_blob(reply: Reply):
    """The blob open for reading; ``HttpError(STORAGE_ERROR)`` if it is missing or short."""
    try:
        file = open(reply.blob, "rb")
    except OSError as error:
        raise HttpError(ErrorCode.STORAGE_ERROR, f"cannot read the server's copy: {error.strerror}") from error
    if os.fstat(file.fileno()).st_size < reply.record.size:
        file.close()
        raise HttpError(ErrorCode.STORAGE_ERROR, f"the server's copy of {reply.record.name} is truncated")
    return file


def send_body(sock, file, part: ByteRange, before_piece: Callable[[int], None],
              after_piece: Callable[[int], None]) -> int:
    """Send ``part`` of ``file`` by sendfile in pieces; the bytes sent (fewer if the peer went away)."""
    offset, left = part.start, part.length
    while left > 0:
        piece = min(left, SEND_PIECE_BYTES)
        before_piece(piece)
        sent = sock.sendfile(file, offset, piece)
        after_piece(sent)
        if sent == 0:
            break
        offset += sent
        left -= sent
    return part.length - left
