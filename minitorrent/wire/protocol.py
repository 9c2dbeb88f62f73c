"""The MiniTorrent wire protocol: messages and framing, with no I/O.

Everything that crosses a socket is defined here, once. The module never
touches a socket: ``encode_*`` turn messages into bytes and ``FrameDecoder``
is fed bytes and hands back whole frames, so tests can split input at every
offset without a network. ``transport.py`` holds the few lines that move these
bytes over TCP (see docs/protocol.md for the full description).

Frame layout (integers big-endian)::

    +-------+-----------------+------------------+--------------+-----------+
    | "MT"  | header_len: u32 | payload_len: u64 | header JSON  | payload   |
    +-------+-----------------+------------------+--------------+-----------+
      2 B          4 B               8 B          header_len B   payload_len B

The header is a UTF-8 JSON object with a ``"type"`` key naming the message and
one key per field. The payload carries bulk bytes (a chunk, a manifest's
digests) so that they are never JSON-encoded and can be sent with
``sendfile``. Both lengths are checked against limits before any memory is
set aside for them: first the absolute limits below, then (once the header
says what the message is) the payload limit of that message type.

Replies come back on a connection in the order the requests were sent, which
is what makes pipelining chunk requests safe without request ids.
"""
from __future__ import annotations

import base64
import functools
import itertools
import json
import operator
import re
import reprlib
import struct
import sys
import typing
from array import array
from dataclasses import MISSING, FrozenInstanceError, dataclass, fields
from typing import Any, ClassVar

from error_handler import MiniTorrentError
from minitorrent.common.partfile import LONGEST_PART_SUFFIX_BYTES, PART_SUFFIX

PROTOCOL_VERSION = 1
MAGIC = b"MT"
PREFIX = struct.Struct("!2sIQ")
PREFIX_BYTES = PREFIX.size

MAX_HEADER_BYTES = 64 * 1024  # a listing page of a few hundred names fits; digests go in payloads
MAX_CHUNK_BYTES = 16 * 1024 * 1024  # the largest transfer.chunk_size the config accepts
MAX_MANIFEST_CHUNKS = 4 * 1024 * 1024  # 4 TiB at 1 MiB chunks
MAX_PAYLOAD_BYTES = max(MAX_CHUNK_BYTES, 32 * MAX_MANIFEST_CHUNKS)  # 128 MiB
MAX_NAME_BYTES = 255  # what ext4 and most file systems allow for one name
# A file's own name (a path's last component) leaves room for the part file a
# receiver writes beside it ("<name>.part", up to "<name>.100.part"): 246 bytes.
MAX_FILE_NAME_BYTES = MAX_NAME_BYTES - LONGEST_PART_SUFFIX_BYTES
MAX_PATH_BYTES = 1024  # a relative path: well under Linux's PATH_MAX (4096) once an output folder is prefixed
MAX_PATH_DEPTH = 64  # folders in one relative path: deep trees, but not a denial of service
MAX_LIST_ENTRIES = 200  # entries per offset page (protocol 1's paging) at most; fit_list_page also keeps it under the header limit
MAX_LIST_PAGE_BYTES = MAX_HEADER_BYTES - 4096  # room for the rest of the header
MAX_LIST_PAGE_ENTRIES = 5000  # entries per cursor page at most: 200 pages list a million files
# A cursor page's entries: 5,000 of at most about 2,350 bytes as JSON objects (a
# 1,024-byte path whose every character but the slashes is an escaped '"', two
# hashes, four numbers, seven keys), or 1,121 bytes packed (96 + a 1,024-byte path + "\n").
MAX_LIST_PAGE_PAYLOAD = 12 * 1024 * 1024
MAX_LIST_TOTAL = 10_000_000  # a listing's total, and the entries a client collects: 10x the largest catalog measured
MAX_STATUS_FILES = 100  # per-file download counts in a status reply (the most downloaded)


class ErrorCode:
    """The ``code`` of an ``ErrorReply``; stable strings that scripts may test."""

    BAD_FRAME = "BAD_FRAME"  # framing broken: the connection is closed after the reply
    BAD_REQUEST = "BAD_REQUEST"  # well framed, but the header is not a valid message
    UNKNOWN_REQUEST = "UNKNOWN_REQUEST"
    HELLO_REQUIRED = "HELLO_REQUIRED"
    VERSION_MISMATCH = "VERSION_MISMATCH"
    BAD_NAME = "BAD_NAME"
    NOT_FOUND = "NOT_FOUND"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    STALE_VERSION = "STALE_VERSION"  # the file changed: the client's sha256 is not the served one
    BUSY = "BUSY"  # max_connections reached: retry later
    STORAGE_ERROR = "STORAGE_ERROR"  # the server's own copy is unreadable or damaged
    STANDBY = "STANDBY"  # this server is not the active one; the message names the primary
    AUTH_FAILED = "AUTH_FAILED"  # a peer did not prove it knows server.secret
    INTEGRITY = "INTEGRITY"  # replicated bytes did not match their manifest
    FAILBACK_MANUAL = "FAILBACK_MANUAL"  # the operator has not yet approved the hand-back
    NOT_PAIRED = "NOT_PAIRED"  # server.access is paired and this client's identity is not accepted
    PAIRING_FAILED = "PAIRING_FAILED"  # no code is waiting, or the code did not match
    INTERNAL = "INTERNAL"


class ProtocolError(MiniTorrentError):
    """A rule of the protocol was broken.

    ``code`` is the ``ErrorCode`` to answer with. ``recoverable`` says whether
    the byte stream is still in step (the frame was whole, only its content
    was bad) so the connection may go on serving.
    """

    def __init__(self, message: str, code: str = ErrorCode.BAD_FRAME, recoverable: bool = False):
        super().__init__(message)
        self.code = code
        self.recoverable = recoverable


class RequestFailed(MiniTorrentError):
    """Raised by server code to answer a request with ``ErrorReply(code, message)``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol (a bug on this side)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""


def check_file_name(name: object) -> str:
    """Return ``name`` if it is safe as a shared file's relative path, else raise.

    A name crosses the network and becomes a path under the receiver's output
    folder, so it is one or more components joined by ``/`` (``photos/2024/
    beach.jpg``), each of which must be safe on its own (``check_component``):
    no absolute path, no empty component (``a//b``, a trailing ``/``), no
    ``.`` or ``..``, no ``\\``. At most ``MAX_PATH_DEPTH`` components and
    ``MAX_PATH_BYTES`` UTF-8 bytes in all. Spaces, accents, emoji, ``|`` and
    ``:`` are all fine. The last component, the file's own name, is at most
    ``MAX_FILE_NAME_BYTES``: a receiver must be able to create its part file
    (``<name>.part``) beside it. Raises ``RemoteProtocolError`` with code
    ``BAD_NAME`` (a ``MiniTorrentError``). The one place these rules live: the
    catalog, the replica and the downloading client all call it.
    """
    if not isinstance(name, str):
        _refuse_name(name, "not a string")
    return _check_path(name, True)


def check_folder_name(name: object) -> str:
    """Return ``name`` if it is safe as a folder's relative path (``photos/2024``), else raise.

    The rules of ``check_file_name`` but for the part-file room: no part file
    is ever made for a folder, so its last component may have 255 bytes.
    """
    if not isinstance(name, str):
        _refuse_name(name, "not a string")
    return _check_path(name, False)


@functools.lru_cache(maxsize=1 << 14)  # pure; a folder's names are checked on listing, request and report
def _check_path(name: str, is_file: bool) -> str:
    if _plainly_safe(name):
        return name
    if name.startswith("/"):
        _refuse_name(name, "an absolute path")
    components = name.split("/")
    if len(components) > MAX_PATH_DEPTH:
        _refuse_name(name, f"deeper than {MAX_PATH_DEPTH} folders")
    for component in components:
        check_component(component, name)
    if len(name.encode("utf-8")) > MAX_PATH_BYTES:
        _refuse_name(name, f"longer than {MAX_PATH_BYTES} bytes")
    if is_file and len(components[-1].encode("utf-8")) > MAX_FILE_NAME_BYTES:
        _refuse_name(name, f"a file name longer than {MAX_FILE_NAME_BYTES} bytes: its partial download "
                           f"(<name>{PART_SUFFIX}) would pass the file system's {MAX_NAME_BYTES}-byte limit")
    return name


def check_component(component: object, whole: object = None) -> str:
    """Return ``component`` if it is safe as one file or folder name, else raise (``BAD_NAME``).

    No ``/`` or ``\\``, no NUL or other control character, not ``.`` or
    ``..``, not empty, at most ``MAX_NAME_BYTES`` UTF-8 bytes.
    """
    name = component if whole is None else whole
    if not isinstance(component, str):
        _refuse_name(name, "not a string")
    if component == "":
        _refuse_name(name, "an empty name or an empty folder name (// or a / at either end)")
    if component in (".", ".."):
        _refuse_name(name, "a directory reference (. or ..)")
    if "/" in component or "\\" in component:
        _refuse_name(name, "contains a path separator")
    if _CONTROL_CHARACTER.search(component):
        _refuse_name(name, "contains a control character")
    try:
        encoded = component.encode("utf-8")
    except UnicodeEncodeError:
        _refuse_name(name, "not valid Unicode")
    if len(encoded) > MAX_NAME_BYTES:
        _refuse_name(name, f"a component longer than {MAX_NAME_BYTES} bytes")
    return component


_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")  # a regex, not a loop per character: 10,000 names are checked often
# A control character, a backslash, or a component that is empty, "." or "..": one search over the whole path.
_UNSAFE_IN_PATH = re.compile(r"[\x00-\x1f\x7f\\]|(?:^|/)\.{0,2}(?:/|$)")
_PLAIN_PATH_BYTES = min(MAX_NAME_BYTES, MAX_FILE_NAME_BYTES, MAX_PATH_BYTES)


def _plainly_safe(name: str) -> bool:
    """True for a path that passes every rule of ``_check_path`` at a glance (most names); False: check each part.

    Short enough that no component can be too long, no unsafe character or
    component anywhere: one regex and one encode instead of a loop over the
    components (a folder of 10,000 files is checked as it is listed).
    """
    if _UNSAFE_IN_PATH.search(name) or name.count("/") >= MAX_PATH_DEPTH:
        return False
    try:
        return len(name.encode("utf-8")) <= _PLAIN_PATH_BYTES
    except UnicodeEncodeError:
        return False


def plainly_safe_names(names: list) -> bool:
    """True if every one of ``names`` passes ``check_file_name`` at a glance; False: check them one by one.

    ``_plainly_safe`` for a whole listing at once: one regex search over the
    names joined by newlines (each line a name), ASCII, short and shallow,
    all counted over C iterators. A name holding a newline, or anything else
    unusual, makes it False.
    """
    if not names or set(map(type, names)) != {str}:
        return False
    joined = "\n".join(names)
    if not (joined.isascii() and joined.count("\n") == len(names) - 1
            and max(map(len, names)) <= _PLAIN_PATH_BYTES
            and max(map(operator.methodcaller("count", "/"), names)) < MAX_PATH_DEPTH):
        return False
    # Every component of every name between two slashes: one that is empty, "." or ".." shows as "//", "/./", "/../".
    components = "/" + joined.replace("\n", "/") + "/"
    return (not joined.encode("ascii").translate(None, _PLAIN_PATH_CHARACTERS)  # nothing left: no unsafe character
            and "//" not in components and "/./" not in components and "/../" not in components)


# What plain names are made of (and the newline between them): printable ASCII but the backslash. Substring
# scans and a translate, not a regex: a regex tries its alternatives at each of a listing's 300,000 characters.
_PLAIN_PATH_CHARACTERS = bytes(c for c in range(128) if c == 0x0A or (0x20 <= c < 0x7F and c != ord("\\")))


def _refuse_name(name: object, why: str) -> typing.NoReturn:
    raise RemoteProtocolError(f"bad file name {name!r}: {why}", ErrorCode.BAD_NAME, True)


def folder_of(name: str) -> str:
    """``"photos/2024/beach.jpg"`` -> ``"photos/2024/"``; ``""`` for a name at the top."""
    head, slash, _ = name.rpartition("/")
    return head + slash


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------

_REGISTRY: dict[str, type[Message]] = {}


@typing.dataclass_transform(frozen_default=True)
class Message:
    """Base of every message: a frozen dataclass that checks its field types.

    ``TYPE`` is the wire name. ``MAX_PAYLOAD`` is the largest payload this
    message may carry (0: none).

    Declaring a subclass makes it a dataclass (``dataclasses.fields`` lists
    its fields; no decorator is written). Its ``__init__``, ``__eq__``,
    ``__hash__``, ``__repr__`` and its refusal to change a field
    (``FrozenInstanceError``) are this class's, written once and behaving as
    ``@dataclass(frozen=True)`` would generate them: made per class (dataclasses
    compiles each with ``exec``) they cost every program ~20 ms to start.
    Fields take plain defaults (no ``default_factory``).
    """

    TYPE: ClassVar[str] = ""
    MAX_PAYLOAD: ClassVar[int] = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclass(cls, init=False, repr=False, eq=False)
        if any(field.default_factory is not MISSING for field in fields(cls)):
            raise TypeError(f"{cls.__qualname__}: a message field takes a plain default, not a default_factory")
        if cls.TYPE:
            _REGISTRY[cls.TYPE] = cls

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The fields by position or by name, as a dataclass takes them; ``TypeError`` otherwise."""
        names, defaults = _init_params(type(self))
        values = {**defaults, **dict(zip(names, args)), **kwargs}  # in field order: a key stays where it came first
        if len(args) > len(names) or len(values) > len(names) or not kwargs.keys().isdisjoint(names[:len(args)]) \
                or MISSING in values.values():
            raise TypeError(_bad_arguments(type(self), args, kwargs))
        self.__dict__.update(values)  # not through __setattr__, which refuses
        self.__post_init__()

    def __post_init__(self) -> None:
        for name, expected in _field_types(type(self)):
            _check_type(name, getattr(self, name), expected)
        self.validate()
        for name, expected in _field_types(type(self)):
            value = getattr(self, name)
            if expected is str and not _is_utf8(value):  # after validate(): a bad name stays BAD_NAME
                raise RemoteProtocolError(f"field {name!r} is not valid Unicode text", ErrorCode.BAD_REQUEST, True)

    def __eq__(self, other: object) -> bool:
        """Equal to a message of the same class whose fields are equal."""
        if other.__class__ is not self.__class__:
            return NotImplemented
        return _field_values(self) == _field_values(other)

    def __hash__(self) -> int:
        return hash(_field_values(self))

    @reprlib.recursive_repr()
    def __repr__(self) -> str:
        names = _init_params(type(self))[0]
        return f"{type(self).__qualname__}({', '.join(f'{name}={getattr(self, name)!r}' for name in names)})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def validate(self) -> None:
        """Check invariants beyond field types; raise ``RemoteProtocolError``."""

    def to_header(self) -> dict[str, Any]:
        """The JSON object that represents this message on the wire."""
        header = {"type": self.TYPE}
        header.update({name: getattr(self, name) for name in _init_params(type(self))[0]})
        return header


@functools.cache
def _init_params(kind: type[Message]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """What ``Message.__init__`` takes: the fields' names, and each one's default (``MISSING``: none), in order."""
    defaults = {field.name: field.default for field in fields(kind)}
    return tuple(defaults), defaults


def _field_values(message: Message) -> tuple:
    return tuple(getattr(message, name) for name in _init_params(type(message))[0])


def _bad_arguments(kind: type[Message], args: tuple, kwargs: dict[str, Any]) -> str:
    """Why ``kind(*args, **kwargs)`` builds no message: too many, unknown, repeated or missing fields."""
    names, defaults = _init_params(kind)
    given = {**dict(zip(names, args)), **kwargs}
    if len(args) > len(names):
        return f"{kind.__qualname__}() takes {len(names)} fields by position but {len(args)} were given"
    unknown = [name for name in kwargs if name not in defaults]
    twice = [name for name in kwargs if name in names[:len(args)]]
    missing = [name for name, default in defaults.items() if default is MISSING and name not in given]
    if unknown:
        return f"{kind.__qualname__}() got an unexpected keyword argument {unknown[0]!r}"
    if twice:
        return f"{kind.__qualname__}() got multiple values for argument {twice[0]!r}"
    return f"{kind.__qualname__}() missing required argument{'s' * (len(missing) > 1)}: {', '.join(map(repr, missing))}"


@functools.cache
def _field_types(kind: type[Message]) -> tuple[tuple[str, Any], ...]:
    """(name, type) of each field: cached, as resolving annotations is slow and every chunk builds messages."""
    hints = typing.get_type_hints(kind)
    return tuple((name, hints[name]) for name in _init_params(kind)[0])


def _check_type(name: str, value: Any, expected: Any) -> None:
    origin = typing.get_origin(expected) or expected
    if origin is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif origin is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, origin)
    if not ok:
        raise RemoteProtocolError(
            f"field {name!r} must be {origin.__name__}, got {type(value).__name__}",
            ErrorCode.BAD_REQUEST,
            recoverable=True,
        )


MAX_EPOCH = 2**63 - 1  # an epoch is stored as text in SQLite and must stay an ordinary integer


def _check_epoch(epoch: int) -> None:
    _require(0 <= epoch <= MAX_EPOCH, f"epoch {epoch} is outside 0..2**63-1", ErrorCode.OUT_OF_RANGE)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # JSON may carry lone surrogates ("\ud800"), which no file system or database takes
    except UnicodeEncodeError:
        return False
    return True


def _require(condition: bool, text: str, code: str = ErrorCode.BAD_REQUEST) -> None:
    if not condition:
        raise RemoteProtocolError(text, code, recoverable=True)


# Requests (imperative names) -------------------------------------------------


class Hello(Message):
    """First message on every connection: who is calling, which version."""

    TYPE = "hello"
    version: int
    role: str  # "client", or "main" for the main server's peer connections
    agent: str = ""
    epoch: int = 0  # the highest proven epoch the caller has seen (a client relays it with its proof)
    nonce: str = ""  # a peer's challenge to the server (see auth.py)
    epoch_server: str = ""  # a client: the server_id that issued ``epoch``
    epoch_proof: str = ""  # a client: that server's proof of ``epoch`` (Welcome.epoch_proof), relayed

    def validate(self) -> None:
        _check_epoch(self.epoch)


class ListFiles(Message):
    """Ask for catalog entries whose names contain ``search`` (any case), by name.

    With ``limit`` > 0, a cursor page: at most ``min(limit,
    MAX_LIST_PAGE_ENTRIES)`` entries after ``cursor`` (the previous page's
    ``next``; "" for the first page), in the reply's payload, in ``layout``
    if the server knows it (``LIST_LAYOUT_PACKED``), else as JSON objects: the
    reply says which. With ``limit`` 0, protocol 1's paging, kept for older
    clients: at most ``MAX_LIST_ENTRIES`` entries from ``offset``, in the
    reply's header. ``under`` (a folder ending in ``/``; cursor pages only):
    only the names in that folder, read by a range of the name key. A server
    older than the field ignores it and lists every name containing
    ``search``: a client asking for a folder sends its path as ``search``
    too, and keeps the names that start with it. ``counts`` false (cursor
    pages only): an entry's ``downloads`` may be 0, not read (a folder
    download needs none; they are half a folder page's cost to a server,
    which skips them where it reads a folder's whole page).
    """

    TYPE = "list"
    search: str = ""
    offset: int = 0
    cursor: str = ""
    limit: int = 0
    under: str = ""
    layout: str = ""  # the page layout the client reads best; a server that does not know it ignores it
    counts: bool = True  # a server older than the field reads them all the same

    def validate(self) -> None:
        _require(0 <= self.offset <= MAX_LIST_TOTAL, f"offset must be in 0..{MAX_LIST_TOTAL}", ErrorCode.OUT_OF_RANGE)
        _require(self.limit >= 0, "limit must not be negative", ErrorCode.OUT_OF_RANGE)
        parse_cursor(self.cursor)
        if self.under:
            _require(self.limit > 0, "under needs a cursor listing (a limit)")
            _require(self.under.endswith("/"), "under must be a folder ending in '/'", ErrorCode.BAD_NAME)
            check_folder_name(self.under[:-1])


def make_cursor(total: int, last_name: str) -> str:
    """The cursor of the page after ``last_name`` in a listing of ``total`` matches.

    The total rides along so that it is counted once per listing, on its
    first page, by a server that keeps no state between pages (and a backup
    that takes over mid-listing goes on from the same name).
    """
    return f"{total}:{last_name}"


def parse_cursor(cursor: str) -> tuple[int, str]:
    """``(total, last name)`` of a cursor; ``(0, "")`` for "" (the first page).

    Raises ``RemoteProtocolError``: BAD_REQUEST if it is not a cursor,
    OUT_OF_RANGE if its total is over ``MAX_LIST_TOTAL``, BAD_NAME if its
    name could not be a file's.
    """
    if not cursor:
        return 0, ""
    total, colon, name = cursor.partition(":")
    _require(bool(colon) and total.isascii() and total.isdigit() and len(total) <= 9,
             f"bad listing cursor {cursor[:80]!r}")
    _require(int(total) <= MAX_LIST_TOTAL, f"listing total {total} is over {MAX_LIST_TOTAL}",
             ErrorCode.OUT_OF_RANGE)
    return int(total), check_file_name(name)


class GetManifest(Message):
    """Ask for a file's manifest: sizes, whole-file and per-chunk SHA-256."""

    TYPE = "manifest"
    name: str

    def validate(self) -> None:
        check_file_name(self.name)


class CountFiles(Message):
    """Ask how many files the catalog holds and their total size."""

    TYPE = "count"


class GetChunk(Message):
    """Ask for chunk ``index`` of ``name``, as of the version ``sha256``."""

    TYPE = "get"
    name: str
    sha256: str
    index: int

    def validate(self) -> None:
        check_file_name(self.name)
        _require(self.index >= 0, f"chunk index {self.index} is negative", ErrorCode.OUT_OF_RANGE)


MAX_BATCH_FILES = 64  # files in one get_files: 64 paths of up to 1 KiB and their digests stay under the header limit


class GetFiles(Message):
    """Ask for several whole files of at most one chunk each, in one reply (``FilesData``).

    Thousands of small files then cost neither a round trip nor a frame each.
    ``sha256s[i]`` is the version of ``names[i]`` wanted, as in ``GetChunk``.
    """

    TYPE = "get_files"
    names: list
    sha256s: list

    def validate(self) -> None:
        _require(0 < len(self.names) <= MAX_BATCH_FILES, f"get_files asks for 1 to {MAX_BATCH_FILES} files",
                 ErrorCode.OUT_OF_RANGE)
        _require(len(self.sha256s) == len(self.names), "get_files needs one sha256 per name")
        for name in self.names:
            check_file_name(name)
        _require(all(isinstance(sha, str) and len(sha) == 64 for sha in self.sha256s),
                 "sha256s must be 64 hex characters each")


class ReportDownloaded(Message):
    """Tell the server a download of ``name`` finished and verified."""

    TYPE = "downloaded"
    name: str
    sha256: str

    def validate(self) -> None:
        check_file_name(self.name)


class ReportDownloadedMany(Message):
    """``ReportDownloaded`` for up to ``MAX_BATCH_FILES`` files at once (a folder's small files); answered ``Ok``."""

    TYPE = "downloaded_many"
    names: list
    sha256s: list

    def validate(self) -> None:
        GetFiles.validate(self)  # the same shape: names and their versions


class GetStatus(Message):
    """Ask for the server's metrics snapshot."""

    TYPE = "status"


# Replies (nouns) ---------------------------------------------------------------


class Welcome(Message):
    """Answer to ``Hello``: the server's version, role and epoch."""

    TYPE = "welcome"
    version: int
    role: str  # "active" or "standby"
    epoch: int
    server_id: str
    server: str = ""  # which program: "main" or "backup"
    primary: str = ""  # host:port of the server believed active, when this one is not
    nonce: str = ""  # to a peer: the server's challenge
    proof: str = ""  # to a peer: the server's answer to the peer's challenge
    epoch_proof: str = ""  # HMAC over (epoch, server_id) with the cluster secret: clients relay it
    features: str = ""  # space-separated: what it answers beyond protocol 1's first messages ("batches"; see FEATURES)

    def validate(self) -> None:
        _check_epoch(self.epoch)


class FileList(Message):
    """One page of catalog entries; ``total`` counts all matches (when the listing began).

    A cursor page (the answer to a ``list`` with a ``limit``) carries its
    entries in the payload, in ``layout`` ("": a JSON array of objects;
    ``LIST_LAYOUT_PACKED``: ``entries`` entries packed, see
    ``decode_list_page``) and ``next``, the cursor of the following page (""
    after the last). A page of protocol 1's paging carries them in
    ``files``, and no payload.
    """

    TYPE = "files"
    MAX_PAYLOAD = MAX_LIST_PAGE_PAYLOAD
    files: list
    total: int
    offset: int = 0
    next: str = ""
    layout: str = ""  # how the payload's entries are laid out; older servers send only JSON objects
    entries: int = 0  # how many entries a packed payload holds

    def validate(self) -> None:
        _require(all(isinstance(entry, dict) for entry in self.files), "files must be objects")
        _require(0 <= self.total <= MAX_LIST_TOTAL, f"listing total {self.total} is outside 0..{MAX_LIST_TOTAL}",
                 ErrorCode.OUT_OF_RANGE)
        _require(self.offset >= 0, "offset must not be negative", ErrorCode.OUT_OF_RANGE)
        _require(0 <= self.entries <= MAX_LIST_PAGE_ENTRIES,
                 f"a listing page holds 0..{MAX_LIST_PAGE_ENTRIES} entries, not {self.entries}", ErrorCode.OUT_OF_RANGE)
        parse_cursor(self.next)


def decode_list_page(payload: bytes | memoryview, layout: str = "", entries: int = 0) -> list[dict]:
    """The entries of a cursor page: dicts with the keys of ``LIST_ENTRY_KEYS`` (those a server sent, for JSON).

    ``layout`` and ``entries`` are the reply's (``FileList``). Raises
    ``RemoteProtocolError`` (BAD_REQUEST) unless the payload holds at most
    ``MAX_LIST_PAGE_ENTRIES`` entries, each with a text name: for "", a JSON
    array of objects; for ``LIST_LAYOUT_PACKED``, exactly ``entries`` packed
    entries (see ``pack_list_page``). The checks run over C iterators: a page
    is 5,000 entries. The caller checks the names' order (``Listing``).
    """
    if layout == LIST_LAYOUT_PACKED:
        return _decode_packed_page(bytes(payload), entries)
    _require(not layout, f"unknown listing page layout {layout[:40]!r}")
    try:
        decoded = json.loads(bytes(payload))
        names = list(map(operator.itemgetter("name"), decoded)) if type(decoded) is list else None
    except (ValueError, RecursionError, KeyError, TypeError) as error:
        raise RemoteProtocolError(f"bad listing page: {error!r}", ErrorCode.BAD_REQUEST, True) from error
    _require(names is not None and len(decoded) <= MAX_LIST_PAGE_ENTRIES
             and set(map(type, decoded)) <= {dict} and set(map(type, names)) <= {str},
             f"a listing page must be an array of at most {MAX_LIST_PAGE_ENTRIES} objects with a text name")
    return decoded


# The page layout a client asks for (``ListFiles.layout``): columns in raw bytes, no per-entry syntax.
LIST_LAYOUT_PACKED = "packed"
# The keys of a listing entry, and the order of a packed page's numbers (then its downloads column).
LIST_ENTRY_KEYS = ("name", "size", "chunks", "sha256", "root", "downloads", "added_at")
PACKED_NUMBERS = ("size", "chunks", "added_at")  # added_at in whole microseconds
PACKED_FIXED_BYTES = 8 * len(PACKED_NUMBERS) + 8 + 32 + 32  # per entry: numbers, downloads, two raw digests
_BIG_ENDIAN = sys.byteorder == "big"


def pack_list_page(entries: list[dict]) -> bytes:
    """A packed page of ``entries`` (dicts with the keys of ``LIST_ENTRY_KEYS``), by ``pack_list_columns``."""
    numbers = array("q", [round(e[key] * 1_000_000) if key == "added_at" else e[key]
                          for e in entries for key in PACKED_NUMBERS])
    downloads = array("q", [e["downloads"] for e in entries])
    if not _BIG_ENDIAN:
        numbers.byteswap()
        downloads.byteswap()
    return pack_list_columns(numbers.tobytes(), downloads.tobytes(),
                             bytes.fromhex("".join(e["sha256"] for e in entries)),
                             bytes.fromhex("".join(e["root"] for e in entries)),
                             "\n".join(e["name"] for e in entries).encode())


def pack_list_columns(numbers: bytes, downloads: bytes, sha256s: bytes, roots: bytes, names: bytes) -> bytes:
    """A packed page from its columns, as a server reads them (one SQL aggregate each).

    Layout, for n entries: n x 3 signed 64-bit big-endian integers (size,
    chunks, added_at in microseconds, entry by entry); n such integers, the
    download counts; n raw SHA-256 digests (32 bytes each); n raw roots (32
    bytes each); the n names in UTF-8, separated by "\n" (which no name
    holds: it is a control character). Raises ``ValueError`` unless every
    column holds the same number of entries.
    """
    count = len(downloads) // 8
    if not len(numbers) == 8 * len(PACKED_NUMBERS) * count or not len(downloads) == 8 * count \
            or not len(sha256s) == len(roots) == 32 * count \
            or names.count(b"\n") != max(count - 1, 0) or (not count and names):
        raise ValueError(f"the columns of a listing page do not hold {count} entries each")
    return b"".join((numbers, downloads, sha256s, roots, names))


def _decode_packed_page(payload: bytes, count: int) -> list[dict]:
    """``decode_list_page`` of a packed page of ``count`` entries: every column must hold exactly that many."""
    fixed = PACKED_FIXED_BYTES * count
    numbers_end = 8 * (len(PACKED_NUMBERS) + 1) * count  # and the downloads
    wrong = f"a packed listing page must hold exactly {count} entries (at most {MAX_LIST_PAGE_ENTRIES})"
    _require(0 <= count <= MAX_LIST_PAGE_ENTRIES and len(payload) >= fixed and (count or not payload), wrong)
    try:
        names = payload[fixed:].decode("utf-8").split("\n") if count else []
    except UnicodeDecodeError as error:
        raise RemoteProtocolError(f"bad listing page: names are not UTF-8: {error}", ErrorCode.BAD_REQUEST, True)
    _require(len(names) == count, wrong)
    numbers = array("q", payload[:numbers_end])
    if not _BIG_ENDIAN:
        numbers.byteswap()
    values = numbers.tolist()
    triples = 3 * count
    digests = list(map(bytes.hex, _digests_layout(count).unpack(payload[numbers_end:fixed])))  # sha256s, roots
    added_at = map(operator.truediv, values[2:triples:3], itertools.repeat(1_000_000))
    columns = zip(names, values[0:triples:3], values[1:triples:3], digests[:count], digests[count:],
                  values[triples:], added_at)
    return list(itertools.starmap(_list_entry, columns))  # a dict display: a third cheaper than dict(zip(...))


@functools.lru_cache(maxsize=4)  # pages are mostly full: one layout serves nearly every page
def _digests_layout(count: int) -> struct.Struct:
    """Both digest columns of a packed page of ``count`` entries, as 2 x ``count`` raw 32-byte digests."""
    return struct.Struct("32s" * (2 * count))


def _list_entry(name: str, size: int, chunks: int, sha256: str, root: str, downloads: int,
                added_at: float) -> dict:
    """One listing entry, keys in ``LIST_ENTRY_KEYS``' order."""
    return {"name": name, "size": size, "chunks": chunks, "sha256": sha256, "root": root, "downloads": downloads,
            "added_at": added_at}


class ManifestInfo(Message):
    """A manifest; the payload is the raw 32-byte chunk digests, in order.

    ``root`` binds the digests to the file (``integrity.hash_list_root``);
    a receiver refuses a manifest whose digests do not give it.
    """

    TYPE = "manifest_info"
    MAX_PAYLOAD = 32 * MAX_MANIFEST_CHUNKS
    name: str
    size: int
    chunk_size: int
    sha256: str
    chunks: int
    root: str = ""


class FileCount(Message):
    """Answer to ``CountFiles``."""

    TYPE = "file_count"
    files: int
    bytes: int


class ChunkData(Message):
    """A chunk; the payload is its bytes (checked by the receiver, never trusted)."""

    TYPE = "chunk"
    MAX_PAYLOAD = MAX_CHUNK_BYTES
    name: str
    index: int


class FilesData(Message):
    """Answer to ``GetFiles``: the payload is the files' bytes one after another.

    ``sizes[i]`` bytes belong to ``names[i]``; a file not served has size -1
    and its error code in ``errors[i]`` (``""`` for a file served). Every
    file is checked by the receiver against its SHA-256, never trusted.
    """

    TYPE = "files_data"
    MAX_PAYLOAD = MAX_CHUNK_BYTES
    sizes: list
    errors: list

    def validate(self) -> None:
        _require(len(self.sizes) == len(self.errors) <= MAX_LISTED_BATCH_FILES, "files_data: one size and error per file")
        _require(not self.sizes or (set(map(type, self.sizes)) == {int} and min(self.sizes) >= -1),  # C loops
                 "files_data sizes must be integers of at least -1")


class StatusInfo(Message):
    """Answer to ``GetStatus``: a metrics snapshot (see metrics.py)."""

    TYPE = "status_info"
    metrics: dict


class Ok(Message):
    """A plain acknowledgement."""

    TYPE = "ok"


class ErrorReply(Message):
    """A request failed; ``code`` is an ``ErrorCode``, ``message`` is for people."""

    TYPE = "error"
    code: str
    message: str


# Seeding: clients announce what they hold; the active server tracks them ------------

MAX_CLIENT_PAYLOAD = 1024 * 1024  # an announcement of thousands of files; all a stranger may make us hold


class Announce(Message):
    """A seeding client's holdings; payload: JSON ``{"files": [{"sha256", "have"}]}``.

    ``have`` is a base64 bitmap of the chunks held, or null for the whole
    file. ``port`` is where the client seeds; its host is the connection's,
    and its identity (which downloaders pin) the one it proved (``Identify``).
    """

    TYPE = "announce"
    MAX_PAYLOAD = MAX_CLIENT_PAYLOAD
    port: int

    def validate(self) -> None:
        _require(0 < self.port < 65536, f"port {self.port} is not a TCP port", ErrorCode.OUT_OF_RANGE)


class GetPeers(Message):
    """Ask for peers holding (part of) a file; ``port`` is the asker's own seed port, left out."""

    TYPE = "peers"
    sha256: str
    port: int = 0


class PeerList(Message):
    """Peers for a file: ``[{"host", "port", "have", "id"}]``, shuffled, at most 30 (``id``: the identity to pin)."""

    TYPE = "peer_list"
    peers: list


def chunks_to_bitmap(indexes: set[int], count: int) -> bytes:
    """One bit per chunk, set for those in ``indexes``."""
    bitmap = bytearray((count + 7) // 8)
    for index in indexes:
        bitmap[index // 8] |= 1 << (index % 8)
    return bytes(bitmap)


def bitmap_to_chunks(bitmap: bytes | memoryview, count: int) -> set[int]:
    """The chunk indexes whose bit is set (below ``count``).

    Empty bytes are skipped at C speed and a set byte costs one table
    lookup, so a sparse bitmap of a million chunks costs what it holds.
    """
    bitmap = bytes(bitmap)
    indexes: list[int] = []
    for match in _NONZERO_BYTE.finditer(bitmap):
        base = match.start() * 8
        indexes.extend([base + bit for bit in _BITS_OF_BYTE[bitmap[match.start()]]])
    if 8 * len(bitmap) > count:
        return {index for index in indexes if index < count}
    return set(indexes)


_NONZERO_BYTE = re.compile(rb"[^\x00]")
_BITS_OF_BYTE = [tuple(bit for bit in range(8) if value >> bit & 1) for value in range(256)]


def encode_holdings(files: dict[str, bytes | None]) -> bytes:
    """The payload of an ``Announce``: per SHA-256, a chunk bitmap or None (whole file)."""
    entries = [{"sha256": sha256, "have": encode_bitmap(have)} for sha256, have in files.items()]
    return json.dumps({"files": entries}, separators=(",", ":")).encode()


def decode_holdings(payload: bytes | memoryview) -> dict[str, bytes | None]:
    """Parse an ``Announce`` payload; ``RemoteProtocolError`` (BAD_REQUEST) if malformed."""
    try:
        document = json.loads(bytes(payload).decode())
        return {_sha256_field(entry["sha256"]): _bitmap_field(entry["have"]) for entry in document["files"]}
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        raise RemoteProtocolError(f"bad announcement: {error}", ErrorCode.BAD_REQUEST, True) from error


def encode_bitmap(have: bytes | None) -> str | None:
    """A chunk bitmap for a JSON header (base64), None for a whole file."""
    return None if have is None else base64.b64encode(have).decode()


def _sha256_field(value: object) -> str:
    if not isinstance(value, str) or len(value) != 64:
        raise ValueError("sha256 must be 64 hex characters")
    return value


def _bitmap_field(value: object) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("have must be base64 text or null")
    return base64.b64decode(value, validate=True)


# Batches named in the payload (servers whose welcome lists FEATURE_BATCHES) ------------

FEATURE_BATCHES = "batches"  # answers get_batch and downloaded_batch
FEATURES = FEATURE_BATCHES  # what this version's servers say in Welcome.features
MAX_LISTED_BATCH_FILES = 1024  # files in one batch: the files_data answering it has 1,024 sizes and codes, under 16 KiB
MAX_BATCH_LIST_BYTES = MAX_CLIENT_PAYLOAD  # a batch's payload (its names and versions): what a client may send


class GetBatch(Message):
    """``GetFiles`` for up to ``MAX_LISTED_BATCH_FILES`` files named in the payload (``encode_batch``).

    Answered by one ``FilesData``. A folder of 10,000 small files is ten of
    these, not 157 ``get_files``, and the names need no JSON header of their
    own. The server only looks the names up: one it does not share (or a
    name no rule allows, which it cannot share) gets size -1 and
    ``NOT_FOUND``, as in ``GetFiles``.
    """

    TYPE = "get_batch"
    MAX_PAYLOAD = MAX_BATCH_LIST_BYTES


class ReportDownloadedBatch(Message):
    """``ReportDownloadedMany`` for up to ``MAX_LISTED_BATCH_FILES`` files named in the payload; answered ``Ok``."""

    TYPE = "downloaded_batch"
    MAX_PAYLOAD = MAX_BATCH_LIST_BYTES


def encode_batch(names: list[str], sha256s: list[str]) -> bytes:
    """The payload of a ``GetBatch`` or ``ReportDownloadedBatch``: ``{"names": [...], "sha256s": [...]}``.

    Raises ``LocalProtocolError`` if it would break the limits a server checks (``decode_batch``).
    """
    payload = json.dumps({"names": names, "sha256s": sha256s}, ensure_ascii=False, separators=(",", ":")).encode()
    if not 0 < len(names) <= MAX_LISTED_BATCH_FILES or len(payload) > MAX_BATCH_LIST_BYTES:
        raise LocalProtocolError(f"a batch of {len(names)} files in {len(payload)} bytes breaks the batch limits")
    return payload


def batch_entry_bytes(name: str) -> int:
    """At most what one file adds to ``encode_batch``'s payload: a caller fills a batch to the byte limit with it.

    A character is at most 4 bytes of UTF-8, or 2 once JSON escapes it (a
    quote); its sha256 and the quotes and commas add 72.
    """
    return 4 * len(name) + 72


def decode_batch(payload: bytes | memoryview) -> tuple[list[str], list[str]]:
    """(names, sha256s) of a batch payload; ``RemoteProtocolError`` (BAD_REQUEST) unless it keeps the limits.

    1 to ``MAX_LISTED_BATCH_FILES`` names, each text of at most
    ``MAX_PATH_BYTES`` characters, and as many 64-character sha256s. Checked
    over C iterators: a batch is a thousand names. The names are not put
    through ``check_file_name`` here: a server only looks them up.
    """
    try:
        document = json.loads(bytes(payload))
        names, sha256s = document["names"], document["sha256s"]
    except (ValueError, RecursionError, KeyError, TypeError) as error:
        raise RemoteProtocolError(f"bad batch: {error!r}", ErrorCode.BAD_REQUEST, True) from error
    _require(type(names) is list and type(sha256s) is list and 0 < len(names) == len(sha256s) <= MAX_LISTED_BATCH_FILES,
             f"a batch names 1 to {MAX_LISTED_BATCH_FILES} files, one sha256 each", ErrorCode.OUT_OF_RANGE)
    _require(set(map(type, names)) == {str} == set(map(type, sha256s)), "a batch's names and sha256s must be text")
    _require(max(map(len, names)) <= MAX_PATH_BYTES and set(map(len, sha256s)) == {64},
             f"a batch's names are at most {MAX_PATH_BYTES} characters, its sha256s 64")
    _require(_is_utf8("\n".join(names)) and _is_utf8("".join(sha256s)),  # JSON may carry lone surrogates
             "a batch's names and sha256s must be valid Unicode text")
    return names, sha256s


# Peer messages: main server to backup, after authentication -------------------

MAX_DOCUMENT_BYTES = 64 * 1024 * 1024  # an inventory of ~300k files as JSON


class Authenticate(Message):
    """A peer's answer to the server's challenge (``Welcome.nonce``): the cluster-key proof and, as an
    ``Identify`` carries it, its certificate and a signature over the server's identity and that nonce."""

    TYPE = "auth"
    proof: str
    certificate: str = ""
    signature: str = ""

    def validate(self) -> None:
        _require(len(self.certificate) <= MAX_CERTIFICATE_CHARS and len(self.signature) <= 512,
                 "auth: certificate or signature too long")


class Heartbeat(Message):
    """The main is alive: its epoch, catalog version and client address."""

    TYPE = "heartbeat"
    epoch: int
    catalog_version: int
    address: str

    def validate(self) -> None:
        _check_epoch(self.epoch)


class HeartbeatAck(Message):
    """The backup's answer to a heartbeat: its own role and epoch."""

    TYPE = "heartbeat_ack"
    role: str
    epoch: int

    def validate(self) -> None:
        _check_epoch(self.epoch)


class GetInventory(Message):
    """Ask a replica what it holds; the reply's payload is a JSON document."""

    TYPE = "inventory"


class Inventory(Message):
    """Payload: JSON ``{"files": [{name, sha256, size, added_at, epoch}], "counters": {...}, "receiving": [name],
    "removed": [{name, sha256, epoch}]}`` (``epoch``: when the name last changed; ``removed``: its tombstones)."""

    TYPE = "inventory_info"
    MAX_PAYLOAD = MAX_DOCUMENT_BYTES


class ReplicateFile(Message):
    """Offer a file to the replica; the payload is its chunk digests."""

    TYPE = "replicate"
    MAX_PAYLOAD = 32 * MAX_MANIFEST_CHUNKS
    name: str
    size: int
    chunk_size: int
    sha256: str
    chunks: int
    added_at: float
    root: str = ""  # as in ManifestInfo

    def validate(self) -> None:
        check_file_name(self.name)


class ReplicaState(Message):
    """How much of a file the replica holds; payload: a bitmap of verified chunks."""

    TYPE = "replica_state"
    MAX_PAYLOAD = MAX_MANIFEST_CHUNKS // 8
    sha256: str
    complete: bool


class ReplicateChunk(Message):
    """One chunk of a file being replicated; the payload is its bytes."""

    TYPE = "replicate_chunk"
    MAX_PAYLOAD = MAX_CHUNK_BYTES
    sha256: str
    index: int

    def validate(self) -> None:
        _require(self.index >= 0, f"chunk index {self.index} is negative", ErrorCode.OUT_OF_RANGE)


class ChunkStored(Message):
    """A replicated chunk was verified and written; ``complete`` when the file is whole."""

    TYPE = "chunk_stored"
    sha256: str
    index: int
    complete: bool


class RemoveFile(Message):
    """The main no longer shares ``name``."""

    TYPE = "remove"
    name: str

    def validate(self) -> None:
        check_file_name(self.name)


class MergeCounters(Message):
    """Download counters to merge; payload: JSON ``{name: {origin: count}}``."""

    TYPE = "update"
    MAX_PAYLOAD = MAX_DOCUMENT_BYTES


class HandOver(Message):
    """The main asks the active backup to give the active role back."""

    TYPE = "handover"
    epoch: int

    def validate(self) -> None:
        _check_epoch(self.epoch)


class HandedOver(Message):
    """The backup stopped serving; payload: its final counters as JSON."""

    TYPE = "handed_over"
    MAX_PAYLOAD = MAX_DOCUMENT_BYTES
    epoch: int

    def validate(self) -> None:
        _check_epoch(self.epoch)


# Identities and pairing (see identity.py, tls.py, pairing.py, docs/security.md) ---------------

MAX_CERTIFICATE_CHARS = 4096  # a P-256 self-signed certificate is ~400 bytes of DER


class Identify(Message):
    """A client proves its identity: its certificate (base64 DER) and a signature over the server's
    identity and ``Welcome.nonce`` (see identity.identify_signature). Answered ``Ok``."""

    TYPE = "identify"
    certificate: str
    signature: str

    def validate(self) -> None:
        _require(len(self.certificate) <= MAX_CERTIFICATE_CHARS and len(self.signature) <= 512,
                 "identify: certificate or signature too long")


class PairStart(Message):
    """The client's first SPAKE2 message (base64) for the one-time code the operator gave it."""

    TYPE = "pair"
    message: str


class PairReply(Message):
    """The server's SPAKE2 message and its confirmation (both base64)."""

    TYPE = "pair_reply"
    message: str
    confirm: str


class PairConfirm(Message):
    """The client's confirmation (base64); the server answers ``Ok`` once the client is paired."""

    TYPE = "pair_confirm"
    confirm: str


class GetWebToken(Message):
    """A paired client asks for its token for the web face (``server.access: paired``); answered ``WebToken``."""

    TYPE = "get_web_token"


class WebToken(Message):
    """The asking client's token for the web face (a secret: 64 URL-safe characters, see server/tokens.py)."""

    TYPE = "web_token"
    token: str

    def validate(self) -> None:
        _require(0 < len(self.token) <= 128, "web_token: token must be 1 to 128 characters")


class PairedClients(Message):
    """Peer message: the main's list of paired clients; payload: JSON ``{"clients": [...]}``."""

    TYPE = "paired_clients"
    MAX_PAYLOAD = MAX_DOCUMENT_BYTES
    version: int


def fit_list_page(entries: list[dict]) -> list[dict]:
    """The longest prefix of ``entries`` (at least one) whose JSON fits a listing header."""
    size = 0
    for count, entry in enumerate(entries):
        size += len(json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode()) + 1
        if size > MAX_LIST_PAGE_BYTES and count > 0:
            return entries[:count]
    return entries


# --------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """A decoded frame: the message and its payload (possibly a memoryview)."""

    message: Message
    payload: bytes | memoryview = b""


def encode_head(message: Message, payload_len: int = 0) -> bytes:
    """Encode the prefix and header of a frame whose payload follows separately.

    Used with ``sendfile``: the caller sends these bytes, then exactly
    ``payload_len`` bytes. Raises ``LocalProtocolError`` if a limit is broken.
    """
    header = json.dumps(message.to_header(), ensure_ascii=False, separators=(",", ":")).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise LocalProtocolError(f"{message.TYPE} header is {len(header)} bytes, over the limit")
    if not 0 <= payload_len <= message.MAX_PAYLOAD:
        raise LocalProtocolError(f"{message.TYPE} may not carry a {payload_len}-byte payload")
    return PREFIX.pack(MAGIC, len(header), payload_len) + header


def encode_frame(message: Message, payload: bytes | memoryview = b"") -> bytes:
    """Encode a whole frame: prefix, header and payload."""
    return encode_head(message, len(payload)) + bytes(payload)


def parse_prefix(prefix: bytes | memoryview) -> tuple[int, int]:
    """Return ``(header_len, payload_len)`` from the fixed-size prefix.

    Raises ``RemoteProtocolError`` (not recoverable) for a wrong magic, an
    empty or oversized header, or a payload over the absolute limit.
    """
    magic, header_len, payload_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise RemoteProtocolError(f"not a MiniTorrent frame (starts with {bytes(magic)!r})")
    if not 0 < header_len <= MAX_HEADER_BYTES:
        raise RemoteProtocolError(f"header of {header_len} bytes is outside 1..{MAX_HEADER_BYTES}")
    if payload_len > MAX_PAYLOAD_BYTES:
        raise RemoteProtocolError(f"payload of {payload_len} bytes is over {MAX_PAYLOAD_BYTES}")
    return header_len, payload_len


def decode_header(raw: bytes | memoryview, payload_len: int) -> Message:
    """Decode a header into its ``Message`` and check the payload fits that type.

    A bad header in a well-formed frame raises a *recoverable*
    ``RemoteProtocolError`` (the stream is still in step, once the payload is
    skipped); a payload over the type's limit raises a non-recoverable one,
    because reading it would mean accepting the oversized allocation.
    """
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (ValueError, RecursionError) as error:  # bad UTF-8 or JSON, a 5000-digit int, deep nesting
        raise RemoteProtocolError(f"header is not UTF-8 JSON: {error}", ErrorCode.BAD_REQUEST, True)
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise RemoteProtocolError("header must be a JSON object with a 'type'", ErrorCode.BAD_REQUEST, True)
    kind = _REGISTRY.get(header["type"])
    if kind is None:
        raise RemoteProtocolError(f"unknown message type {header['type']!r}", ErrorCode.UNKNOWN_REQUEST, True)
    if payload_len > kind.MAX_PAYLOAD:
        raise RemoteProtocolError(f"{kind.TYPE} may not carry a {payload_len}-byte payload")
    defaults = _init_params(kind)[1]
    missing = sorted(name for name, default in defaults.items() if default is MISSING and name not in header)
    if missing:
        raise RemoteProtocolError(f"{kind.TYPE} is missing {', '.join(missing)}", ErrorCode.BAD_REQUEST, True)
    # Keys this version does not know are ignored so a newer peer's additions do not break us.
    return kind(**{k: v for k, v in header.items() if k in defaults})


@dataclass(frozen=True)
class Head:
    """A decoded frame head: the message, and how many payload bytes follow it."""

    message: Message
    payload_len: int


class FrameDecoder:
    """Incremental decoder: ``feed`` it bytes, take heads and payloads out.

    Two ways to use it. ``next_frame`` hands back whole ``Frame``s (the
    payload copied out of the decoder's buffer): what a test or a small peer
    wants. A transport that wants payloads to land in its own buffer calls
    ``next_head`` instead; it then owes the decoder that frame's payload:
    ``take_payload`` copies whatever part of it was already fed, and the
    transport reads the rest straight into the same buffer and reports it with
    ``payload_received`` (the protocol decides, the transport moves bytes).

    After a non-recoverable error the decoder is unusable (the stream is out
    of step) and keeps raising. A recoverable error is raised as soon as the
    header is read; the frame's payload is then dropped as it is fed
    (``discarding`` says some is still to come), so decoding goes on in step
    without ever holding a refused payload.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._broken: ProtocolError | None = None
        self._head: Head | None = None  # the frame whose payload is being taken
        self._payload_left = 0  # of that frame's payload, bytes not yet taken
        self._discard_left = 0  # of a refused frame's payload, bytes not yet fed

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet decoded (0: between frames, nothing of the next one seen)."""
        return len(self._buffer)

    @property
    def discarding(self) -> bool:
        """True while a refused frame's payload is still to be fed (and dropped)."""
        return self._discard_left > 0

    @property
    def payload_left(self) -> int:
        """Payload bytes of the current head not yet taken or received."""
        return self._payload_left

    def bytes_needed(self) -> int:
        """At least how many more bytes must be fed before the next head can be decoded (0: now)."""
        if self._discard_left or self._payload_left:
            return self._discard_left + self._payload_left - len(self._buffer)
        if len(self._buffer) < PREFIX_BYTES:
            return PREFIX_BYTES - len(self._buffer)
        _, header_len, _ = PREFIX.unpack(self._buffer[:PREFIX_BYTES])
        return max(0, PREFIX_BYTES + header_len - len(self._buffer))

    def feed(self, data: bytes | memoryview) -> None:
        """Append received bytes (those of a refused payload are dropped at once)."""
        if self._discard_left:
            dropped = min(len(data), self._discard_left)
            self._discard_left -= dropped
            data = data[dropped:]
        self._buffer += data

    def next_head(self, max_payload: int | None = None) -> Head | None:
        """Decode the next frame's prefix and header; ``None`` until they are whole.

        ``max_payload`` lowers the payload limit for this frame (a server takes
        none from an unauthenticated peer); it is checked from the prefix,
        before any of the payload is awaited. Raises ``ProtocolError``.
        """
        if self._broken:
            raise self._broken
        if self._payload_left:
            raise LocalProtocolError("the previous frame's payload was not taken")
        if len(self._buffer) < PREFIX_BYTES:
            return None
        header_len, payload_len = self._checked_prefix(max_payload)
        end_of_header = PREFIX_BYTES + header_len
        if len(self._buffer) < end_of_header:
            return None
        try:
            message = decode_header(self._buffer[PREFIX_BYTES:end_of_header], payload_len)
        except ProtocolError as error:
            if not error.recoverable:
                self._broken = error
                raise
            self._drop_refused(end_of_header, payload_len)
            raise
        del self._buffer[:end_of_header]
        self._head, self._payload_left = Head(message, payload_len), payload_len
        return self._head

    def take_payload(self, view: memoryview) -> int:
        """Copy the buffered part of the current payload into ``view``; how many bytes it was."""
        count = min(len(view), self._payload_left, len(self._buffer))
        view[:count] = self._buffer[:count]
        del self._buffer[:count]
        self._payload_left -= count
        return count

    def payload_received(self, count: int) -> None:
        """The transport put ``count`` payload bytes straight into its buffer (none were fed here)."""
        if count > self._payload_left or (count and self._buffer):
            raise LocalProtocolError("payload bytes received past the buffered ones, or past the frame")
        self._payload_left -= count

    def next_frame(self) -> Frame | None:
        """Return the next whole frame, ``None`` if incomplete; raise on bad input."""
        head = self._head if self._payload_left else self.next_head()
        if head is None or len(self._buffer) < self._payload_left:
            return None
        payload = bytes(self._buffer[: self._payload_left])
        del self._buffer[: self._payload_left]
        self._payload_left = 0
        return Frame(head.message, payload)

    def _checked_prefix(self, max_payload: int | None) -> tuple[int, int]:
        try:
            header_len, payload_len = parse_prefix(self._buffer[:PREFIX_BYTES])
            if max_payload is not None and payload_len > max_payload:
                raise RemoteProtocolError(f"a {payload_len}-byte payload is not accepted here (limit {max_payload})")
        except ProtocolError as error:
            self._broken = error
            raise
        return header_len, payload_len

    def _drop_refused(self, end_of_header: int, payload_len: int) -> None:
        """Forget a refused frame: what of its payload is here now, and the rest as it is fed."""
        end = end_of_header + payload_len
        self._discard_left = max(0, end - len(self._buffer))
        del self._buffer[:end]
