"""Errors of the web face: JSON bodies carrying the wire protocol's error codes."""
from __future__ import annotations

import json

from minitorrent.wire.protocol import ErrorCode

# The HTTP status that goes with each wire error code; anything else is a 500.
HTTP_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.BAD_NAME: 400,
    ErrorCode.AUTH_FAILED: 401,
    ErrorCode.NOT_PAIRED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNKNOWN_REQUEST: 405,
    ErrorCode.STALE_VERSION: 410,
    ErrorCode.OUT_OF_RANGE: 416,
    ErrorCode.BUSY: 503,
    ErrorCode.STANDBY: 503,
}


class HttpError(Exception):
    """An answer other than success: an HTTP status, a wire error code, a readable message."""

    def __init__(self, code: str, message: str, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or HTTP_STATUS.get(code, 500)
        self.headers = headers or {}

    def body(self) -> bytes:
        """``{"error": {"code": ..., "message": ...}}`` as UTF-8 JSON."""
        return json.dumps({"error": {"code": self.code, "message": self.message}}).encode()
