"""Tests for transport.py: frames over real socket pairs, fed whole, split, trickled, cut or never sent."""
from __future__ import annotations

import socket
import threading
import time
from typing import Iterator

import pytest

from minitorrent.wire import transport
from minitorrent.wire.protocol import (
    PREFIX_BYTES,
    ChunkData,
    CountFiles,
    ErrorCode,
    GetChunk,
    ListFiles,
    Ok,
    ProtocolError,
    RemoteProtocolError,
    encode_frame,
)
from minitorrent.wire.transport import Connection, ConnectionClosed

IO_TIMEOUT_S = 0.5
IDLE_TIMEOUT_S = 0.5
TIMING_SLACK_S = 2.0  # how late a timeout may fire on a loaded machine
SHA = "ab" * 32
PAYLOAD = bytes(range(256)) * 40  # 10 KiB: more than one read-ahead, less than a socket buffer
STREAM = [
    (ListFiles("ü | ✓"), b""),
    (ChunkData("a", 3), PAYLOAD),
    (GetChunk("x y", SHA, 9), b""),
    (ChunkData("b", 4), b"short"),
    (Ok(), b""),
]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets on 127.0.0.1 (a real TCP stream: resets, Nagle, windows)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    return ours, theirs


@pytest.fixture
def pair() -> Iterator[tuple[Connection, socket.socket]]:
    """A Connection on one end of a TCP socket pair, the raw other end to play the peer."""
    ours, theirs = tcp_pair()
    connection = Connection(ours, io_timeout_s=IO_TIMEOUT_S, idle_timeout_s=IDLE_TIMEOUT_S)
    yield connection, theirs
    connection.close()
    theirs.close()


def stream_bytes() -> bytes:
    return b"".join(encode_frame(message, payload) for message, payload in STREAM)


def receive_all(connection: Connection, count: int, buffer: bytearray | None = None) -> list[tuple]:
    frames = [connection.recv(buffer) for _ in range(count)]
    return [(frame.message, bytes(frame.payload)) for frame in frames]


def send_later(sock: socket.socket, pieces: list[bytes], pause_s: float) -> threading.Thread:
    """Send ``pieces`` from a thread, ``pause_s`` apart; a closed socket ends it quietly."""
    def run() -> None:
        for piece in pieces:
            time.sleep(pause_s)  # the trickle itself is what is under test
            try:
                sock.sendall(piece)
            except OSError:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class TestWholeStreams:
    def test_frames_sent_at_once_arrive_in_order(self, pair):
        """Several frames in one write come back as the same messages and payloads, in order."""
        connection, peer = pair
        peer.sendall(stream_bytes())
        assert STREAM == receive_all(connection, len(STREAM))

    def test_split_at_every_offset(self, pair):
        """The stream written in two pieces, cut at any offset, decodes to the same frames."""
        connection, peer = pair
        data = stream_bytes()
        for cut in range(0, len(data) + 1, 7):  # every 7th offset: ~1,500 cuts, each through a real socket
            peer.sendall(data[:cut])
            thread = send_later(peer, [data[cut:]], 0.0)
            assert STREAM == receive_all(connection, len(STREAM)), f"cut at {cut}"
            thread.join()

    def test_split_at_every_offset_near_the_heads(self, pair):
        """Every single offset through the prefix and header of each frame decodes to the same frames."""
        connection, peer = pair
        data, starts, offset = stream_bytes(), [], 0
        for message, payload in STREAM:
            starts.append(offset)
            offset += len(encode_frame(message, payload))
        for cut in sorted({s + d for s in starts for d in range(PREFIX_BYTES + 60)} & set(range(len(data)))):
            peer.sendall(data[:cut])
            thread = send_later(peer, [data[cut:]], 0.0)
            assert STREAM == receive_all(connection, len(STREAM)), f"cut at {cut}"
            thread.join()

    def test_payload_lands_in_the_callers_buffer(self, pair):
        """With a large enough buffer the payload is a view over that buffer, not a fresh allocation."""
        connection, peer = pair
        buffer = bytearray(len(PAYLOAD))
        peer.sendall(encode_frame(ChunkData("a", 1), PAYLOAD))
        frame = connection.recv(buffer)
        assert (PAYLOAD, True) == (bytes(frame.payload), frame.payload.obj is buffer)

    def test_recoverable_error_skips_its_payload_and_stays_in_step(self, pair):
        """A frame refused for its header is skipped whole (payload too); the next frame decodes."""
        connection, peer = pair
        bad = encode_frame(ChunkData("a", 1), PAYLOAD).replace(b'"chunk"', b'"chunx"', 1)
        peer.sendall(bad + encode_frame(CountFiles()))
        with pytest.raises(RemoteProtocolError) as caught:
            connection.recv()
        assert (ErrorCode.UNKNOWN_REQUEST, True) == (caught.value.code, caught.value.recoverable)
        assert CountFiles() == connection.recv().message

    def test_payload_over_the_callers_limit_is_refused_from_the_prefix(self, pair):
        """max_payload refuses a larger declared payload before waiting for any of it."""
        connection, peer = pair
        peer.sendall(encode_frame(ChunkData("a", 1), PAYLOAD)[:PREFIX_BYTES + 40])
        started = time.monotonic()
        with pytest.raises(ProtocolError) as caught:
            connection.recv(max_payload=100)
        assert (False, True) == (caught.value.recoverable, time.monotonic() - started < IO_TIMEOUT_S)


class TestCutShort:
    @pytest.mark.parametrize("cut", [1, PREFIX_BYTES - 1, PREFIX_BYTES, PREFIX_BYTES + 10, -1])
    def test_half_a_frame_then_close(self, pair, cut):
        """A peer that sends part of a frame and closes gives ConnectionClosed, never a partial frame."""
        connection, peer = pair
        peer.sendall(encode_frame(ChunkData("a", 1), PAYLOAD)[:cut])
        peer.close()
        with pytest.raises(ConnectionClosed, match="mid-frame"):
            connection.recv()

    def test_close_between_frames_is_said_so(self, pair):
        """A peer that closes after a whole frame gives that frame, then ConnectionClosed between frames."""
        connection, peer = pair
        peer.sendall(encode_frame(Ok()))
        peer.close()
        assert Ok() == connection.recv().message
        with pytest.raises(ConnectionClosed, match="between frames"):
            connection.recv()


class TestDeadlines:
    def test_silent_peer_times_out_after_the_idle_timeout(self, pair):
        """A peer that sends nothing is given up on after idle_timeout."""
        connection, _ = pair
        started = time.monotonic()
        with pytest.raises(ConnectionClosed, match="idle"):
            connection.recv()
        elapsed = time.monotonic() - started
        assert IDLE_TIMEOUT_S * 0.8 <= elapsed <= IDLE_TIMEOUT_S + TIMING_SLACK_S, f"after {elapsed:.2f} s"

    def test_half_a_frame_then_silence_times_out(self, pair):
        """A peer that stalls mid-frame is given up on after io_timeout."""
        connection, peer = pair
        peer.sendall(encode_frame(ChunkData("a", 1), PAYLOAD)[:PREFIX_BYTES + 20])
        started = time.monotonic()
        with pytest.raises(ConnectionClosed, match="stalled|deadline"):
            connection.recv()
        elapsed = time.monotonic() - started
        assert IO_TIMEOUT_S * 0.8 <= elapsed <= IO_TIMEOUT_S + TIMING_SLACK_S, f"after {elapsed:.2f} s"

    def test_a_trickle_is_cut_off_by_one_deadline_per_frame(self):
        """Bytes trickled so that no part of the frame takes io_timeout are still cut off at the frame's deadline.

        (A deadline per part, prefix then header, would let a slowloris peer
        take nearly twice io_timeout per frame, and a per-read timeout for ever.)
        """
        ours, theirs = tcp_pair()
        connection = Connection(ours, io_timeout_s=1.0)
        data = encode_frame(ListFiles("x" * 200))
        half_prefix, half_header = PREFIX_BYTES // 2, PREFIX_BYTES + (len(data) - PREFIX_BYTES) // 2
        theirs.sendall(data[:half_prefix])
        # the prefix ends 0.6 s after its first byte, the header 0.9 s after the prefix: 1.5 s in all
        thread = send_later(theirs, [data[half_prefix:PREFIX_BYTES], data[PREFIX_BYTES:half_header]], 0.6)
        later = send_later(theirs, [data[half_header:]], 1.5)
        started = time.monotonic()
        try:
            with pytest.raises(ConnectionClosed):
                connection.recv()
            elapsed = time.monotonic() - started
            assert elapsed <= 1.0 + TIMING_SLACK_S, f"after {elapsed:.2f} s"
        finally:
            connection.close()
            theirs.close()
            thread.join()
            later.join()

    def test_payload_gets_time_for_its_length(self):
        """A large payload arriving steadily is not cut off by the head's io_timeout."""
        ours, theirs = tcp_pair()
        connection = Connection(ours, io_timeout_s=0.3)
        try:
            payload = bytes(4 * transport.MIN_PAYLOAD_RATE_BPS // 10)  # 0.4 s at the minimum rate
            data = encode_frame(ChunkData("a", 1), payload)
            pieces = [data[i:i + len(data) // 8] for i in range(0, len(data), len(data) // 8)]
            thread = send_later(theirs, pieces, 0.05)  # 0.45 s in all, beyond io_timeout
            assert payload == bytes(connection.recv().payload)
            thread.join()
        finally:
            connection.close()
            theirs.close()


class TestLingeringClose:
    def test_last_reply_survives_unread_bytes_from_the_peer(self):
        """close_lingering after a reply lets the peer read it, though the peer's bytes were never read."""
        for _ in range(20):  # a plain close() here loses the reply to a reset now and then
            ours, theirs = tcp_pair()
            connection = Connection(ours, io_timeout_s=IO_TIMEOUT_S)
            theirs.sendall(b"x" * 100_000)  # a request we refuse without reading
            connection.send(Ok())
            closer = threading.Thread(target=connection.close_lingering)
            closer.start()
            theirs.settimeout(IO_TIMEOUT_S + TIMING_SLACK_S)
            received = b""
            while chunk := theirs.recv(1 << 16):
                received += chunk
            theirs.close()
            closer.join()
            assert encode_frame(Ok()) == received

    def test_lingering_is_bounded_when_the_peer_never_closes(self, pair):
        """A peer that neither closes nor stops sending cannot hold close_lingering past LINGER_S."""
        connection, peer = pair
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                try:
                    peer.sendall(b"y" * 65536)
                except OSError:
                    return

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        started = time.monotonic()
        connection.close_lingering()
        elapsed = time.monotonic() - started
        stop.set()
        peer.close()
        flooder.join()
        assert elapsed <= transport.LINGER_S + TIMING_SLACK_S, f"lingered {elapsed:.2f} s"
