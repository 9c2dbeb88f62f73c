"""Tests for serving.py (with transport.py underneath): a live in-process MainServer,
fed well-behaved and misbehaving peers over real sockets on 127.0.0.1."""
from __future__ import annotations

import json
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from conftest import SHORT_TIMEOUT, TLS, make_config, make_file, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from error_handler import ConnectionFailed
from integrity import Manifest, sha256_file
from minitorrent.net.remote import ServerSession
from minitorrent.server.backup import BackupServer
from minitorrent.server.main import MainServer
from minitorrent.wire import protocol
from minitorrent.wire.protocol import (
    MAGIC,
    MAX_CLIENT_PAYLOAD,
    MAX_HEADER_BYTES,
    PREFIX,
    PREFIX_BYTES,
    PROTOCOL_VERSION,
    ChunkData,
    CountFiles,
    ErrorCode,
    ErrorReply,
    FileCount,
    FileList,
    Frame,
    FrameDecoder,
    GetChunk,
    GetManifest,
    GetStatus,
    Hello,
    ListFiles,
    ManifestInfo,
    ProtocolError,
    StatusInfo,
    Welcome,
    encode_frame,
)

CHUNK_SIZE = 1024
IO_TIMEOUT_S = 1.0
IDLE_TIMEOUT_S = 1.0
FAST = {"transfer": {"chunk_size": CHUNK_SIZE, "idle_timeout": IDLE_TIMEOUT_S, "io_timeout": IO_TIMEOUT_S}}
# Timeouts long enough that nothing is cut off while a test holds a connection on purpose.
PATIENT = {"transfer": {"chunk_size": CHUNK_SIZE, "idle_timeout": SHORT_TIMEOUT, "io_timeout": SHORT_TIMEOUT}}
FILE_NAME = "Résumé | draft: v2 🎉.bin"
FILE_SIZE = 21 * CHUNK_SIZE + 321  # 22 chunks, the last one short
TIMING_SLACK_S = 2.0  # how late a timeout may fire on a loaded machine

HELLO = encode_frame(Hello(PROTOCOL_VERSION, "client", "test_serving"))


# --------------------------------------------------------------------------- helpers


@dataclass
class Served:
    """A running server with one shared file, and what a client needs to fetch it."""

    engine: MainServer
    address: tuple[str, int]
    manifest: Manifest
    source: Path

    @property
    def blob(self) -> Path:
        return self.engine.catalog.store_dir / self.manifest.sha256


def serve_one_file(engine: MainServer, folder: Path) -> Served:
    source = make_file(folder / "src" / FILE_NAME, FILE_SIZE, seed=7)
    engine.add_file(source)
    session = ServerSession.open(*engine.server.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
    try:
        manifest = fetch_manifest(session, FILE_NAME)
    finally:
        session.close()
    return Served(engine, engine.server.address, manifest, source)


@pytest.fixture
def start_served(server_factory, tmp_path):
    """Start a server (config overrides optional) sharing FILE_NAME; returns a ``Served``."""
    def start(overrides: dict | None = None) -> Served:
        return serve_one_file(server_factory(overrides or FAST), tmp_path)
    return start


@pytest.fixture
def served(start_served) -> Served:
    """A server with short timeouts (FAST) sharing FILE_NAME."""
    return start_served()


def fetch_manifest(session: ServerSession, name: str) -> Manifest:
    frame = session.call(GetManifest(name), ManifestInfo)
    return Manifest.from_header(frame.message.to_header(), bytes(frame.payload))


def header_frame(header: object, payload: bytes = b"", *, payload_len: int | None = None) -> bytes:
    """A well-framed frame whose JSON header may be anything; lengths may lie about the payload."""
    body = json.dumps(header, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return PREFIX.pack(MAGIC, len(body), len(payload) if payload_len is None else payload_len) + body + payload


def get_chunk_frame(name: object, sha256: object, index: object) -> bytes:
    """A GetChunk frame built by hand, so its fields may break the rules the dataclass enforces."""
    return header_frame({"type": "get", "name": name, "sha256": sha256, "index": index})


class RawPeer:
    """A raw TCP peer: sends whatever bytes it is told and decodes what comes back."""

    def __init__(self, address: tuple[str, int] | None, timeout_s: float = SHORT_TIMEOUT,
                 sock: socket.socket | None = None) -> None:
        raw = sock or socket.create_connection(address, timeout=timeout_s)
        self.sock = TLS.handshake(raw, *raw.getpeername()[:2])
        self.decoder = FrameDecoder()
        self.closed_by_server = False

    @classmethod
    def from_socket(cls, sock: socket.socket) -> RawPeer:
        """A raw peer over a socket already connected (from a chosen source address, say)."""
        return cls(None, sock=sock)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def finish_sending(self) -> None:
        """Say we send nothing more (TLS close_notify, TCP's half-close) and go on reading the replies."""
        self.sock.setblocking(False)
        try:
            self.sock.unwrap()  # sends close_notify; the server's answer is still to be read
        except (ssl.SSLWantReadError, OSError):
            pass
        self.sock.settimeout(SHORT_TIMEOUT)

    def send(self, data: bytes, *, may_be_cut_off: bool = False) -> None:
        """Send ``data``; with ``may_be_cut_off`` a server that hangs up mid-send is not an error."""
        try:
            self.sock.sendall(data)
        except OSError:
            if not may_be_cut_off:
                raise

    def greet(self) -> Welcome:
        self.send(HELLO)
        return self.expect(Welcome)

    def frames(self, count: int) -> list[Frame]:
        """The next ``count`` frames; fails the test if the server closes or goes quiet first."""
        frames: list[Frame] = []
        while True:
            while len(frames) < count and (frame := self.decoder.next_frame()) is not None:
                frames.append(frame)
            if len(frames) == count:
                return frames
            data = self._recv()
            assert data, f"server closed after {len(frames)} of {count} replies"
            self.decoder.feed(data)

    def frame(self) -> Frame:
        return self.frames(1)[0]

    def expect(self, kind: type[protocol.Message]) -> protocol.Message:
        message = self.frame().message
        assert kind == type(message), f"expected {kind.TYPE}, got {message}"
        return message

    def expect_error(self) -> str:
        """The code of the next reply, which must be an ErrorReply."""
        return self.expect(ErrorReply).code

    def frames_until(self, kind: type[protocol.Message]) -> list[Frame]:
        """Frames up to and including one of ``kind``, or up to the server closing (then ``closed_by_server``)."""
        frames: list[Frame] = []
        while True:
            while (frame := self.decoder.next_frame()) is not None:
                frames.append(frame)
                if isinstance(frame.message, kind):
                    return frames
            data = self._recv()
            if not data:
                self.closed_by_server = True
                return frames
            self.decoder.feed(data)

    def read_until_closed(self) -> list[Frame]:
        """Every frame the server sends until it closes the connection (EOF or reset)."""
        frames: list[Frame] = []
        while True:
            while (frame := self.decoder.next_frame()) is not None:
                frames.append(frame)
            data = self._recv()
            if not data:
                self.closed_by_server = True
                return frames
            self.decoder.feed(data)

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(1 << 16)
        except ConnectionResetError:
            return b""  # closed with our bytes unread: the kernel answers with RST
        except socket.timeout:
            raise AssertionError("the server neither replied nor closed the connection in time") from None


def error_codes(frames: list[Frame]) -> list[str]:
    return [frame.message.code if isinstance(frame.message, ErrorReply) else frame.message.TYPE for frame in frames]


def still_serves(served: Served, index: int = 1) -> None:
    """A fresh well-behaved client can list the catalog and fetch a verified chunk."""
    session = ServerSession.open(*served.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
    try:
        listing = session.call(ListFiles(), FileList).message
        assert [FILE_NAME] == [entry["name"] for entry in listing.files]
        frame = session.call(GetChunk(FILE_NAME, served.manifest.sha256, index), ChunkData)
        assert served.manifest.verify_chunk(index, frame.payload)
    finally:
        session.close()


def close_within(peer: RawPeer, low_s: float, high_s: float) -> float:
    """Wait for the server to close ``peer``; assert it took between low and high seconds."""
    started = time.monotonic()
    assert [] == peer.read_until_closed()
    elapsed = time.monotonic() - started
    assert low_s <= elapsed <= high_s, f"closed after {elapsed:.2f} s"
    return elapsed


def no_connections(served: Served) -> bool:
    return 0 == served.engine.metrics.active_connections


@pytest.fixture
def thread_crashes(monkeypatch) -> list[threading.ExceptHookArgs]:
    """Unhandled exceptions in server threads, collected instead of only printed."""
    crashes: list[threading.ExceptHookArgs] = []
    original = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        crashes.append(args)
        original(args)

    monkeypatch.setattr(threading, "excepthook", hook)
    return crashes


def crash_summary(crashes: list[threading.ExceptHookArgs]) -> list[str]:
    return [f"{args.thread.name if args.thread else '?'}: {args.exc_type.__name__}: {args.exc_value}"
            for args in crashes]


# --------------------------------------------------------------------------- framing errors


class TestBrokenFraming:
    def test_oversized_header_gets_bad_frame_and_close(self, served):
        """A prefix declaring a header over MAX_HEADER_BYTES is answered BAD_FRAME and the connection closed."""
        with RawPeer(served.address) as peer:
            peer.greet()
            peer.send(PREFIX.pack(MAGIC, MAX_HEADER_BYTES + 1, 0))
            assert [ErrorCode.BAD_FRAME] == error_codes(peer.read_until_closed())
        still_serves(served)

    def test_oversized_header_sent_in_full_gets_bad_frame(self, served):
        """The BAD_FRAME reply arrives even when the peer has already sent the whole oversized header."""
        with RawPeer(served.address) as peer:
            peer.greet()
            peer.send(PREFIX.pack(MAGIC, MAX_HEADER_BYTES + 1, 0) + b"{" * (MAX_HEADER_BYTES + 1), may_be_cut_off=True)
            assert [ErrorCode.BAD_FRAME] == error_codes(peer.read_until_closed())
        still_serves(served)

    def test_oversized_header_before_hello_gets_bad_frame(self, served):
        """Broken framing is answered BAD_FRAME even on a connection that never said hello."""
        with RawPeer(served.address) as peer:
            peer.send(PREFIX.pack(MAGIC, 2**32 - 1, 0))
            assert [ErrorCode.BAD_FRAME] == error_codes(peer.read_until_closed())
        still_serves(served)

    def test_bad_magic_gets_bad_frame_and_close(self, served):
        """Bytes that are not a MiniTorrent frame (an HTTP request) get BAD_FRAME and a close."""
        with RawPeer(served.address) as peer:
            peer.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert [ErrorCode.BAD_FRAME] == error_codes(peer.read_until_closed())
        still_serves(served)

    def test_zero_length_header_gets_bad_frame(self, served):
        """A prefix declaring an empty header gets BAD_FRAME and a close."""
        with RawPeer(served.address) as peer:
            peer.greet()
            peer.send(PREFIX.pack(MAGIC, 0, 0))
            assert [ErrorCode.BAD_FRAME] == error_codes(peer.read_until_closed())
        still_serves(served)

    def test_payload_on_request_that_takes_none_gets_bad_frame(self, served):
        """A GetChunk carrying a payload breaks framing: BAD_FRAME, then the connection is closed."""
        with RawPeer(served.address) as peer:
            peer.greet()
            header = {"type": "get", "name": FILE_NAME, "sha256": served.manifest.sha256, "index": 0}
            peer.send(header_frame(header, b"0123456789"))
            assert [ErrorCode.BAD_FRAME] == error_codes(peer.read_until_closed())
        still_serves(served)

    def test_hello_with_payload_gets_bad_frame(self, served):
        """A Hello carrying a payload gets BAD_FRAME and a close."""
        with RawPeer(served.address) as peer:
            peer.send(header_frame(Hello(PROTOCOL_VERSION, "client").to_header(), b"x" * 10))
            assert [ErrorCode.BAD_FRAME] == error_codes(peer.read_until_closed())
        still_serves(served)


class TestTruncatedFrames:
    @pytest.mark.parametrize("cut", [1, PREFIX_BYTES // 2, PREFIX_BYTES, PREFIX_BYTES + 5])
    def test_part_of_a_frame_then_close(self, served, cut):
        """A peer that sends part of a prefix or header and hangs up leaves the server unharmed."""
        frame = encode_frame(ListFiles("some search text"))
        with RawPeer(served.address) as peer:
            peer.greet()
            peer.send(frame[:cut])
        wait_until(lambda: no_connections(served), what="the handler to notice the hang-up")
        still_serves(served)

    @pytest.mark.parametrize("cut", [PREFIX_BYTES // 2, PREFIX_BYTES + 5])
    def test_part_of_a_frame_then_silence_is_cut_off(self, served, cut):
        """A peer that stalls mid-frame is disconnected after io_timeout, and others are served meanwhile."""
        frame = encode_frame(ListFiles("some search text"))
        with RawPeer(served.address) as peer:
            peer.greet()
            peer.send(frame[:cut])
            still_serves(served)
            close_within(peer, 0.0, IO_TIMEOUT_S + TIMING_SLACK_S)
        still_serves(served)

    def test_stall_is_timed_from_the_first_byte_of_the_frame(self, start_served):
        """A stalled frame is cut off after io_timeout, not the (longer) idle timeout."""
        served = start_served({"transfer": {**FAST["transfer"], "idle_timeout": SHORT_TIMEOUT}})
        with RawPeer(served.address) as peer:
            peer.greet()
            started = time.monotonic()
            peer.send(encode_frame(CountFiles())[:3])
            peer.read_until_closed()
            elapsed = time.monotonic() - started
        assert IO_TIMEOUT_S * 0.8 <= elapsed <= IO_TIMEOUT_S + TIMING_SLACK_S, f"closed after {elapsed:.2f} s"


class TestLyingPayloadLength:
    def test_unknown_type_with_missing_payload_is_cut_off(self, served):
        """A frame declaring more payload than it sends, then silence, is closed within ~io_timeout."""
        with RawPeer(served.address) as peer:
            peer.greet()
            started = time.monotonic()
            peer.send(header_frame({"type": "teleport"}, b"x" * 100, payload_len=1_000_000))
            still_serves(served)  # other clients are unaffected while this one stalls
            peer.read_until_closed()
            elapsed = time.monotonic() - started
        assert elapsed <= IO_TIMEOUT_S + TIMING_SLACK_S, f"closed after {elapsed:.2f} s"
        still_serves(served)

    def test_chunk_frame_with_missing_payload_is_cut_off(self, served):
        """A frame of a type that may carry a payload, with most of it missing, is closed within ~io_timeout."""
        with RawPeer(served.address) as peer:
            peer.greet()
            started = time.monotonic()
            peer.send(header_frame({"type": "chunk", "name": "x", "index": 0}, b"y" * 100, payload_len=5000))
            still_serves(served)
            peer.read_until_closed()
            elapsed = time.monotonic() - started
        assert elapsed <= IO_TIMEOUT_S + TIMING_SLACK_S, f"closed after {elapsed:.2f} s"
        still_serves(served)

    def test_unknown_type_with_payload_is_refused_unread(self, served):
        """A client's frame declaring a payload over the client limit gets BAD_FRAME and is closed, unread."""
        with RawPeer(served.address) as peer:
            peer.greet()
            peer.send(header_frame({"type": "teleport"}, os.urandom(MAX_CLIENT_PAYLOAD + 1)) + encode_frame(CountFiles()),
                      may_be_cut_off=True)  # the server hangs up without reading it all
            assert [ErrorCode.BAD_FRAME] == error_codes(peer.read_until_closed())
        still_serves(served)

    def test_unknown_type_without_payload_keeps_connection_usable(self, served):
        """An unknown request is answered UNKNOWN_REQUEST and the next request on the connection is answered."""
        with RawPeer(served.address) as peer:
            peer.greet()
            peer.send(header_frame({"type": "teleport"}) + encode_frame(CountFiles()))
            assert ErrorCode.UNKNOWN_REQUEST == peer.expect_error()
            assert FileCount(1, FILE_SIZE) == peer.expect(FileCount)

    def test_reply_type_declaring_a_huge_payload_is_refused_before_reading_it(self, served):
        """A peer declaring a 100 MiB manifest_info payload (no request takes one) is refused at once, not read."""
        header = {"type": "manifest_info", "name": "a", "size": 1, "chunk_size": 1024, "sha256": "0" * 64, "chunks": 1}
        with RawPeer(served.address) as peer:
            peer.greet()
            started = time.monotonic()
            peer.send(header_frame(header, payload_len=100 * 1024 * 1024))
            frames = peer.read_until_closed()
            elapsed = time.monotonic() - started
        # The server never accepts a payload on a request, so it need not buffer one: today it
        # allocates the declared 100 MiB (up to MAX_PAYLOAD_BYTES per connection, before hello) and
        # waits io_timeout for bytes that never come, then hangs up without a word.
        assert ([ErrorCode.BAD_FRAME], True) == (error_codes(frames), elapsed < IO_TIMEOUT_S / 2), (
            f"server answered {error_codes(frames)} after {elapsed:.2f} s")
        still_serves(served)


# --------------------------------------------------------------------------- bad requests, connection kept


class TestRecoverableRequests:
    def test_malformed_json_then_same_connection_answers(self, served):
        """Malformed JSON is answered BAD_REQUEST and the same connection answers the next request."""
        with RawPeer(served.address) as peer:
            peer.greet()
            body = b'{"type": "list", "search": '
            peer.send(PREFIX.pack(MAGIC, len(body), 0) + body)
            assert ErrorCode.BAD_REQUEST == peer.expect_error()
            peer.send(encode_frame(ListFiles()))
            assert [FILE_NAME] == [entry["name"] for entry in peer.expect(FileList).files]

    BAD_HEADERS = {
        "json array": (["list"], ErrorCode.BAD_REQUEST),
        "no type": ({"search": ""}, ErrorCode.BAD_REQUEST),
        "unknown type": ({"type": "teleport"}, ErrorCode.UNKNOWN_REQUEST),
        "reply type": ({"type": "ok"}, ErrorCode.UNKNOWN_REQUEST),
        "welcome sent to a server": (Welcome(1, "main", 0, "x").to_header(), ErrorCode.UNKNOWN_REQUEST),
        "missing field": ({"type": "get", "name": FILE_NAME, "index": 0}, ErrorCode.BAD_REQUEST),
        "index as string": ({"type": "get", "name": FILE_NAME, "sha256": "0" * 64, "index": "0"},
                            ErrorCode.BAD_REQUEST),
        "bool offset": ({"type": "list", "offset": True}, ErrorCode.BAD_REQUEST),
        "negative offset": ({"type": "list", "offset": -1}, ErrorCode.OUT_OF_RANGE),
        "deep nesting": (json.loads("[" * 500 + "]" * 500), ErrorCode.BAD_REQUEST),
    }

    @pytest.mark.parametrize("header, code", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
    def test_bad_request_is_answered_and_connection_kept(self, served, header, code):
        """A well-framed bad request gets an ErrorReply with its code and the connection stays usable."""
        with RawPeer(served.address) as peer:
            peer.greet()
            peer.send(header_frame(header) + encode_frame(CountFiles()))
            assert code == peer.expect_error()
            assert FileCount(1, FILE_SIZE) == peer.expect(FileCount)

    def test_very_deep_nesting_and_huge_integers(self, served):
        """A 20000-deep JSON array or a 5000-digit integer is a BAD_REQUEST, not a dead handler."""
        nested = b'{"type":"list","search":' + b"[" * 20_000 + b"]" * 20_000 + b"}"
        digits = b'{"type":"list","offset":' + b"9" * 5000 + b"}"
        with RawPeer(served.address) as peer:
            peer.greet()
            for body in (nested, digits):
                peer.send(PREFIX.pack(MAGIC, len(body), 0) + body + encode_frame(CountFiles()))
                assert ErrorCode.BAD_REQUEST == peer.expect_error()
                assert FileCount(1, FILE_SIZE) == peer.expect(FileCount)

    def test_long_unknown_type_name_still_gets_a_reply(self, served, thread_crashes):
        """An unknown type whose name fills the header still gets UNKNOWN_REQUEST (the reply must fit its own limit)."""
        with RawPeer(served.address) as peer:
            peer.greet()
            peer.send(header_frame({"type": "x" * (MAX_HEADER_BYTES - 20)}) + encode_frame(CountFiles()))
            assert ErrorCode.UNKNOWN_REQUEST == peer.expect_error()
            assert FileCount(1, FILE_SIZE) == peer.expect(FileCount)
        assert [] == crash_summary(thread_crashes)

    def test_long_bad_name_still_gets_a_reply(self, served, thread_crashes):
        """A 60 KB name of non-printable characters still gets BAD_NAME, though its repr is far longer."""
        with RawPeer(served.address) as peer:
            peer.greet()
            peer.send(header_frame({"type": "manifest", "name": "\x85" * 30_000}) + encode_frame(CountFiles()))
            assert ErrorCode.BAD_NAME == peer.expect_error()
            assert FileCount(1, FILE_SIZE) == peer.expect(FileCount)
        assert [] == crash_summary(thread_crashes)

    def test_lone_surrogate_in_search_is_a_bad_request(self, served):
        """A search holding a lone UTF-16 surrogate (valid JSON, not valid Unicode) is BAD_REQUEST, not INTERNAL."""
        with RawPeer(served.address) as peer:
            peer.greet()
            body = b'{"type":"list","search":"\\ud800"}'
            peer.send(PREFIX.pack(MAGIC, len(body), 0) + body + encode_frame(CountFiles()))
            assert ErrorCode.BAD_REQUEST == peer.expect_error()
            assert FileCount(1, FILE_SIZE) == peer.expect(FileCount)


class TestHandshake:
    REQUESTS = [ListFiles(), CountFiles(), GetStatus(), GetManifest(FILE_NAME), GetChunk(FILE_NAME, "0" * 64, 0)]

    def test_requests_before_hello_get_hello_required(self, served):
        """Every request before hello is answered HELLO_REQUIRED; hello then works on the same connection."""
        with RawPeer(served.address) as peer:
            peer.send(b"".join(encode_frame(request) for request in self.REQUESTS))
            assert [ErrorCode.HELLO_REQUIRED] * len(self.REQUESTS) == error_codes(peer.frames(len(self.REQUESTS)))
            peer.greet()
            peer.send(encode_frame(CountFiles()))
            assert FileCount(1, FILE_SIZE) == peer.expect(FileCount)

    def test_welcome_reports_version_role_epoch_and_server_id(self, served):
        """A client's Welcome names the version, the "main" server, its "active" role, epoch, id and a challenge."""
        with RawPeer(served.address) as peer:
            welcome = peer.greet()
        assert served.engine.server.welcome(welcome.nonce) == welcome  # the nonce: its challenge to identify
        assert 32 == len(welcome.nonce)
        assert (PROTOCOL_VERSION, "main", "active") == (welcome.version, welcome.server, welcome.role)

    @pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, -1, 2**40])
    def test_wrong_version_gets_version_mismatch_and_close(self, served, version):
        """A hello with another protocol version is answered VERSION_MISMATCH and the connection closed."""
        with RawPeer(served.address) as peer:
            peer.send(encode_frame(Hello(version, "client")))
            assert [ErrorCode.VERSION_MISMATCH] == error_codes(peer.read_until_closed())
        still_serves(served)


class TestChunkRequests:
    def test_valid_chunks_verify(self, served):
        """Every chunk served, the short last one included, verifies against the manifest."""
        with RawPeer(served.address) as peer:
            peer.greet()
            count = served.manifest.chunk_count
            peer.send(b"".join(encode_frame(GetChunk(FILE_NAME, served.manifest.sha256, i)) for i in range(count)))
            frames = peer.frames(count)
        assert [ChunkData(FILE_NAME, i) for i in range(count)] == [f.message for f in frames]
        assert all(served.manifest.verify_chunk(i, f.payload) for i, f in enumerate(frames))
        assert served.source.read_bytes() == b"".join(bytes(f.payload) for f in frames)

    def test_bad_chunk_requests_get_their_codes_and_connection_stays(self, served):
        """Out-of-range and negative indexes, a stale sha256 and an unknown name get their codes; then a chunk is served."""
        sha = served.manifest.sha256
        count = served.manifest.chunk_count
        requests = [
            (get_chunk_frame(FILE_NAME, sha, count), ErrorCode.OUT_OF_RANGE),
            (get_chunk_frame(FILE_NAME, sha, 2**62), ErrorCode.OUT_OF_RANGE),
            (get_chunk_frame(FILE_NAME, sha, -1), ErrorCode.OUT_OF_RANGE),
            (get_chunk_frame(FILE_NAME, "f" * 64, 0), ErrorCode.STALE_VERSION),
            (get_chunk_frame(FILE_NAME, "", 0), ErrorCode.STALE_VERSION),
            (get_chunk_frame("no such file.bin", sha, 0), ErrorCode.NOT_FOUND),
            (encode_frame(GetManifest("no such file.bin")), ErrorCode.NOT_FOUND),
            (encode_frame(GetChunk(FILE_NAME, sha, 3)), "chunk"),
        ]
        with RawPeer(served.address) as peer:
            peer.greet()
            peer.send(b"".join(frame for frame, _ in requests))
            frames = peer.frames(len(requests))
        assert [code for _, code in requests] == error_codes(frames)
        assert served.manifest.verify_chunk(3, frames[-1].payload)

    BAD_NAMES = {
        "parent": "../" + FILE_NAME,
        "parent of store": "../catalog.db",
        "empty component": "a//b",
        "parent inside a path": "a/../../" + FILE_NAME,
        "backslash": "..\\x",
        "nul": FILE_NAME + "\x00",
        "absolute": "/etc/passwd",
        "dotdot": "..",
        "empty": "",
        "too long": "a" * 256,
    }

    @pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
    def test_unsafe_names_get_bad_name(self, served, name):
        """GetManifest, GetChunk and downloaded with an unsafe name get BAD_NAME; the connection stays usable."""
        requests = [
            header_frame({"type": "manifest", "name": name}),
            get_chunk_frame(name, served.manifest.sha256, 0),
            header_frame({"type": "downloaded", "name": name, "sha256": served.manifest.sha256}),
        ]
        with RawPeer(served.address) as peer:
            peer.greet()
            peer.send(b"".join(requests) + encode_frame(CountFiles()))
            assert [ErrorCode.BAD_NAME] * 3 + ["file_count"] == error_codes(peer.frames(4))


class TestPipelining:
    def test_twenty_chunk_requests_in_one_write(self, served):
        """20 GetChunk requests sent in one write get 20 replies, in order, each verifying."""
        indexes = [(7 * i) % served.manifest.chunk_count for i in range(20)]
        requests = [GetChunk(FILE_NAME, served.manifest.sha256, i) for i in indexes]
        session = ServerSession.open(*served.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        try:
            session.connection.send_many(requests)
            frames = [session.receive(ChunkData) for _ in requests]
        finally:
            session.close()
        assert indexes == [frame.message.index for frame in frames]
        assert [True] * 20 == [served.manifest.verify_chunk(i, f.payload) for i, f in zip(indexes, frames)]

    def test_errors_keep_their_place_in_a_pipeline(self, served):
        """A failing request in the middle of a pipeline is answered in its place."""
        sha = served.manifest.sha256
        with RawPeer(served.address) as peer:
            peer.greet()
            peer.send(encode_frame(GetChunk(FILE_NAME, sha, 0)) + get_chunk_frame(FILE_NAME, sha, 10**6)
                      + encode_frame(GetChunk(FILE_NAME, sha, 1)))
            frames = peer.frames(3)
        assert ["chunk", ErrorCode.OUT_OF_RANGE, "chunk"] == error_codes(frames)
        assert [0, 1] == [frames[0].message.index, frames[2].message.index]


class TestServerCopyDamaged:
    def test_changed_bytes_are_served_and_rejected_by_the_client(self, served):
        """After the stored bytes change, the server serves them as they are and only that chunk fails verification."""
        changed = 5
        served.blob.chmod(0o644)
        with open(served.blob, "r+b") as blob:
            blob.seek(changed * CHUNK_SIZE + 17)
            original = blob.read(1)
            blob.seek(-1, os.SEEK_CUR)
            blob.write(bytes([original[0] ^ 0xFF]))
        on_disk = served.blob.read_bytes()
        count = served.manifest.chunk_count
        with RawPeer(served.address) as peer:
            peer.greet()
            peer.send(b"".join(encode_frame(GetChunk(FILE_NAME, served.manifest.sha256, i)) for i in range(count)))
            frames = peer.frames(count)
        assert on_disk == b"".join(bytes(f.payload) for f in frames)
        assert [i for i, f in enumerate(frames) if not served.manifest.verify_chunk(i, f.payload)] == [changed]

    def test_truncated_copy_gets_storage_error_and_server_keeps_serving(self, served):
        """Chunks past the end of a truncated stored copy get STORAGE_ERROR; whole chunks are still served."""
        served.blob.chmod(0o644)
        os.truncate(served.blob, 2 * CHUNK_SIZE + 100)
        sha = served.manifest.sha256
        with RawPeer(served.address) as peer:
            peer.greet()
            peer.send(b"".join(encode_frame(GetChunk(FILE_NAME, sha, i)) for i in (0, 1, 2, 9, 1))
                      + encode_frame(CountFiles()))
            frames = peer.frames(6)
        expected = ["chunk", "chunk", ErrorCode.STORAGE_ERROR, ErrorCode.STORAGE_ERROR, "chunk", "file_count"]
        assert expected == error_codes(frames)
        assert served.manifest.verify_chunk(1, frames[4].payload)
        still_serves(served, index=0)

    def test_missing_copy_gets_storage_error(self, served):
        """A stored copy deleted behind the server's back gets STORAGE_ERROR, and the connection stays usable."""
        served.blob.unlink()
        with RawPeer(served.address) as peer:
            peer.greet()
            peer.send(encode_frame(GetChunk(FILE_NAME, served.manifest.sha256, 0)) + encode_frame(CountFiles()))
            assert [ErrorCode.STORAGE_ERROR, "file_count"] == error_codes(peer.frames(2))


class TestTimeoutsAndLimits:
    def test_silent_client_is_timed_out_while_another_is_served(self, served):
        """A client that connects and sends nothing is closed after idle_timeout; another is served meanwhile."""
        with RawPeer(served.address) as silent:
            started = time.monotonic()
            still_serves(served)
            assert [] == silent.read_until_closed()
            elapsed = time.monotonic() - started
        assert IDLE_TIMEOUT_S * 0.8 <= elapsed <= IDLE_TIMEOUT_S + TIMING_SLACK_S, f"closed after {elapsed:.2f} s"
        wait_until(lambda: no_connections(served), what="the silent client's handler to end")

    def test_idle_greeted_client_is_timed_out(self, served):
        """A greeted client that goes quiet between requests is closed after idle_timeout."""
        with RawPeer(served.address) as peer:
            peer.greet()
            close_within(peer, IDLE_TIMEOUT_S * 0.8, IDLE_TIMEOUT_S + TIMING_SLACK_S)

    def test_max_connections_turns_away_with_busy(self, start_served):
        """With max_connections 2, a third connection gets BUSY and is closed; once one leaves, a new one is served."""
        served = start_served({"transfer": {**PATIENT["transfer"], "max_connections": 2}})
        served.engine.server.shed_idle_after_s = SHORT_TIMEOUT  # the held sessions count as busy here
        served.engine.server.hello_wait_s = 0.1  # a hello waits for a slot only briefly
        wait_until(lambda: no_connections(served), what="the fixture's session to be released")
        first = ServerSession.open(*served.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        second = ServerSession.open(*served.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        try:
            with RawPeer(served.address) as third:
                third.send(HELLO, may_be_cut_off=True)
                assert [ErrorCode.BUSY] == error_codes(third.read_until_closed())
            assert FileCount(1, FILE_SIZE) == second.call(CountFiles(), FileCount).message  # held ones still work
            first.close()

            def try_open() -> ServerSession | None:
                try:
                    return ServerSession.open(*served.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
                except ConnectionFailed:
                    return None

            replacement = wait_until(try_open, what="a free connection slot")
            try:
                assert [FILE_NAME] == [e["name"] for e in replacement.call(ListFiles(), FileList).message.files]
            finally:
                replacement.close()
        finally:
            first.close()
            second.close()

    def test_busy_connections_are_not_counted_as_served(self, start_served):
        """A turned-away connection does not take a slot: the held sessions keep their places."""
        served = start_served({"transfer": {**PATIENT["transfer"], "max_connections": 1}})
        served.engine.server.shed_idle_after_s = SHORT_TIMEOUT  # the held session counts as busy here
        served.engine.server.hello_wait_s = 0.1  # a hello waits for a slot only briefly
        wait_until(lambda: no_connections(served), what="the fixture's session to be released")
        held = ServerSession.open(*served.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        try:
            for _ in range(5):
                with RawPeer(served.address) as turned_away:
                    turned_away.send(HELLO, may_be_cut_off=True)
                    assert [ErrorCode.BUSY] == error_codes(turned_away.read_until_closed())
            wait_until(lambda: 1 == served.engine.metrics.active_connections, what="only the held session to remain")
            assert FileCount(1, FILE_SIZE) == held.call(CountFiles(), FileCount).message
        finally:
            held.close()


def open_from(address: tuple[str, int], source_host: str) -> socket.socket:
    """A TCP connection to ``address`` from ``source_host`` (any 127.x.y.z: loopback answers them all)."""
    return socket.create_connection(address, timeout=SHORT_TIMEOUT, source_address=(source_host, 0))


def served_now(served: Served, source_host: str = "127.0.0.1") -> bool:
    """True if a client from ``source_host`` is greeted and gets a listing now."""
    try:
        with RawPeer.from_socket(open_from(served.address, source_host)) as peer:
            peer.send(HELLO + encode_frame(ListFiles()), may_be_cut_off=True)
            frames = peer.frames(2)
    except (AssertionError, OSError):
        return False
    return ["welcome", "files"] == error_codes(frames)


class Hogs:
    """``count`` connections from one address that keep sending frames (a stranger holding slots)."""

    def __init__(self, served: Served, count: int, source_host: str, *, greet: bool, every_s: float) -> None:
        self.peers = [RawPeer.from_socket(open_from(served.address, source_host)) for _ in range(count)]
        self.frame = encode_frame(CountFiles())
        self.every_s = every_s
        self._stop = threading.Event()
        for peer in self.peers:
            peer.send(HELLO if greet else self.frame)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for peer in self.peers:
                peer.send(self.frame, may_be_cut_off=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(SHORT_TIMEOUT)
        for peer in self.peers:
            peer.close()


class TestFairSlots:
    @pytest.mark.parametrize("greet", [False, True], ids=["no hello", "greeted"])
    def test_fourteen_busy_connections_from_one_address_do_not_lock_out_another(self, start_served, greet):
        """Fourteen connections from 127.0.0.2 sending a frame every 0.3 s leave room for a client from 127.0.0.1."""
        served = start_served({"transfer": {**PATIENT["transfer"]}})  # default max_connections: 10
        hogs = Hogs(served, 14, "127.0.0.2", greet=greet, every_s=0.3)
        try:
            assert True is served_now(served)
            assert True is served_now(served)  # and again: the slots do not drift back to the hogs
        finally:
            hogs.close()

    def test_fourteen_idle_connections_from_the_same_address_give_way(self, start_served):
        """Fourteen greeted, idle connections from the client's own address give way once idle for a second."""
        served = start_served({"transfer": {**PATIENT["transfer"]}})
        hogs = Hogs(served, 14, "127.0.0.1", greet=True, every_s=SHORT_TIMEOUT * 10)
        try:
            started = time.monotonic()
            wait_until(lambda: served_now(served), what="a slot for the newcomer")
            elapsed = time.monotonic() - started
            assert elapsed <= served.engine.server.shed_idle_after_s + TIMING_SLACK_S, f"served after {elapsed:.2f} s"
        finally:
            hogs.close()

    def test_a_hello_waits_briefly_for_a_slot_given_back(self, start_served):
        """A hello finding the only slot taken gets it, not BUSY, when its holder leaves within hello_wait_s."""
        served = start_served({"transfer": {**PATIENT["transfer"], "max_connections": 1}})
        served.engine.server.shed_idle_after_s = SHORT_TIMEOUT  # the holder is not shed: it must leave
        wait_until(lambda: no_connections(served), what="the fixture's session to be released")
        holder = ServerSession.open(*served.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        threading.Timer(0.3, holder.close).start()
        with RawPeer(served.address) as waiting:
            waiting.send(HELLO)
            assert "active" == waiting.expect(Welcome).role

    def test_connections_answering_a_request_are_never_shed(self):
        """choose_idle_victim passes over connections in a request, and prefers the biggest holder's oldest idle one."""
        from minitorrent.net.serving import ConnectionState, choose_idle_victim

        @dataclass
        class Fake:
            source: str
            state: ConnectionState
            idle_s: float

            def idle_for(self, now: float) -> float:
                return self.idle_s

        busy = [Fake("10.0.0.1", ConnectionState.GREETED, 0.0) for _ in range(3)]
        assert None is choose_idle_victim(busy, "10.0.0.2", 0.0)
        recent = Fake("10.0.0.1", ConnectionState.GREETED, 0.1)
        assert recent is choose_idle_victim([*busy, recent], "10.0.0.2", 0.0)  # over its fair share
        assert None is choose_idle_victim([*busy, recent], "10.0.0.1", 0.0)  # same address: only idle ones go
        old_idle = Fake("10.0.0.1", ConnectionState.GREETED, 5.0)
        unready = Fake("10.0.0.1", ConnectionState.NEW, 2.0)
        other = Fake("10.0.0.3", ConnectionState.NEW, 9.0)
        assert unready is choose_idle_victim([*busy, old_idle, unready, other], "10.0.0.1", 0.0)

    def test_peer_slots_are_given_only_after_authentication(self, tmp_path):
        """Strangers claiming to be the peer cannot keep a full backup from its real peer: they must prove it in time."""
        from minitorrent.net.remote import ServerSession as Session

        config = make_config(tmp_path / "backup", {"server": {"secret": "s" * 32, "backup": {
            "heartbeat_interval": 1, "heartbeat_timeout": 60}},
            "transfer": {**FAST["transfer"], "idle_timeout": SHORT_TIMEOUT, "max_connections": 2}})
        engine = BackupServer(config)
        address = engine.start()
        engine.server.shed_idle_after_s = SHORT_TIMEOUT  # nothing is shed for being idle here
        holders = [ServerSession.open(*address, io_timeout_s=SHORT_TIMEOUT, secure=TLS) for _ in range(2)]
        claims = [RawPeer(address) for _ in range(engine.server.handshake_room)]
        try:
            for claim in claims:
                claim.send(encode_frame(Hello(PROTOCOL_VERSION, "main", "x", 0, "n" * 32)))
                claim.expect(Welcome)
            started = time.monotonic()

            def peer_link() -> Session | None:
                try:
                    return Session.open(*address, io_timeout_s=SHORT_TIMEOUT, secret="s" * 32, secure=TLS)
                except ConnectionFailed:
                    return None

            peer = wait_until(peer_link, what="the real peer to get in")
            elapsed = time.monotonic() - started
            assert elapsed <= IO_TIMEOUT_S + TIMING_SLACK_S, f"the peer got in after {elapsed:.2f} s"
            for claim in claims:
                claim.read_until_closed()
            assert [True] * len(claims) == [claim.closed_by_server for claim in claims]
            assert "inventory_info" == peer.call(protocol.GetInventory(), protocol.Inventory).message.TYPE
            assert ["backup"] * 2 == [h.call(GetStatus(), StatusInfo).message.metrics["server"] for h in holders]
            peer.close()
        finally:
            for connection in [*holders, *claims]:
                connection.close()
            engine.stop()


class TestHandshakeDeadline:
    def test_silent_connection_is_closed_at_the_handshake_deadline(self, start_served):
        """A connection that never says hello is closed after io_timeout, not the (long) idle_timeout."""
        served = start_served({"transfer": {**FAST["transfer"], "idle_timeout": SHORT_TIMEOUT}})
        with RawPeer(served.address) as silent:
            close_within(silent, IO_TIMEOUT_S * 0.8, IO_TIMEOUT_S + TIMING_SLACK_S)

    def test_frames_without_hello_do_not_extend_the_handshake_deadline(self, start_served):
        """A connection sending request after request but never hello is closed at the handshake deadline."""
        served = start_served({"transfer": {**FAST["transfer"], "idle_timeout": SHORT_TIMEOUT}})
        with RawPeer(served.address) as peer:
            started = time.monotonic()
            while time.monotonic() - started < IO_TIMEOUT_S + TIMING_SLACK_S and not peer.closed_by_server:
                peer.send(encode_frame(CountFiles()), may_be_cut_off=True)
                peer.frames_until(ErrorReply)
            elapsed = time.monotonic() - started
            assert (True, True) == (peer.closed_by_server, elapsed <= IO_TIMEOUT_S + TIMING_SLACK_S), (
                f"still open after {elapsed:.2f} s")

    def test_greeted_connection_waits_the_idle_timeout(self, start_served):
        """Once greeted, a connection may stay quiet for idle_timeout, longer than the handshake deadline."""
        served = start_served({"transfer": {**FAST["transfer"], "idle_timeout": 3 * IO_TIMEOUT_S}})
        with RawPeer(served.address) as peer:
            peer.greet()
            close_within(peer, 3 * IO_TIMEOUT_S * 0.8, 3 * IO_TIMEOUT_S + TIMING_SLACK_S)


class TestConnectionStates:
    def test_states_move_new_greeted_authenticated(self, tmp_path):
        """A peer connection goes NEW -> GREETED -> AUTHENTICATED as it says hello and proves the secret."""
        from minitorrent.net.remote import ServerSession as Session
        from minitorrent.net.serving import ConnectionState

        config = make_config(tmp_path / "backup", {"server": {"secret": "s" * 32, "backup": {
            "heartbeat_interval": 1, "heartbeat_timeout": 60}}, "transfer": PATIENT["transfer"]})
        engine = BackupServer(config)
        address = engine.start()
        try:
            seen: list[ConnectionState] = []
            with RawPeer(address):
                wait_until(lambda: engine.server.connection_states(), what="the connection to be handled")
                seen += engine.server.connection_states()
            wait_until(lambda: not engine.server.connection_states(), what="the raw connection to end")
            client = ServerSession.open(*address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
            seen += engine.server.connection_states()
            client.close()
            wait_until(lambda: not engine.server.connection_states(), what="the client to leave")
            peer = Session.open(*address, io_timeout_s=SHORT_TIMEOUT, secret="s" * 32, secure=TLS)
            seen += engine.server.connection_states()
            peer.close()
            assert [ConnectionState.NEW, ConnectionState.GREETED, ConnectionState.AUTHENTICATED] == seen
        finally:
            engine.stop()


def hello_claiming(epoch: int, **proof: str) -> bytes:
    """A client hello claiming ``epoch`` (with whatever proof fields are given), built by hand."""
    return header_frame({"type": "hello", "version": PROTOCOL_VERSION, "role": "client", "epoch": epoch, **proof})


CLUSTER_SECRET = "a cluster secret for the epoch tests"


@pytest.fixture
def pair_in_process(tmp_path) -> Iterator[tuple[MainServer, BackupServer]]:
    """A main and a backup in this process, replicating, the main active."""
    from minitorrent.common.launcher import free_port

    backup_port = free_port()
    settings = {"server": {"secret": CLUSTER_SECRET, "backup": {"port": backup_port, "heartbeat_interval": 0.2,
                                                                 "heartbeat_timeout": 3}},
                "transfer": PATIENT["transfer"]}
    backup = BackupServer(make_config(tmp_path / "b", settings))
    backup.start()
    main = MainServer(make_config(tmp_path / "m", settings))
    main.start()
    try:
        wait_until(lambda: main.node.is_active() and 0 < backup.node.epoch == main.node.epoch,
                   what="the main to be active and the backup to follow it")
        yield main, backup
    finally:
        main.stop()
        backup.stop()


class TestEpochClaims:
    def test_one_hello_with_the_last_epoch_changes_nothing(self, served):
        """A stranger's hello claiming epoch 2**63-1 leaves a main serving alone active at its own epoch."""
        node = served.engine.node
        before = (node.role.value, node.epoch, node.highest_seen_epoch)
        with RawPeer(served.address) as peer:
            peer.send(hello_claiming(protocol.MAX_EPOCH))
            assert "active" == peer.expect(Welcome).role
        assert before == (node.role.value, node.epoch, node.highest_seen_epoch)
        still_serves(served)

    def test_a_stream_of_higher_epochs_leaves_the_main_active(self, pair_in_process):
        """Hellos claiming epoch+1 over and over (with forged proofs) never take the main off active duty."""
        main, backup = pair_in_process
        events: list = []
        main.node.listeners.insert(0, events.append)
        epoch = main.node.epoch
        for claimed in range(epoch + 1, epoch + 21):
            with RawPeer(main.server.address) as peer:
                peer.send(hello_claiming(claimed, epoch_server=backup.node.server_id, epoch_proof="ab" * 32))
                assert ("active", epoch) == (peer.expect(Welcome).role, main.node.epoch)
                peer.send(encode_frame(CountFiles()))
                assert FileCount(0, 0) == peer.expect(FileCount)
        assert ([], "active", "standby") == (events, main.node.role.value, backup.node.role.value)

    def test_a_replayed_proof_does_not_prove_another_epoch(self, pair_in_process):
        """The main's real proof for its epoch, relayed with epoch+1, proves nothing."""
        main, _ = pair_in_process
        welcome = ServerSession.open(*main.server.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        welcome.close()
        real = welcome.welcome
        with RawPeer(main.server.address) as peer:
            peer.send(hello_claiming(real.epoch + 1, epoch_server=real.server_id, epoch_proof=real.epoch_proof))
            assert "active" == peer.expect(Welcome).role
        assert ("active", real.epoch) == (main.node.role.value, main.node.epoch)

    def test_a_standby_is_not_poisoned(self, pair_in_process):
        """A standby backup told epoch 2**63-1 by a stranger still promotes to its own next epoch."""
        main, backup = pair_in_process
        epoch = backup.node.epoch
        with RawPeer(backup.server.address) as peer:
            peer.send(hello_claiming(protocol.MAX_EPOCH))
            assert "standby" == peer.expect(Welcome).role
        main.stop()  # the backup must be able to take over as usual
        assert epoch + 1 == backup.promote_now()

    def test_a_proven_epoch_is_followed(self, pair_in_process):
        """A proof made with the cluster secret (as the backup would after a failover) makes the main step down."""
        from minitorrent.net.remote import EpochClaim
        from minitorrent.wire import auth

        main, backup = pair_in_process
        events: list = []
        main.node.listeners.insert(0, events.append)
        newer = main.node.epoch + 1
        claim = EpochClaim(newer, backup.node.server_id, auth.prove_epoch(CLUSTER_SECRET, newer, backup.node.server_id))
        ServerSession.open(*main.server.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS, claim=claim).close()
        assert "standby" == events[0].role.value  # what it does next (catch up from the backup) is failover's business


class TestStatus:
    def test_status_reports_role_and_moving_counters(self, served):
        """A status request names the "main" server and its "active" role, and its byte and request counters moved."""
        session = ServerSession.open(*served.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        try:
            before = session.call(GetStatus(), StatusInfo).message.metrics
            session.call(GetChunk(FILE_NAME, served.manifest.sha256, 0), ChunkData)
            after = session.call(GetStatus(), StatusInfo).message.metrics
        finally:
            session.close()
        welcome = served.engine.server.welcome()
        assert ("main", "active", welcome.epoch, welcome.server_id) == (
            after["server"], after["role"], after["epoch"], after["server_id"])
        assert after["bytes_sent"] >= before["bytes_sent"] + CHUNK_SIZE
        assert after["bytes_received"] > before["bytes_received"] > 0
        assert after["requests_total"] >= before["requests_total"] + 2
        assert after["connections_total"] >= 1 and after["active_connections"] >= 1

    def test_failed_requests_are_counted(self, served):
        """An error reply counts as a failed request in the status metrics."""
        with RawPeer(served.address) as peer:
            peer.greet()
            peer.send(encode_frame(GetManifest("no such file.bin")) + encode_frame(GetStatus()))
            assert ErrorCode.NOT_FOUND == peer.expect_error()
            assert peer.expect(StatusInfo).metrics["requests_failed"] >= 1

    def test_status_fits_with_many_files(self, served):
        """The status reply still fits in one header when thousands of files have download counts."""
        served.engine.metrics.set_downloads({f"{i:05d} {'long file name ' * 4}.bin": i for i in range(2000)})
        session = ServerSession.open(*served.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        try:
            metrics = session.call(GetStatus(), StatusInfo).message.metrics
        finally:
            session.close()
        assert ("main", "active") == (metrics["server"], metrics["role"])


class TestListing:
    def test_listing_pages_fit_with_long_names(self, start_served, tmp_path):
        """250 files with the longest file names (246 bytes) can be listed: every page fits under MAX_HEADER_BYTES."""
        served = start_served(PATIENT)
        names = [f"{i:03d}" + '"' * (protocol.MAX_FILE_NAME_BYTES - 3) for i in range(250)]
        for name in names:
            served.engine.add_file(make_file(tmp_path / "many" / name, 1, seed=len(name)))
        session = ServerSession.open(*served.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        try:
            listed: list[str] = []
            while True:
                page = session.call(ListFiles("", len(listed)), FileList).message
                listed += [entry["name"] for entry in page.files]
                if not page.files or len(listed) >= page.total:
                    break
        finally:
            session.close()
        assert sorted(names + [FILE_NAME]) == sorted(listed)

    def test_a_folder_listing_without_counts(self, start_served, tmp_path):
        """A ``list`` with ``counts`` false gets every entry's downloads as 0; with counts, the real ones."""
        served = start_served(PATIENT)
        for i in range(3):
            make_file(tmp_path / "photos" / f"{i}.bin", 10, seed=i)
        served.engine.add_folder(tmp_path / "photos")
        session = ServerSession.open(*served.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        try:
            sha256 = sha256_file(tmp_path / "photos" / "1.bin")
            session.call(protocol.ReportDownloaded("photos/1.bin", sha256), protocol.Ok)
            pages = [session.call(ListFiles("photos/", limit=10, under="photos/", layout=protocol.LIST_LAYOUT_PACKED,
                                            counts=counts), FileList) for counts in (True, False)]
        finally:
            session.close()
        assert [[0, 1, 0], [0, 0, 0]] == [
            [entry["downloads"] for entry in protocol.decode_list_page(frame.payload, frame.message.layout,
                                                                       frame.message.entries)] for frame in pages]


class TestStop:
    def test_stop_returns_promptly_with_idle_clients(self, tmp_path):
        """engine.stop() returns at once while a greeted client and a silent one are connected and idle."""
        engine = MainServer(make_config(tmp_path / "srv", PATIENT))
        engine.start()
        try:
            served = serve_one_file(engine, tmp_path)
            greeted = ServerSession.open(*served.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
            silent = RawPeer(served.address)
            wait_until(lambda: 2 == engine.metrics.active_connections, what="both clients to be served")
            started = time.monotonic()
            engine.stop()
            elapsed = time.monotonic() - started
            assert elapsed < 2.0, f"stop took {elapsed:.2f} s"
            assert [] == silent.read_until_closed()
            silent.close()
            greeted.close()
            with pytest.raises(OSError):
                socket.create_connection(served.address, timeout=SHORT_TIMEOUT).close()
        finally:
            engine.stop()


# --------------------------------------------------------------------------- fuzzing the live server


class BackgroundDownloader:
    """A well-behaved client downloading and verifying chunks in a loop on its own thread."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.errors: list[str] = []
        self.chunks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="background-downloader", daemon=True)

    def __enter__(self) -> BackgroundDownloader:
        self._thread.start()
        wait_until(lambda: self.chunks or self.errors, what="the first background chunk")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(SHORT_TIMEOUT)

    def _run(self) -> None:
        manifest = self.served.manifest
        try:
            session = ServerSession.open(*self.served.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
            try:
                while not self._stop.is_set():
                    index = self.chunks % manifest.chunk_count
                    frame = session.call(GetChunk(FILE_NAME, manifest.sha256, index), ChunkData)
                    if not manifest.verify_chunk(index, frame.payload):
                        self.errors.append(f"chunk {index} failed verification")
                    self.chunks += 1
                    self._stop.wait(0.002)  # a steady trickle, not a busy loop that starves the fuzzer
            finally:
                session.close()
        except Exception as error:  # reported to the test thread
            self.errors.append(f"{type(error).__name__}: {error}")


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory) -> Iterator[Served]:
    """One server for a whole fuzz run (hypothesis examples must not each start one)."""
    folder = tmp_path_factory.mktemp("fuzz")
    overrides = {"transfer": {"chunk_size": CHUNK_SIZE, "idle_timeout": SHORT_TIMEOUT,
                              "io_timeout": SHORT_TIMEOUT, "max_connections": 50}}
    engine = MainServer(make_config(folder / "srv", overrides))
    engine.start()
    try:
        yield serve_one_file(engine, folder)
    finally:
        engine.stop()


def send_and_drain(served: Served, data: bytes) -> list[Frame]:
    """Send ``data`` on a fresh connection, half-close, and decode every reply until the server closes."""
    with RawPeer(served.address) as peer:
        peer.send(data, may_be_cut_off=True)  # the server may hang up on a broken frame first
        peer.finish_sending()
        try:
            return peer.read_until_closed()
        except ProtocolError as error:
            raise AssertionError(f"the server sent a bad frame: {error}") from error


def check_replies(frames: list[Frame]) -> None:
    for frame in frames:
        message = frame.message
        assert isinstance(message, (ErrorReply, Welcome, FileList, ManifestInfo, FileCount, ChunkData,
                                    StatusInfo, protocol.Ok)), message
        if isinstance(message, ErrorReply):
            assert ErrorCode.INTERNAL != message.code, message.message


json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**66), max_value=2**66), st.floats(allow_nan=False),
    st.text(max_size=20), st.sampled_from(["", "..", "../x", "/etc/passwd", "a\\b", "a\x00b", FILE_NAME, "0" * 64]),
)
json_values = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=5)
REQUEST_TYPES = ["hello", "list", "manifest", "count", "get", "downloaded", "status", "ok", "chunk", "teleport",
                 "auth", "heartbeat", "inventory", "replicate", "replicate_chunk", "remove", "update", "handover"]
# No "epoch": a hello reporting a higher epoch makes the server step down by design (DESIGN.md,
# principle 4), after which STANDBY replies are correct, not a fault the fuzzer should report.
FIELDS = ["version", "role", "agent", "nonce", "proof", "search", "offset", "name", "sha256", "index", "files",
          "total"]


@st.composite
def fuzz_frames(draw) -> bytes:
    header = draw(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4))
    header["type"] = draw(st.one_of(st.sampled_from(REQUEST_TYPES), json_values))
    body = json.dumps(header).encode()
    payload = draw(st.binary(max_size=32))
    payload_len = draw(st.sampled_from([len(payload)] * 5 + [0, 4096, 2**40]))
    header_len = draw(st.sampled_from([len(body)] * 8 + [0, len(body) + 3]))
    return PREFIX.pack(MAGIC, header_len, payload_len) + body + payload


class TestFuzzLiveServer:
    def test_random_bytes_never_hurt_other_clients(self, fuzz_target, thread_crashes):
        """Random bytes on fresh connections get only protocol replies; the server keeps serving everyone."""
        with BackgroundDownloader(fuzz_target) as downloader:
            @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
            @given(data=st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: MAGIC + b),
                                  st.binary(max_size=300).map(lambda b: HELLO + b)))
            def fuzz(data: bytes) -> None:
                check_replies(send_and_drain(fuzz_target, data))
                still_serves(fuzz_target)

            fuzz()
        assert ([], []) == (downloader.errors, crash_summary(thread_crashes))
        assert downloader.chunks > 0

    def test_random_frames_never_hurt_other_clients(self, fuzz_target, thread_crashes):
        """Random well-framed requests get only protocol replies; the server keeps serving everyone."""
        with BackgroundDownloader(fuzz_target) as downloader:
            @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
            @given(frames=st.lists(fuzz_frames(), min_size=1, max_size=5), greet=st.booleans())
            def fuzz(frames: list[bytes], greet: bool) -> None:
                check_replies(send_and_drain(fuzz_target, (HELLO if greet else b"") + b"".join(frames)))
                still_serves(fuzz_target)

            fuzz()
        assert ([], []) == (downloader.errors, crash_summary(thread_crashes))
        assert downloader.chunks > 0


class TestGetFiles:
    @pytest.fixture
    def small(self, tmp_path):
        """A main sharing three small files; yields (engine, {name: bytes})."""
        engine = MainServer(make_config(tmp_path / "srv"))
        engine.start()
        contents = {f"tree/f{i}.txt": bytes([65 + i]) * (100 + i) for i in range(3)}
        for name, data in contents.items():
            path = tmp_path / "src" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        engine.add_folder(tmp_path / "src" / "tree")
        yield engine, contents
        engine.stop()

    def ask(self, engine, request, reply=protocol.FilesData, payload: bytes = b""):
        """``request`` (with ``payload``) over a session of its own; its ``reply`` frame."""
        session = ServerSession.open(*engine.server.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        try:
            return session.call(request, reply, payload)
        finally:
            session.close()

    def test_several_files_in_one_reply(self, small):
        """get_files answers the files' bytes back to back, with their sizes, in the order asked."""
        engine, contents = small
        names = sorted(contents, reverse=True)
        shas = [engine.catalog.db.get_file(n).sha256 for n in names]
        frame = self.ask(engine, protocol.GetFiles(names, shas))
        assert ([len(contents[n]) for n in names], b"".join(contents[n] for n in names)) == \
            (frame.message.sizes, bytes(frame.payload))

    def test_unknown_and_stale_files_keep_their_place(self, small):
        """A file not shared, or asked as another version, gets size -1 and its code; the others still come."""
        engine, contents = small
        good = "tree/f1.txt"
        sha = engine.catalog.db.get_file(good).sha256
        frame = self.ask(engine, protocol.GetFiles(["tree/nothing.txt", good, "tree/f2.txt"], [sha, sha, sha]))
        assert ([-1, 101, -1], ["NOT_FOUND", "", "STALE_VERSION"], contents[good]) == \
            (frame.message.sizes, frame.message.errors, bytes(frame.payload))

    def test_counts_in_one_request(self, small):
        """downloaded_many counts each named file once; a wrong version is not counted."""
        engine, contents = small
        names = sorted(contents)
        shas = [engine.catalog.db.get_file(n).sha256 for n in names]
        self.ask(engine, protocol.ReportDownloadedMany(names, shas[:2] + [shas[0]]), protocol.Ok)
        assert {names[0]: 1, names[1]: 1, names[2]: 0} == engine.catalog.download_counts()

    def test_a_batch_named_in_the_payload_is_answered_like_get_files(self, small):
        """get_batch (names in the payload) gets the same files_data as get_files: unknown and stale files keep their place."""
        engine, contents = small
        names = ["tree/nothing.txt", "tree/f1.txt", "tree/f2.txt", "../not a name"]
        sha = engine.catalog.db.get_file("tree/f1.txt").sha256
        frame = self.ask(engine, protocol.GetBatch(), payload=protocol.encode_batch(names, [sha] * 4))
        assert ([-1, 101, -1, -1], ["NOT_FOUND", "", "STALE_VERSION", "NOT_FOUND"], contents["tree/f1.txt"]) == \
            (frame.message.sizes, frame.message.errors, bytes(frame.payload))

    def test_a_batch_of_reports_counts_each_shared_version_once(self, small):
        """downloaded_batch counts each named file once in one request; a wrong version is not counted."""
        engine, contents = small
        names = sorted(contents)
        shas = [engine.catalog.db.get_file(n).sha256 for n in names]
        self.ask(engine, protocol.ReportDownloadedBatch(), protocol.Ok, protocol.encode_batch(names, shas[:2] + [shas[0]]))
        assert {names[0]: 1, names[1]: 1, names[2]: 0} == engine.catalog.download_counts()

    def test_reports_of_names_not_shared_leave_the_metrics_alone(self, small):
        """downloaded_batch of names the server does not share (made up, or another version) counts nothing anywhere."""
        engine, contents = small
        shared = sorted(contents)[0]
        made_up = [f"made/up {i}.txt" for i in range(100)]
        session = ServerSession.open(*engine.server.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        try:
            session.call(protocol.ReportDownloadedBatch(), protocol.Ok,
                         protocol.encode_batch(made_up + [shared], ["ab" * 32] * 101))
        finally:
            session.close()
        assert ({}, 0) == (engine.server.metrics.snapshot()["downloads_per_file"],
                           engine.catalog.download_counts()[shared])

    def test_welcome_says_batches_are_answered(self, small):
        """A server's welcome lists the batches feature, which a client needs before it sends get_batch."""
        engine, _ = small
        session = ServerSession.open(*engine.server.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        session.close()
        assert [protocol.FEATURE_BATCHES] == session.welcome.features.split()

    def test_a_malformed_batch_is_refused_and_the_connection_serves_on(self, small):
        """A get_batch whose payload is no batch gets BAD_REQUEST; the next request on the connection is answered."""
        engine, contents = small
        session = ServerSession.open(*engine.server.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        try:
            session.connection.send(protocol.GetBatch(), b'{"names": ["a"], "sha256s": ["short"]}')
            refused = session.connection.recv().message
            count = session.call(protocol.CountFiles(), protocol.FileCount).message
        finally:
            session.close()
        assert (protocol.ErrorCode.BAD_REQUEST, len(contents)) == (refused.code, count.files)


class TestBatchLimits:
    def test_too_many_or_mismatched_names_are_refused(self):
        """get_files takes 1 to MAX_BATCH_FILES names, one sha256 each."""
        sha = "ab" * 32
        for names, shas in (([], []), (["a"] * (protocol.MAX_BATCH_FILES + 1), [sha] * (protocol.MAX_BATCH_FILES + 1)),
                            (["a", "b"], [sha])):
            with pytest.raises(protocol.ProtocolError):
                protocol.GetFiles(names, shas)
