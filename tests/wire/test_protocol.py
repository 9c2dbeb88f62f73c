"""Tests for protocol.py: messages, framing and the incremental decoder (no sockets)."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import database
from minitorrent.wire import protocol
from minitorrent.wire.protocol import (
    FilesData,
    GetFiles,
    ReportDownloadedMany,
    MAGIC,
    MAX_CHUNK_BYTES,
    MAX_HEADER_BYTES,
    MAX_FILE_NAME_BYTES,
    MAX_NAME_BYTES,
    MAX_PATH_DEPTH,
    MAX_PAYLOAD_BYTES,
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
    LocalProtocolError,
    ManifestInfo,
    Message,
    Ok,
    ProtocolError,
    RemoteProtocolError,
    ReportDownloaded,
    StatusInfo,
    Welcome,
    check_file_name,
    check_folder_name,
    encode_frame,
    encode_head,
)

SHA = hashlib.sha256(b"minitorrent").hexdigest()
ODD_NAME = "Résumé | draft: v2 🎉.pdf"

# One example of every message type, with its payload when it carries one.
EXAMPLES: list[tuple[Message, bytes]] = [
    (Hello(PROTOCOL_VERSION, "client", "minitorrent-tests/1"), b""),
    (Hello(PROTOCOL_VERSION, "peer"), b""),
    (ListFiles(), b""),
    (ListFiles("été | 2024: 🎉", 400), b""),
    (GetManifest(ODD_NAME), b""),
    (CountFiles(), b""),
    (GetChunk(ODD_NAME, SHA, 0), b""),
    (GetChunk("a b", SHA, 2**40), b""),
    (ReportDownloaded(ODD_NAME, SHA), b""),
    (GetFiles([ODD_NAME, "photos/2024/beach.jpg"], [SHA, SHA]), b""),
    (FilesData(sizes=[3, -1], errors=["", ErrorCode.NOT_FOUND]), b"abc"),
    (ReportDownloadedMany(["photos/a.jpg"], [SHA]), b""),
    (protocol.GetBatch(), protocol.encode_batch([ODD_NAME, "photos/a.jpg"], [SHA, SHA])),
    (protocol.ReportDownloadedBatch(), protocol.encode_batch(["photos/a.jpg"], [SHA])),
    (Welcome(PROTOCOL_VERSION, "active", 3, "abc123", features=protocol.FEATURES), b""),
    (ListFiles("photos/", limit=10, under="photos/"), b""),
    (GetStatus(), b""),
    (Welcome(PROTOCOL_VERSION, "main", 3, "abc123"), b""),
    (FileList([{"name": ODD_NAME, "size": 10, "sha256": SHA}], 1, 0), b""),
    (FileList([], 0, 200), b""),
    (ListFiles("été", cursor=f"12:{ODD_NAME}", limit=5000), b""),
    (FileList([], 12, next=f"12:{ODD_NAME}"), json.dumps([{"name": ODD_NAME, "size": 1}]).encode()),
    (ManifestInfo(ODD_NAME, 3000, 1024, SHA, 3), bytes(range(96))),
    (ManifestInfo("empty", 0, 1024, hashlib.sha256(b"").hexdigest(), 0), b""),
    (FileCount(2, 12345), b""),
    (ChunkData(ODD_NAME, 7), bytes(range(256)) * 4),
    (ChunkData("empty", 0), b""),
    (StatusInfo({"role": "main", "bytes_sent": 1, "nested": {"list": [1, 2.5, None, True]}}), b""),
    (Ok(), b""),
    (ErrorReply(ErrorCode.NOT_FOUND, "no file named 'x' ⚠"), b""),
    # Peer messages (main server <-> backup).
    (Hello(PROTOCOL_VERSION, "main", "main-server/1", 4, "n0nce"), b""),
    (Welcome(PROTOCOL_VERSION, "standby", 4, "def456", "backup", "127.0.0.1:5001", "n", "p"), b""),
    (protocol.Authenticate("proof"), b""),
    (protocol.Heartbeat(4, 17, "127.0.0.1:5001"), b""),
    (protocol.HeartbeatAck("standby", 4), b""),
    (protocol.GetInventory(), b""),
    (protocol.Inventory(), b'{"files": [], "counters": {}}'),
    (protocol.ReplicateFile(ODD_NAME, 3000, 1024, SHA, 3, 1732500000.5), bytes(96)),
    (protocol.ReplicaState(SHA, False), b"\x05"),
    (protocol.ReplicateChunk(SHA, 2), b"chunk bytes"),
    (protocol.ChunkStored(SHA, 2, True), b""),
    (protocol.RemoveFile(ODD_NAME), b""),
    (protocol.MergeCounters(), b'{"a": {"main": 1}}'),
    (protocol.HandOver(5), b""),
    (protocol.HandedOver(5), b"{}"),
    (protocol.Identify("Y2VydA==", "c2ln"), b""),
    (protocol.PairStart("bWVzc2FnZQ=="), b""),
    (protocol.PairReply("bWVzc2FnZQ==", "Y29uZmlybQ=="), b""),
    (protocol.PairConfirm("Y29uZmlybQ=="), b""),
    (protocol.PairedClients(3), b'{"clients":[]}'),
    (protocol.GetWebToken(), b""),
    (protocol.WebToken("A" * 64), b""),
    (protocol.Announce(6881), b"{\"files\":[]}"),
    (protocol.GetPeers("ab" * 32, 6881), b""),
    (protocol.PeerList([{"host": "127.0.0.1", "port": 6881, "have": None}]), b""),
]


def raw_frame(header: bytes, payload: bytes = b"", *, magic: bytes = MAGIC,
              header_len: int | None = None, payload_len: int | None = None) -> bytes:
    """A frame built by hand, so its lengths and magic may lie."""
    header_len = len(header) if header_len is None else header_len
    payload_len = len(payload) if payload_len is None else payload_len
    return PREFIX.pack(magic, header_len, payload_len) + header + payload


def json_frame(header: object, payload: bytes = b"") -> bytes:
    """A well-framed frame whose header is ``header`` as JSON (not necessarily a valid message)."""
    return raw_frame(json.dumps(header).encode(), payload)


def decode_all(decoder: FrameDecoder) -> list[Frame]:
    """Every whole frame the decoder holds now."""
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def decode_one(data: bytes) -> Frame:
    """Decode exactly one frame from ``data``; fails if there is anything else."""
    decoder = FrameDecoder()
    decoder.feed(data)
    frames = decode_all(decoder)
    assert 1 == len(frames)
    return frames[0]


def error_from(data: bytes) -> ProtocolError:
    """The error a fresh decoder raises when fed ``data``."""
    decoder = FrameDecoder()
    decoder.feed(data)
    with pytest.raises(ProtocolError) as caught:
        decode_all(decoder)
    return caught.value


VALID_NEXT = encode_frame(CountFiles())


def all_message_types() -> set[type[Message]]:
    found, todo = set(), [Message]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.TYPE:
                found.add(sub)
            todo.append(sub)
    return found


class TestRoundTrip:
    @pytest.mark.parametrize("message, payload", EXAMPLES, ids=lambda v: type(v).__name__)
    def test_message_survives_encode_and_decode(self, message, payload):
        """Every message type comes back equal, with its payload, after encode_frame -> FrameDecoder."""
        frame = decode_one(encode_frame(message, payload))
        assert message == frame.message
        assert payload == bytes(frame.payload)

    def test_examples_cover_every_message_type(self):
        """The round-trip examples include every registered message type."""
        assert all_message_types() == {type(message) for message, _ in EXAMPLES}

    def test_encode_head_then_payload_equals_encode_frame(self):
        """encode_head plus the payload bytes is exactly encode_frame (the sendfile path)."""
        message, payload = ChunkData("x", 1), b"\x00\xff" * 100
        assert encode_frame(message, payload) == encode_head(message, len(payload)) + payload

    def test_frame_layout_is_magic_lengths_json(self):
        """A frame is "MT", u32 header length, u64 payload length, a JSON header, then the payload."""
        data = encode_frame(ChunkData("a|b", 3), b"xyz")
        magic, header_len, payload_len = PREFIX.unpack(data[:PREFIX_BYTES])
        header = json.loads(data[PREFIX_BYTES : PREFIX_BYTES + header_len])
        assert (MAGIC, 3) == (magic, payload_len)
        assert {"type": "chunk", "name": "a|b", "index": 3} == header
        assert b"xyz" == data[PREFIX_BYTES + header_len :]

    def test_unknown_header_keys_are_ignored(self):
        """Keys a newer peer adds are ignored, so the message still decodes."""
        data = json_frame({"type": "get", "name": "a", "sha256": SHA, "index": 1, "priority": 9})
        assert GetChunk("a", SHA, 1) == decode_one(data).message

    def test_optional_fields_take_their_defaults(self):
        """Fields with defaults may be left out of the header."""
        assert ListFiles("", 0) == decode_one(json_frame({"type": "list"})).message


class TestMessagesAreFrozenValues:
    def test_equal_when_same_type_and_fields(self):
        """Two messages of one type with equal fields are equal, and hash alike."""
        first, second = GetChunk("a", SHA, 1), GetChunk(name="a", sha256=SHA, index=1)
        assert (True, hash(first)) == (first == second, hash(second))

    def test_unequal_when_a_field_differs(self):
        """A message differing in one field is not equal."""
        assert GetChunk("a", SHA, 1) != GetChunk("a", SHA, 2)

    def test_unequal_across_types_with_the_same_fields(self):
        """Messages of two types holding the same field values are not equal (nor equal to a tuple)."""
        names, shas = ["photos/a.jpg"], [SHA]
        assert (False, False) == (GetFiles(names, shas) == ReportDownloadedMany(names, shas),
                                  Ok() == ())

    def test_hash_refuses_unhashable_fields(self):
        """A message holding a list cannot be hashed, as a generated frozen dataclass's hash refuses it."""
        with pytest.raises(TypeError):
            hash(GetFiles(["a"], [SHA]))

    def test_repr_names_the_type_and_fields(self):
        """repr shows the type and every field, in order, as a dataclass's does."""
        assert f"GetChunk(name='a|b', sha256='{SHA}', index=3)" == repr(GetChunk("a|b", SHA, 3))
        assert "Ok()" == repr(Ok())

    def test_assignment_is_refused(self):
        """Setting or deleting a field (or any attribute) raises FrozenInstanceError and changes nothing."""
        message = GetChunk("a", SHA, 1)
        with pytest.raises(dataclasses.FrozenInstanceError):
            message.index = 2
        with pytest.raises(dataclasses.FrozenInstanceError):
            message.extra = 2
        with pytest.raises(dataclasses.FrozenInstanceError):
            del message.name
        assert GetChunk("a", SHA, 1) == message

    def test_fields_by_position_name_or_default(self):
        """Fields are taken by position, by name, or from their defaults, and listed by dataclasses.fields."""
        message = Hello(PROTOCOL_VERSION, "client", epoch=3)
        assert ["version", "role", "agent", "epoch", "nonce", "epoch_server", "epoch_proof"] == [
            field.name for field in dataclasses.fields(message)]
        assert (PROTOCOL_VERSION, "client", "", 3) == (message.version, message.role, message.agent, message.epoch)

    def test_replace_builds_a_checked_copy(self):
        """dataclasses.replace gives a new message with one field changed, checked as any other."""
        assert GetChunk("a", SHA, 2) == dataclasses.replace(GetChunk("a", SHA, 1), index=2)
        with pytest.raises(RemoteProtocolError):
            dataclasses.replace(GetChunk("a", SHA, 1), index=-1)

    @pytest.mark.parametrize("args, kwargs, why", [
        (("a", SHA), {}, "missing required argument: 'index'"),
        (("a",), {}, "missing required arguments: 'sha256', 'index'"),
        (("a", SHA, 1, 2), {}, "takes 3 fields by position but 4 were given"),
        (("a", SHA, 1), {"size": 2}, "got an unexpected keyword argument 'size'"),
        (("a", SHA), {"name": "b", "index": 1}, "got multiple values for argument 'name'"),
    ])
    def test_wrong_arguments_raise_type_error(self, args, kwargs, why):
        """Missing, extra, unknown or repeated fields raise TypeError saying which, as a dataclass's __init__ does."""
        with pytest.raises(TypeError) as caught:
            GetChunk(*args, **kwargs)
        assert f"GetChunk() {why}" == str(caught.value)

    def test_every_type_shares_the_base_methods(self):
        """No message type has its own __init__, __eq__, __hash__, __repr__ or setters (each would slow start-up)."""
        shared = {"__init__", "__eq__", "__hash__", "__repr__", "__setattr__", "__delattr__"}
        assert {} == {kind.__name__: shared & vars(kind).keys() for kind in all_message_types()
                      if shared & vars(kind).keys()}


class TestSplitStreams:
    STREAM_MESSAGES = [
        (Hello(PROTOCOL_VERSION, "client"), b""),
        (ChunkData("ü|:", 0), bytes(range(40))),
        (GetChunk("x y", SHA, 3), b""),
        (ManifestInfo("m", 2048, 1024, SHA, 2), bytes(64)),
        (Ok(), b""),
    ]

    def stream(self) -> bytes:
        return b"".join(encode_frame(m, p) for m, p in self.STREAM_MESSAGES)

    def expected(self) -> list[tuple[Message, bytes]]:
        return [(m, p) for m, p in self.STREAM_MESSAGES]

    @staticmethod
    def as_pairs(frames: list[Frame]) -> list[tuple[Message, bytes]]:
        return [(f.message, bytes(f.payload)) for f in frames]

    def test_split_at_every_offset(self):
        """The stream cut in two at any byte offset decodes to the same frames."""
        data = self.stream()
        for cut in range(len(data) + 1):
            decoder = FrameDecoder()
            decoder.feed(data[:cut])
            frames = decode_all(decoder)
            decoder.feed(data[cut:])
            frames += decode_all(decoder)
            assert self.expected() == self.as_pairs(frames), f"cut at {cut}"

    def test_one_byte_at_a_time(self):
        """Feeding the stream one byte at a time decodes to the same frames."""
        data = self.stream()
        decoder = FrameDecoder()
        frames: list[Frame] = []
        for offset in range(len(data)):
            decoder.feed(data[offset : offset + 1])
            frames += decode_all(decoder)
        assert self.expected() == self.as_pairs(frames)

    def test_every_proper_prefix_of_a_frame_needs_more_data(self):
        """A truncated frame yields None (need more data), never a partial message."""
        data = encode_frame(ChunkData("name", 1), b"0123456789")
        for cut in range(len(data)):
            decoder = FrameDecoder()
            decoder.feed(data[:cut])
            assert decoder.next_frame() is None, f"cut at {cut}"

    def test_payload_is_not_shared_with_the_buffer(self):
        """A returned payload stays intact after the decoder is fed and used again."""
        decoder = FrameDecoder()
        decoder.feed(encode_frame(ChunkData("a", 0), b"first"))
        first = decoder.next_frame()
        decoder.feed(encode_frame(ChunkData("a", 1), b"other"))
        decoder.next_frame()
        assert b"first" == bytes(first.payload)


class TestBrokenFraming:
    BROKEN = {
        "header over the limit": raw_frame(b"", header_len=MAX_HEADER_BYTES + 1),
        "zero-length header": raw_frame(b""),
        "bad magic": raw_frame(b'{"type":"ok"}', magic=b"HT"),
        "http request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "payload over the absolute limit": raw_frame(b'{"type":"chunk","name":"a","index":0}',
                                                     payload_len=MAX_PAYLOAD_BYTES + 1),
        "payload length 2**64-1": raw_frame(b'{"type":"ok"}', payload_len=2**64 - 1),
    }

    @pytest.mark.parametrize("data", BROKEN.values(), ids=BROKEN.keys())
    def test_broken_prefix_is_fatal(self, data):
        """A bad prefix raises a non-recoverable RemoteProtocolError with code BAD_FRAME."""
        error = error_from(data)
        assert (RemoteProtocolError, ErrorCode.BAD_FRAME, False) == (type(error), error.code, error.recoverable)

    @pytest.mark.parametrize("data", BROKEN.values(), ids=BROKEN.keys())
    def test_decoder_stays_broken(self, data):
        """After a fatal error the decoder keeps raising, even when fed a valid frame."""
        decoder = FrameDecoder()
        decoder.feed(data)
        with pytest.raises(RemoteProtocolError) as first:
            decode_all(decoder)
        decoder.feed(VALID_NEXT)
        with pytest.raises(RemoteProtocolError) as again:
            decoder.next_frame()
        assert first.value is again.value

    def test_oversized_header_refused_from_the_prefix_alone(self):
        """An oversized header length is refused as soon as the 14-byte prefix arrives."""
        decoder = FrameDecoder()
        decoder.feed(PREFIX.pack(MAGIC, MAX_HEADER_BYTES + 1, 0))
        with pytest.raises(RemoteProtocolError):
            decoder.next_frame()

    def test_largest_header_is_accepted(self):
        """A header of exactly MAX_HEADER_BYTES is within the limit."""
        filler = MAX_HEADER_BYTES - len(json.dumps({"type": "ok", "pad": ""}))
        header = json.dumps({"type": "ok", "pad": "x" * filler}).encode()
        assert MAX_HEADER_BYTES == len(header)
        assert Ok() == decode_one(raw_frame(header)).message

    def test_payload_on_a_type_that_takes_none_is_fatal(self):
        """A Hello carrying 10 payload bytes breaks the stream: not recoverable, BAD_FRAME."""
        error = error_from(raw_frame(encode_head(Hello(1, "client"))[PREFIX_BYTES:], b"0123456789"))
        assert (ErrorCode.BAD_FRAME, False) == (error.code, error.recoverable)

    def test_payload_over_the_type_limit_is_refused_before_it_arrives(self):
        """A chunk header declaring more than MAX_CHUNK_BYTES is refused once the header is in."""
        header = encode_head(ChunkData("a", 0))[PREFIX_BYTES:]
        decoder = FrameDecoder()
        decoder.feed(raw_frame(header, payload_len=MAX_CHUNK_BYTES + 1))  # no payload bytes at all
        with pytest.raises(RemoteProtocolError) as caught:
            decoder.next_frame()
        assert (ErrorCode.BAD_FRAME, False) == (caught.value.code, caught.value.recoverable)


class TestRecoverableErrors:
    BAD = {
        "malformed json": (raw_frame(b'{"type": "list",'), ErrorCode.BAD_REQUEST),
        "not utf-8": (raw_frame(b'{"type": "\xff\xfe"}'), ErrorCode.BAD_REQUEST),
        "json array": (json_frame(["list"]), ErrorCode.BAD_REQUEST),
        "json string": (json_frame("list"), ErrorCode.BAD_REQUEST),
        "missing type": (json_frame({"search": "x"}), ErrorCode.BAD_REQUEST),
        "type not a string": (json_frame({"type": 5}), ErrorCode.BAD_REQUEST),
        "unknown type": (json_frame({"type": "teleport"}), ErrorCode.UNKNOWN_REQUEST),
        "unknown type with payload": (json_frame({"type": "teleport"}, b"12345"), ErrorCode.UNKNOWN_REQUEST),
        "missing required field": (json_frame({"type": "get", "name": "a", "sha256": SHA}), ErrorCode.BAD_REQUEST),
        "int as string": (json_frame({"type": "get", "name": "a", "sha256": SHA, "index": "3"}),
                          ErrorCode.BAD_REQUEST),
        "bool where int": (json_frame({"type": "hello", "version": True, "role": "client"}), ErrorCode.BAD_REQUEST),
        "float where int": (json_frame({"type": "list", "offset": 1.5}), ErrorCode.BAD_REQUEST),
        "null where str": (json_frame({"type": "manifest", "name": None}), ErrorCode.BAD_REQUEST),
        "list where dict": (json_frame({"type": "status_info", "metrics": []}), ErrorCode.BAD_REQUEST),
        "file entry not an object": (json_frame({"type": "files", "files": [1], "total": 1}), ErrorCode.BAD_REQUEST),
        "negative chunk index": (json_frame({"type": "get", "name": "a", "sha256": SHA, "index": -1}),
                                 ErrorCode.OUT_OF_RANGE),
        "negative list offset": (json_frame({"type": "list", "offset": -5}), ErrorCode.OUT_OF_RANGE),
        "unsafe name": (json_frame({"type": "manifest", "name": "../etc/passwd"}), ErrorCode.BAD_NAME),
        "lone surrogate in name": (raw_frame(b'{"type":"manifest","name":"\\ud800"}'), ErrorCode.BAD_NAME),
        "deeply nested json": (raw_frame(b'{"type":"list","search":' + b"[" * 30_000 + b"]" * 30_000 + b"}"),
                               ErrorCode.BAD_REQUEST),
        "integer with 5000 digits": (raw_frame(b'{"type":"list","offset":' + b"9" * 5000 + b"}"),
                                     ErrorCode.BAD_REQUEST),
    }

    @pytest.mark.parametrize("data, code", BAD.values(), ids=BAD.keys())
    def test_bad_header_is_recoverable_and_next_frame_decodes(self, data, code):
        """A well-framed bad header raises a recoverable error with its code, and the next frame still decodes."""
        decoder = FrameDecoder()
        decoder.feed(data + VALID_NEXT)
        with pytest.raises(RemoteProtocolError) as caught:
            decoder.next_frame()
        assert (code, True) == (caught.value.code, caught.value.recoverable)
        assert [CountFiles()] == [f.message for f in decode_all(decoder)]

    def test_bad_header_is_raised_at_once_and_its_payload_dropped_as_it_arrives(self):
        """A recoverable error is raised as soon as the header is read; its payload, fed later, is dropped in step."""
        data = json_frame({"type": "teleport"}, b"payload!")
        decoder = FrameDecoder()
        decoder.feed(data[:-3])
        with pytest.raises(RemoteProtocolError):
            decoder.next_frame()
        assert (True, 0) == (decoder.discarding, decoder.buffered)
        decoder.feed(data[-3:] + VALID_NEXT)
        assert (False, CountFiles()) == (decoder.discarding, decoder.next_frame().message)


class TestPayloadIntoCallersBuffer:
    def test_head_then_payload_split_at_every_offset(self):
        """next_head, take_payload and payload_received give the payload in the caller's buffer, whatever was fed."""
        data = encode_frame(ChunkData("a", 7), bytes(range(200))) + VALID_NEXT
        for cut in range(len(data) + 1):
            decoder = FrameDecoder()
            decoder.feed(data[:cut])
            head = decoder.next_head()
            while head is None:  # the cut fell inside the head: feed what it still needs
                needed = decoder.bytes_needed()
                decoder.feed(data[cut:cut + needed])
                cut += needed
                head = decoder.next_head()
            buffer = bytearray(head.payload_len)
            got = decoder.take_payload(memoryview(buffer))
            rest = data[cut:cut + head.payload_len - got]
            buffer[got:] = rest
            decoder.payload_received(len(rest))
            decoder.feed(data[cut + len(rest):])
            assert (ChunkData("a", 7), bytes(range(200)), CountFiles()) == (
                head.message, bytes(buffer), decoder.next_frame().message), f"cut at {cut}"

    def test_payload_over_a_lowered_limit_is_fatal_from_the_prefix(self):
        """next_head(max_payload) refuses a larger declared payload before any of it arrives."""
        decoder = FrameDecoder()
        decoder.feed(encode_head(ChunkData("a", 0), 1000))
        with pytest.raises(RemoteProtocolError) as caught:
            decoder.next_head(max_payload=999)
        assert (ErrorCode.BAD_FRAME, False) == (caught.value.code, caught.value.recoverable)

    def test_head_before_its_payload_is_taken_is_a_local_error(self):
        """Asking for the next head while a payload is owed is our bug, not the peer's."""
        decoder = FrameDecoder()
        decoder.feed(encode_frame(ChunkData("a", 0), b"xyz") + VALID_NEXT)
        decoder.next_head()
        with pytest.raises(LocalProtocolError):
            decoder.next_head()

    def test_negative_chunk_index_refused_when_built(self):
        """GetChunk with a negative index raises OUT_OF_RANGE when constructed."""
        with pytest.raises(RemoteProtocolError) as caught:
            GetChunk("a", SHA, -1)
        assert ErrorCode.OUT_OF_RANGE == caught.value.code

    def test_wrong_field_type_refused_when_built(self):
        """A message checks its field types when constructed (bool is not an int)."""
        with pytest.raises(ProtocolError) as caught:
            Hello(True, "client")
        assert ErrorCode.BAD_REQUEST == caught.value.code


class TestFileNames:
    REFUSED = {
        "parent": "../x",
        "empty component": "a//b",
        "trailing slash": "a/",
        "parent inside": "a/../b",
        "dot inside": "a/./b",
        "parent at end": "a/..",
        "nul in folder": "a\x00/b",
        "control in folder": "a\nb/c",
        "256-byte folder": "a" * 256 + "/b",
        "too deep": "/".join(["d"] * (MAX_PATH_DEPTH + 1)),
        "path too long": "/".join(["d" * 200] * 6),
        "backslash": "a\\b",
        "nul": "a\x00b",
        "absolute": "/etc/passwd",
        "windows absolute": "C:\\Windows",
        "empty": "",
        "dot": ".",
        "dotdot": "..",
        "256 bytes": "a" * 256,
        "256 bytes of accents": "é" * 128,
        "no room for its part file": "a" * (MAX_FILE_NAME_BYTES + 1),
        "no room for its part file, in a folder": "photos/" + "é" * 124,
        "newline": "a\nb",
        "tab": "a\tb",
        "escape": "a\x1bb",
        "unit separator": "a\x1fb",
        "delete": "a\x7fb",
        "lone surrogate": "a\ud800b",
    }
    ACCEPTED = {
        "spaces": "my holiday photos.zip",
        "accents": "résumé naïve.txt",
        "emoji": "🎉🚀 party.mp4",
        "pipe": "a|b",
        "colon": "a:b",
        "all together": ODD_NAME,
        "dot file": ".bashrc",
        "three dots": "...",
        "246-byte file name": "a" * MAX_FILE_NAME_BYTES,
        "255-byte folder name": "a" * MAX_NAME_BYTES + "/b",
        "cjk": "文件.txt",
        "relative path": "a/b",
        "nested path": "photos/2024/beach.jpg",
        "dot folder": ".config/x",
        "deepest allowed": "/".join(["d"] * MAX_PATH_DEPTH),
    }

    @pytest.mark.parametrize("name", REFUSED.values(), ids=REFUSED.keys())
    def test_unsafe_name_refused(self, name):
        """check_file_name refuses anything that is not a safe relative path of safe components, with BAD_NAME."""
        with pytest.raises(RemoteProtocolError) as caught:
            check_file_name(name)
        assert (ErrorCode.BAD_NAME, True) == (caught.value.code, caught.value.recoverable)

    @pytest.mark.parametrize("name", ACCEPTED.values(), ids=ACCEPTED.keys())
    def test_ordinary_name_accepted(self, name):
        """check_file_name returns ordinary names unchanged, whatever characters they use."""
        assert name == check_file_name(name)

    def test_a_file_name_leaves_room_for_its_part_file(self):
        """A file's own name is refused when "<name>.100.part", its longest part name, would pass 255 bytes."""
        longest = "a" * MAX_FILE_NAME_BYTES
        assert (MAX_NAME_BYTES, longest) == (len(f"{longest}.100.part"), check_file_name(longest))
        with pytest.raises(RemoteProtocolError) as caught:
            check_file_name(longest + "a")
        assert (ErrorCode.BAD_NAME, True) == (caught.value.code, "partial download" in str(caught.value))

    def test_a_folder_name_may_use_all_255_bytes(self):
        """check_folder_name keeps the 255-byte component limit: no part file is made for a folder."""
        assert "a" * MAX_NAME_BYTES == check_folder_name("a" * MAX_NAME_BYTES)
        with pytest.raises(RemoteProtocolError):
            check_folder_name("a" * (MAX_NAME_BYTES + 1))

    @pytest.mark.parametrize("value", [None, 5, b"name", ["a"]])
    def test_non_string_refused(self, value):
        """A name that is not a string is refused with BAD_NAME."""
        with pytest.raises(RemoteProtocolError) as caught:
            check_file_name(value)
        assert ErrorCode.BAD_NAME == caught.value.code

    @pytest.mark.parametrize("name", REFUSED.values(), ids=REFUSED.keys())
    def test_unsafe_name_refused_in_get_chunk(self, name):
        """GetChunk, GetManifest and ReportDownloaded refuse unsafe names when built."""
        for build in (lambda: GetChunk(name, SHA, 0), lambda: GetManifest(name), lambda: ReportDownloaded(name, SHA),
                      lambda: GetFiles([name], [SHA]), lambda: ReportDownloadedMany(["ok", name], [SHA, SHA])):
            with pytest.raises(RemoteProtocolError) as caught:
                build()
            assert ErrorCode.BAD_NAME == caught.value.code


class TestNamesCheckedAtOnce:
    def test_a_listing_of_plain_names_passes_at_once(self):
        """Plain ASCII paths, nested and with spaces, pass plainly_safe_names (and each passes check_file_name)."""
        names = ["photos/a.jpg", "photos/2024/b c.jpg", "top.txt", "a/" * 10 + "deep.bin"]
        assert (True, names) == (protocol.plainly_safe_names(names), [check_file_name(n) for n in names])

    @pytest.mark.parametrize("name", TestFileNames.REFUSED.values(), ids=TestFileNames.REFUSED.keys())
    def test_one_refused_name_sends_the_listing_to_the_slow_path(self, name):
        """A listing holding one name that check_file_name refuses is never passed at once."""
        assert False == protocol.plainly_safe_names(["photos/a.jpg", name, "photos/b.jpg"])

    @pytest.mark.parametrize("name", TestFileNames.REFUSED.values(), ids=TestFileNames.REFUSED.keys())
    def test_a_refused_name_first_or_last_is_seen(self, name):
        """A refused name at either end of the listing (where a component meets no slash) is seen too."""
        assert (False, False) == (protocol.plainly_safe_names([name, "photos/b.jpg"]),
                                  protocol.plainly_safe_names(["photos/a.jpg", name]))

    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.text(alphabet="a./\\ \x00\x1f\x7f", max_size=8), min_size=1, max_size=4))
    def test_names_passed_at_once_pass_one_by_one(self, names):
        """Whatever the names, a listing passed at once holds only names check_file_name passes."""
        if protocol.plainly_safe_names(names):
            assert names == [check_file_name(name) for name in names]

    @pytest.mark.parametrize("names", [[], ["a\nb"], ["photos/é.jpg"], [None], ["a", 5]],
                             ids=["empty", "newline", "non-ascii", "none", "number"])
    def test_unusual_listings_take_the_slow_path(self, names):
        """An empty listing, a newline in a name, a non-ASCII or non-text name: checked one by one instead."""
        assert False == protocol.plainly_safe_names(names)


class TestFilesDataSizes:
    @pytest.mark.parametrize("sizes", [[True], [-2], [1.5], ["3"], [None], [3, -1, False]],
                             ids=["bool", "below-minus-one", "float", "text", "null", "bool-among-ints"])
    def test_sizes_that_are_not_integers_of_at_least_minus_one_are_refused(self, sizes):
        """A files_data size must be an int (not a bool) of at least -1."""
        with pytest.raises(RemoteProtocolError):
            FilesData(sizes=sizes, errors=[""] * len(sizes))

    def test_an_empty_answer_and_mixed_sizes_pass(self):
        """No files, or served and unserved files side by side, make a valid files_data."""
        assert ([], [0, -1, 7]) == (FilesData([], []).sizes, FilesData([0, -1, 7], ["", "NOT_FOUND", ""]).sizes)


class TestBatchPayload:
    def test_names_and_versions_come_back(self):
        """decode_batch gives back the names (any Unicode) and sha256s that encode_batch put in, in order."""
        names = [ODD_NAME, "photos/2024/beach.jpg", 'a "quoted" name']
        assert (names, [SHA] * 3) == protocol.decode_batch(protocol.encode_batch(names, [SHA] * 3))

    def test_a_full_batch_of_the_longest_names_fits_its_estimate(self):
        """Names filling batch_entry_bytes to the limit encode within MAX_BATCH_LIST_BYTES."""
        name = 'é\\"' * 341  # 1,023 characters: a 2-byte UTF-8 one and two that JSON escapes
        count = min(protocol.MAX_LISTED_BATCH_FILES, protocol.MAX_BATCH_LIST_BYTES // protocol.batch_entry_bytes(name))
        payload = protocol.encode_batch([name] * count, [SHA] * count)
        assert (True, count) == (len(payload) <= protocol.MAX_BATCH_LIST_BYTES, len(protocol.decode_batch(payload)[0]))

    @pytest.mark.parametrize("document", [
        b"not json", b"[]", b'{"names": ["a"]}', b'{"names": [], "sha256s": []}',
        b'{"names": ["a", "b"], "sha256s": ["' + b"a" * 64 + b'"]}',
        b'{"names": [1], "sha256s": ["' + b"a" * 64 + b'"]}',
        b'{"names": ["a"], "sha256s": ["abc"]}',
        b'{"names": ["' + b"a" * (protocol.MAX_PATH_BYTES + 1) + b'"], "sha256s": ["' + b"a" * 64 + b'"]}',
        b'{"names": "aa", "sha256s": "bb"}',
        b'{"names": ["a\\ud800b"], "sha256s": ["' + b"a" * 64 + b'"]}',
    ], ids=["not-json", "array", "no-sha256s", "empty", "mismatched", "number", "short-sha", "long-name", "strings",
            "lone-surrogate"])
    def test_malformed_batches_are_refused(self, document):
        """A batch payload that is not 1..MAX_LISTED_BATCH_FILES text names with 64-character sha256s is refused."""
        with pytest.raises(RemoteProtocolError) as caught:
            protocol.decode_batch(document)
        assert True == caught.value.recoverable

    def test_too_many_files_are_refused_both_ways(self):
        """One file over MAX_LISTED_BATCH_FILES: encode_batch refuses to build it, decode_batch to read it."""
        count = protocol.MAX_LISTED_BATCH_FILES + 1
        document = json.dumps({"names": ["a"] * count, "sha256s": ["a" * 64] * count}).encode()
        with pytest.raises(LocalProtocolError):
            protocol.encode_batch(["a"] * count, ["a" * 64] * count)
        with pytest.raises(RemoteProtocolError) as caught:
            protocol.decode_batch(document)
        assert ErrorCode.OUT_OF_RANGE == caught.value.code


class TestEncodeLimits:
    def test_oversized_header_is_a_local_error(self):
        """encode_head refuses a header over MAX_HEADER_BYTES with LocalProtocolError."""
        with pytest.raises(LocalProtocolError):
            encode_head(ErrorReply(ErrorCode.INTERNAL, "x" * MAX_HEADER_BYTES))

    def test_payload_on_a_type_that_takes_none_is_a_local_error(self):
        """encode_frame refuses a payload on a Hello with LocalProtocolError."""
        with pytest.raises(LocalProtocolError):
            encode_frame(Hello(PROTOCOL_VERSION, "client"), b"0123456789")

    def test_payload_over_type_limit_is_a_local_error(self):
        """encode_head refuses a chunk payload length over MAX_CHUNK_BYTES."""
        with pytest.raises(LocalProtocolError):
            encode_head(ChunkData("a", 0), MAX_CHUNK_BYTES + 1)

    def test_negative_payload_length_is_a_local_error(self):
        """encode_head refuses a negative payload length."""
        with pytest.raises(LocalProtocolError):
            encode_head(ChunkData("a", 0), -1)

    def test_local_error_is_not_a_remote_error(self):
        """LocalProtocolError and RemoteProtocolError share ProtocolError but are distinct."""
        assert issubclass(LocalProtocolError, ProtocolError)
        assert not issubclass(LocalProtocolError, RemoteProtocolError)


class TestListingCursor:
    def test_cursor_carries_total_and_name(self):
        """A cursor made for a page gives back the listing's total and the page's last name."""
        assert (1234, ODD_NAME) == protocol.parse_cursor(protocol.make_cursor(1234, ODD_NAME))

    def test_empty_cursor_is_the_first_page(self):
        """The empty cursor means: from the first name, total not counted yet."""
        assert (0, "") == protocol.parse_cursor("")

    @pytest.mark.parametrize("cursor, code", [
        ("nocolon", ErrorCode.BAD_REQUEST),
        (":a.txt", ErrorCode.BAD_REQUEST),
        ("-1:a.txt", ErrorCode.BAD_REQUEST),
        ("1e3:a.txt", ErrorCode.BAD_REQUEST),
        ("\u0663:a.txt", ErrorCode.BAD_REQUEST),  # an Arabic-Indic digit: isdigit() but not ASCII
        ("9" * 5000 + ":a.txt", ErrorCode.BAD_REQUEST),
        (f"{protocol.MAX_LIST_TOTAL + 1}:a.txt", ErrorCode.OUT_OF_RANGE),
        ("12:", ErrorCode.BAD_NAME),
        ("12:../etc", ErrorCode.BAD_NAME),
        ("12:" + "x" * 256, ErrorCode.BAD_NAME),
    ])
    def test_bad_cursor_refused_and_connection_kept(self, cursor, code):
        """A list request with a malformed or out-of-range cursor is a recoverable error with its code."""
        error = error_from(json_frame({"type": "list", "cursor": cursor, "limit": 10}))
        assert (code, True) == (error.code, error.recoverable)

    @pytest.mark.parametrize("fields", [{"limit": -1}, {"offset": protocol.MAX_LIST_TOTAL + 1}, {"offset": 2**64}])
    def test_page_numbers_out_of_range_refused(self, fields):
        """A negative limit, or an offset past MAX_LIST_TOTAL (SQLite takes no integer over 2**63), is OUT_OF_RANGE."""
        error = error_from(json_frame({"type": "list", **fields}))
        assert (ErrorCode.OUT_OF_RANGE, True) == (error.code, error.recoverable)

    @pytest.mark.parametrize("fields, code", [
        ({"total": -1}, ErrorCode.OUT_OF_RANGE),
        ({"total": protocol.MAX_LIST_TOTAL + 1}, ErrorCode.OUT_OF_RANGE),
        ({"total": 2**80}, ErrorCode.OUT_OF_RANGE),
        ({"total": 3, "next": "3"}, ErrorCode.BAD_REQUEST),
        ({"total": 3, "next": "3:a//b"}, ErrorCode.BAD_NAME),  # a path may name a file; an empty folder name may not
        ({"total": 3, "offset": -5}, ErrorCode.OUT_OF_RANGE),
    ])
    def test_reply_numbers_bounded(self, fields, code):
        """A listing reply's total, offset and next cursor are checked when it is decoded."""
        error = error_from(json_frame({"type": "files", "files": [], **fields}))
        assert code == error.code

    def test_page_payload_over_its_limit_is_refused_before_it_arrives(self):
        """A files reply announcing more than MAX_LIST_PAGE_PAYLOAD bytes is refused from its header."""
        header = json.dumps({"type": "files", "files": [], "total": 1}).encode()
        error = error_from(raw_frame(header, payload_len=protocol.MAX_LIST_PAGE_PAYLOAD + 1))
        assert (ErrorCode.BAD_FRAME, False) == (error.code, error.recoverable)


class TestListPagePayload:
    def test_entries_decode_as_dicts(self):
        """A page's payload gives one dict per entry, in order."""
        entries = [{"name": "a", "size": 1}, {"name": ODD_NAME, "size": 2, "extra": None}]
        assert entries == protocol.decode_list_page(json.dumps(entries, ensure_ascii=False).encode())

    @pytest.mark.parametrize("payload", [
        b"not json", b"\xff\xfe", b'{"name": "a"}', b'[["a", 1]]', b'[{"size": 1}]', b'[{"name": 7}]',
        b'[{"name": "a"}, "b"]', b"[" * 100_000,
        json.dumps([{"name": f"{i}"} for i in range(protocol.MAX_LIST_PAGE_ENTRIES + 1)]).encode(),
    ])
    def test_malformed_page_refused(self, payload):
        """A payload that is not an array of at most MAX_LIST_PAGE_ENTRIES objects with a text name is BAD_REQUEST."""
        with pytest.raises(RemoteProtocolError) as caught:
            protocol.decode_list_page(payload)
        assert ErrorCode.BAD_REQUEST == caught.value.code


PACKED_ENTRIES = [
    {"name": "a", "size": 0, "chunks": 0, "sha256": "00" * 32, "root": "01" * 32, "downloads": 0, "added_at": 0.0},
    {"name": ODD_NAME, "size": 2**62, "chunks": 7, "sha256": "ab" * 32, "root": "cd" * 32, "downloads": 12,
     "added_at": 1764500000.123456},
]


def packed(entries: list[dict]) -> bytes:
    return protocol.pack_list_page(entries)


class TestPackedListPage:
    def test_entries_round_trip(self):
        """A packed page decodes to the entries it was packed from, every key and type kept."""
        decoded = protocol.decode_list_page(packed(PACKED_ENTRIES), protocol.LIST_LAYOUT_PACKED, 2)
        assert (PACKED_ENTRIES, [list(map(type, e.values())) for e in PACKED_ENTRIES]) == (
            decoded, [list(map(type, e.values())) for e in decoded])

    def test_entry_keys_are_the_catalogs(self):
        """A packed entry has the keys, in order, of the catalog's JSON entries (database.LISTING_KEYS)."""
        assert database.LISTING_KEYS == protocol.LIST_ENTRY_KEYS == tuple(
            protocol.decode_list_page(packed(PACKED_ENTRIES[:1]), protocol.LIST_LAYOUT_PACKED, 1)[0])

    def test_empty_page_is_empty(self):
        """A packed page of no entries is an empty payload, and decodes to no entries."""
        assert (b"", []) == (packed([]), protocol.decode_list_page(b"", protocol.LIST_LAYOUT_PACKED, 0))

    def test_smaller_than_json(self):
        """The packed page of the same entries takes fewer bytes than the JSON one (raw digests and numbers)."""
        as_json = json.dumps(PACKED_ENTRIES, ensure_ascii=False, separators=(",", ":")).encode()
        assert (True, 2 * protocol.PACKED_FIXED_BYTES + 1 + len(ODD_NAME.encode()) + 1) == (
            len(packed(PACKED_ENTRIES)) < len(as_json), len(packed(PACKED_ENTRIES)))

    @pytest.mark.parametrize("payload, count", [
        (packed(PACKED_ENTRIES), 1),  # more names than entries said
        (packed(PACKED_ENTRIES), 3),  # fewer bytes than 3 entries' numbers and digests
        (packed(PACKED_ENTRIES)[:-len(ODD_NAME.encode()) - 1], 2),  # one name missing
        (packed(PACKED_ENTRIES[:1]) + b"\n", 1),  # a second, empty name
        (packed(PACKED_ENTRIES[:1])[:-1] + b"\xff", 1),  # a name that is not UTF-8
        (b"\0" * 8, 0),  # bytes, yet no entries
        (packed(PACKED_ENTRIES), -1),
        (b"\0" * protocol.PACKED_FIXED_BYTES * (protocol.MAX_LIST_PAGE_ENTRIES + 1)
         + b"\n" * protocol.MAX_LIST_PAGE_ENTRIES, protocol.MAX_LIST_PAGE_ENTRIES + 1),  # over the page bound
    ], ids=["names-over", "short", "name-missing", "extra-name", "not-utf8", "bytes-no-entries", "negative", "oversized"])
    def test_malformed_packed_page_refused(self, payload, count):
        """A packed page whose columns do not hold exactly its count of entries (at most the bound) is BAD_REQUEST."""
        with pytest.raises(RemoteProtocolError) as caught:
            protocol.decode_list_page(payload, protocol.LIST_LAYOUT_PACKED, count)
        assert ErrorCode.BAD_REQUEST == caught.value.code

    def test_unknown_layout_refused(self):
        """A page in a layout this client did not ask for and does not know is BAD_REQUEST, not guessed at."""
        with pytest.raises(RemoteProtocolError) as caught:
            protocol.decode_list_page(b"[]", "columns-v9", 0)
        assert ErrorCode.BAD_REQUEST == caught.value.code

    @pytest.mark.parametrize("entries", [-1, protocol.MAX_LIST_PAGE_ENTRIES + 1, "3"])
    def test_reply_entry_count_bounded(self, entries):
        """A files reply's packed entry count is checked against the page bound when it is decoded."""
        error = error_from(json_frame({"type": "files", "files": [], "total": 3, "layout": "packed", "entries": entries}))
        expected = ErrorCode.BAD_REQUEST if entries == "3" else ErrorCode.OUT_OF_RANGE  # a string is no count
        assert expected == error.code

    @pytest.mark.parametrize("columns", [
        (bytes(24), bytes(8), bytes(32), bytes(31), b"a"),  # a root short
        (bytes(24), bytes(16), bytes(32), bytes(32), b"a"),  # two download counts for one entry
        (bytes(24), bytes(8), bytes(32), bytes(32), b"a\nb"),  # two names for one entry
        (b"", b"", b"", b"", b"a"),  # a name and no entry
    ], ids=["short-root", "extra-count", "extra-name", "name-without-entry"])
    def test_server_refuses_to_pack_columns_that_disagree(self, columns):
        """Columns read from a damaged catalog are refused (ValueError), never sent as a page that shifts entries."""
        with pytest.raises(ValueError):
            protocol.pack_list_columns(*columns)


# --------------------------------------------------------------------------- hypothesis

KNOWN_TYPES = sorted(cls.TYPE for cls in all_message_types())
FIELD_NAMES = sorted({name for cls in all_message_types() for name in cls.__dataclass_fields__})

json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
    st.sampled_from(["", ".", "..", "../x", "a/b", SHA, ODD_NAME, "a\x00b", "\ud800"]),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
headers = st.builds(
    lambda kind, fields: {**fields, "type": kind},
    st.one_of(st.sampled_from(KNOWN_TYPES), st.text(max_size=12), json_values),
    st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=6)), json_values, max_size=6),
)


@st.composite
def looking_valid_frames(draw) -> bytes:
    header = draw(headers)
    if draw(st.booleans()):
        header = draw(json_values)  # sometimes not an object at all
    body = json.dumps(header, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    payload = draw(st.binary(max_size=64))
    payload_len = draw(st.sampled_from([len(payload)] * 4 + [0, 2**20, MAX_CHUNK_BYTES + 1, 32 * 2**22]))
    header_len = draw(st.sampled_from([len(body)] * 6 + [0, max(len(body) - 1, 0), len(body) + 1]))
    return PREFIX.pack(MAGIC, header_len, payload_len) + body + payload


def feed_in_pieces(data: bytes, cuts: list[int]) -> list[Frame]:
    """Feed ``data`` cut at ``cuts``, draining after each piece; only Frames or ProtocolError may come out."""
    decoder = FrameDecoder()
    frames: list[Frame] = []
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for start, end in zip(bounds, bounds[1:]):
        decoder.feed(data[start:end])
        while True:
            try:
                frame = decoder.next_frame()
            except ProtocolError as error:
                assert isinstance(error, RemoteProtocolError)
                assert isinstance(error.code, str) and error.code
                if not error.recoverable:
                    return frames
                continue
            if frame is None:
                break
            assert isinstance(frame, Frame)
            assert isinstance(frame.message, Message)
            assert len(frame.payload) <= type(frame.message).MAX_PAYLOAD
            frames.append(frame)
    return frames


class TestFuzzedDecoding:
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        data=st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda b: MAGIC + b)),
        cuts=st.lists(st.integers(min_value=0), max_size=8),
    )
    def test_arbitrary_bytes_give_frames_or_protocol_errors(self, data, cuts):
        """Arbitrary bytes in arbitrary pieces only ever give Frames or ProtocolErrors."""
        feed_in_pieces(data, cuts)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(frames=st.lists(looking_valid_frames(), min_size=1, max_size=4),
           cuts=st.lists(st.integers(min_value=0), max_size=6))
    def test_valid_looking_frames_give_frames_or_protocol_errors(self, frames, cuts):
        """Well-framed random JSON headers of known and unknown types give Frames or ProtocolErrors only."""
        feed_in_pieces(b"".join(frames), cuts)

    @settings(max_examples=200, deadline=None)
    @given(message_and_payload=st.sampled_from(EXAMPLES), cuts=st.lists(st.integers(min_value=0), max_size=6))
    def test_valid_frames_in_random_pieces_round_trip(self, message_and_payload, cuts):
        """A valid frame cut at random offsets decodes to the original message and payload."""
        message, payload = message_and_payload
        data = encode_frame(message, payload) + VALID_NEXT
        frames = feed_in_pieces(data, cuts)
        assert [(message, payload), (CountFiles(), b"")] == [(f.message, bytes(f.payload)) for f in frames]
