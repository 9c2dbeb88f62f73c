"""Moving protocol frames over a TCP socket: the only code that does it.

``protocol.py`` decides what the bytes are (its ``FrameDecoder`` is fed
every byte received here); this module only moves them. Receiving reads a
little ahead into a reused scratch buffer until the decoder has a frame's
head, then lets the payload land in a buffer the caller owns: the decoder
hands over the part it already holds and the rest comes straight from the
socket with ``recv_into``, so a 1 MiB chunk is received without a fresh
allocation each time. Sending a file payload uses ``socket.sendfile`` so the
bytes go from the page cache to the socket without passing through Python.

Every frame has one deadline, whatever trickle of bytes the peer sends: the
wait for the *first* byte of a frame may be long (an idle connection), but
from that byte the whole head must arrive within the I/O timeout, and the
payload within the I/O timeout plus its length at ``MIN_PAYLOAD_RATE_BPS``.
A peer that sends half a frame and stalls, or one byte every few seconds,
is cut off.
"""
from __future__ import annotations

import socket
import time
from typing import BinaryIO, Callable

from error_handler import ConnectionFailed
from minitorrent.wire import protocol
from minitorrent.wire.protocol import Frame, Message, ProtocolError

_MSG_MORE = getattr(socket, "MSG_MORE", 0)  # Linux: hold the header until the payload follows
READ_AHEAD_BYTES = 4096  # one recv takes in a small frame whole, or a few pipelined ones
MIN_PAYLOAD_RATE_BPS = 64 * 1024  # slower than this a payload is a stall (a 1 MiB chunk gets 16 s more)
LINGER_S = 1.0  # how long a closing side drains unread bytes so its last reply is not reset away
LINGER_BYTES = 4 * 1024 * 1024  # and at most this many


class ConnectionClosed(ConnectionFailed):
    """The peer closed the connection, or it broke, or a read timed out."""


class Connection:
    """One framed, persistent connection. Not thread-safe: one user at a time."""

    def __init__(self, sock: socket.socket, *, io_timeout_s: float, idle_timeout_s: float | None = None):
        self.sock = sock
        self.io_timeout_s = io_timeout_s
        self.idle_timeout_s = idle_timeout_s if idle_timeout_s is not None else io_timeout_s
        self.bytes_sent = 0
        self.bytes_received = 0
        self._decoder = protocol.FrameDecoder()
        self._scratch = bytearray(protocol.PREFIX_BYTES + protocol.MAX_HEADER_BYTES)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    def dial(cls, host: str, port: int, *, io_timeout_s: float,
             secure: Callable[[socket.socket, str, int], socket.socket] | None = None) -> Connection:
        """Open a TCP connection, secured by ``secure`` (TLS: tls.ClientTls); ``ConnectionFailed`` if it cannot be made."""
        try:
            sock = socket.create_connection((host, port), timeout=io_timeout_s)
        except OSError as error:
            raise ConnectionFailed(f"cannot connect to {host}:{port}: {_reason(error)}") from error
        if secure is not None:
            sock = secure(sock, host, port)  # it closes the socket if it raises
        return cls(sock, io_timeout_s=io_timeout_s)

    @property
    def peer(self) -> str:
        """``host:port`` of the other end, for logs."""
        try:
            host, port = self.sock.getpeername()[:2]
            return f"{host}:{port}"
        except OSError:
            return "(disconnected)"

    def close(self) -> None:
        """Close the socket; safe to call twice."""
        try:
            self.sock.close()
        except OSError:
            pass

    def close_lingering(self) -> None:
        """Close after what we sent has a chance to be read: no reset that would destroy our last reply.

        Closing a socket with unread bytes makes the kernel send a reset, which
        can discard a reply the peer has not read yet. So shut down our side
        first (the peer sees the end after our last bytes), then read and drop
        what the peer still sends until it closes too, for at most
        ``LINGER_S`` and ``LINGER_BYTES``, then close.
        """
        deadline = time.monotonic() + LINGER_S
        drained = 0
        try:
            self.sock.shutdown(socket.SHUT_WR)
            while drained < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                count = self.sock.recv_into(self._scratch)
                if count == 0:
                    break
                drained += count
        except OSError:
            pass  # reset, timed out or already gone: nothing more to wait for
        self.close()

    # Sending ------------------------------------------------------------------

    def send(self, message: Message, payload: bytes | memoryview = b"") -> None:
        """Send one frame. Raises ``ConnectionClosed`` if the socket fails."""
        head = protocol.encode_head(message, len(payload))
        self._send_all(head + bytes(payload) if payload else head)

    def send_many(self, messages: list[Message], payloads: list[bytes] | None = None) -> None:
        """Send several frames in one write (pipelined requests); ``payloads[i]`` goes with ``messages[i]``."""
        if payloads is None:
            self._send_all(b"".join(protocol.encode_head(m) for m in messages))
        else:
            self._send_all(b"".join(protocol.encode_head(m, len(p)) + p for m, p in zip(messages, payloads, strict=True)))

    def send_file_payload(self, message: Message, file: BinaryIO, offset: int, count: int) -> None:
        """Send ``message`` with ``count`` bytes of ``file`` from ``offset`` as payload.

        The payload goes with ``socket.sendfile``. If the file turns out
        shorter than promised the frame cannot be completed, so the connection
        is closed and ``ConnectionClosed`` raised.
        """
        head = protocol.encode_head(message, count)
        self.sock.settimeout(self.io_timeout_s)
        try:
            self.sock.sendall(head, _MSG_MORE)
            sent = self.sock.sendfile(file, offset, count) if count else 0
        except OSError as error:
            raise ConnectionClosed(f"send to {self.peer} failed: {_reason(error)}") from error
        self.bytes_sent += len(head) + sent
        if sent != count:
            self.close()
            raise ConnectionClosed(f"file ended after {sent} of {count} payload bytes")

    def _send_all(self, data: bytes) -> None:
        self.sock.settimeout(self.io_timeout_s)
        try:
            self.sock.sendall(data)
        except OSError as error:
            raise ConnectionClosed(f"send to {self.peer} failed: {_reason(error)}") from error
        self.bytes_sent += len(data)

    # Receiving ----------------------------------------------------------------

    def recv(self, payload_buffer: bytearray | None = None, max_payload: int | None = None) -> Frame:
        """Receive one frame.

        With ``payload_buffer`` the payload is read into it and returned as a
        memoryview over it, valid until the buffer is reused; otherwise the
        payload is returned as a read-only memoryview over a buffer of its
        own (as good as ``bytes``, without the copy). ``max_payload`` lowers the payload
        limit for this frame (a server accepts none from an unauthenticated
        peer), checked before anything is read. Raises ``ConnectionClosed`` on
        EOF, reset or timeout, and ``ProtocolError`` for a bad frame. A
        recoverable ``ProtocolError`` leaves the connection in step (its
        payload skipped).
        """
        head, deadline = self._recv_head(max_payload)
        deadline += head.payload_len / MIN_PAYLOAD_RATE_BPS
        return Frame(head.message, self._recv_payload(head.payload_len, payload_buffer, deadline))

    def _recv_head(self, max_payload: int | None) -> tuple[protocol.Head, float]:
        """The next frame's head, and the deadline its frame runs against (from its first byte)."""
        deadline = time.monotonic() + self.io_timeout_s if self._decoder.buffered else None
        while True:
            try:
                head = self._decoder.next_head(max_payload)
            except ProtocolError as error:
                if error.recoverable:
                    self._drain_refused(deadline or time.monotonic() + self.io_timeout_s)
                raise
            if head is not None:
                return head, deadline or time.monotonic() + self.io_timeout_s
            self._feed_decoder(deadline)
            deadline = deadline or time.monotonic() + self.io_timeout_s  # the frame's first byte is in

    def _drain_refused(self, deadline: float) -> None:
        """Read and drop a refused frame's payload (bounded by the frame limits), keeping the stream in step."""
        while self._decoder.discarding:
            self._feed_decoder(deadline)

    def _feed_decoder(self, deadline: float | None) -> None:
        """One read into the scratch buffer, fed to the decoder; ``deadline`` None: waiting between frames."""
        wanted = max(self._decoder.bytes_needed(), READ_AHEAD_BYTES)
        view = memoryview(self._scratch)[: min(wanted, len(self._scratch))]
        count = self._recv_into(view, deadline)
        self._decoder.feed(view[:count])

    def _recv_payload(self, length: int, buffer: bytearray | None, deadline: float) -> bytes | memoryview:
        if length == 0:
            return b""
        owned = buffer is None or len(buffer) < length
        target = bytearray(length) if owned else buffer
        view = memoryview(target)[:length]
        got = self._decoder.take_payload(view)
        while got < length:
            count = self._recv_into(view[got:], deadline)
            self._decoder.payload_received(count)
            got += count
        return view.toreadonly() if owned else view  # nobody else holds an owned buffer: no copy (a manifest may be 128 MiB)

    def _recv_into(self, view: memoryview, deadline: float | None) -> int:
        """One ``recv_into`` within the frame's deadline (or the idle timeout between frames); raise on EOF."""
        between_frames = deadline is None
        timeout = self.idle_timeout_s if between_frames else deadline - time.monotonic()
        if timeout <= 0:
            raise ConnectionClosed(f"{self.peer} did not send a whole frame within its deadline")
        self.sock.settimeout(timeout)
        try:
            count = self.sock.recv_into(view)
        except socket.timeout as error:
            if between_frames:
                raise ConnectionClosed(f"{self.peer} idle for {timeout:g} s") from error
            raise ConnectionClosed(f"{self.peer} stalled mid-frame") from error
        except OSError as error:
            raise ConnectionClosed(f"connection to {self.peer} broke: {_reason(error)}") from error
        if count == 0:
            where = "between frames" if between_frames else "mid-frame"
            raise ConnectionClosed(f"{self.peer} closed the connection {where}")
        self.bytes_received += count
        return count


def _reason(error: OSError) -> str:
    if isinstance(error, socket.timeout):
        return "timed out"
    return error.strerror or type(error).__name__
