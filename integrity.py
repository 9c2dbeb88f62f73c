"""Streaming SHA-256 and file manifests: the integrity half of DESIGN principle 3.

A file's ``Manifest`` holds its size, its chunk size, the SHA-256 of every
chunk and the SHA-256 of the whole file. A receiver checks each chunk against
its digest before writing it; once every chunk has passed, the file is the
one the digest list describes, and no second pass over it is needed.

The digest list is bound to the file by the manifest's ``root``: the SHA-256
of a short prefix (the layout: size and chunk size) and the digests, a hash
list. A manifest from the network must carry the root its digests give
(``from_header``), so a digest list cannot be swapped or cut without the
file's identity changing with it. The plain SHA-256 of the whole file stays
in the manifest for people who compare with ``sha256sum``: the server
computes it once, when the file is added, in the same read as the digests.

Nothing here reads a whole file into memory (principle 6): files are read in
blocks of at most ``READ_BLOCK_BYTES`` into one reused buffer with
``readinto``, and hashed through ``memoryview`` slices, so memory stays flat
whatever the file size. Every function is safe to call from any thread; none
keeps state between calls.
"""
from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator, Mapping

from error_handler import IntegrityError

DIGEST_BYTES = 32  # length of a raw SHA-256 digest
MAX_CHUNK_SIZE_BYTES = 16 * 1024 * 1024  # as transfer.chunk_size allows; a manifest from the wire may not exceed it

# Large enough that hashlib drops the GIL and the syscall cost is amortised,
# small enough that hashing a 64 GiB file still needs only this one buffer.
READ_BLOCK_BYTES = 1024 * 1024

# The whole-file hash runs on a second thread while this one hashes chunks
# (hashlib releases the GIL on big buffers, so that uses two cores). Below this
# size handing a block to the worker costs more than it saves.
PARALLEL_MIN_BYTES = 256 * 1024

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_ROOT_PREFIX = b"MiniTorrent hash list v1\0"  # a root is never the plain SHA-256 of any 32-byte-aligned file

ProgressCallback = Callable[[int], None]


# ---------------------------------------------------------------- chunk maths


def chunk_count(size: int, chunk_size: int) -> int:
    """Return how many chunks a file of ``size`` bytes has: 0 when empty.

    Raises ``ValueError`` when ``size`` is negative or ``chunk_size`` is not
    positive.
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    return -(-size // chunk_size)


def chunk_span(index: int, size: int, chunk_size: int) -> tuple[int, int]:
    """Return ``(offset, length)`` of chunk ``index``; only the last may be short.

    Raises ``ValueError`` when ``index`` is negative or not below the count.
    """
    count = chunk_count(size, chunk_size)
    if not 0 <= index < count:
        raise ValueError(f"chunk index {index} out of range (file has {count} chunks)")
    offset = index * chunk_size
    return offset, min(chunk_size, size - offset)


# ------------------------------------------------------------------ hashing


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """Return the lowercase hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(
    path: str | os.PathLike, *, on_progress: ProgressCallback | None = None
) -> str:
    """Return the lowercase hex SHA-256 of the file at ``path``, streaming it.

    ``on_progress(n)`` is called on this thread after each block of ``n``
    bytes. ``OSError`` from opening or reading the file propagates.
    """
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as source:
        for block in _read_blocks(source):
            digest.update(block)
            if on_progress is not None:
                on_progress(len(block))
    return digest.hexdigest()


def _read_blocks(source: BinaryIO, limit: int | None = None) -> Iterator[memoryview]:
    """Yield successive blocks of ``source`` until EOF or ``limit`` bytes.

    Every block is a view of ONE reused buffer: it is valid only until the
    next block is requested, so a consumer must finish with it first.
    """
    buffer = memoryview(bytearray(READ_BLOCK_BYTES))
    remaining = limit
    while remaining is None or remaining > 0:
        want = len(buffer) if remaining is None else min(len(buffer), remaining)
        count = source.readinto(buffer[:want])
        if not count:
            return
        if remaining is not None:
            remaining -= count
        yield buffer[:count]


def _write_all(target: BinaryIO, data: memoryview) -> None:
    """Write all of ``data``; a raw (unbuffered) file may take it in parts."""
    while data:
        written = target.write(data)
        if not written:
            raise OSError("copy target accepted no bytes")
        data = data[written:]


class _ChunkHasher:
    """Splits a byte stream, fed block by block, into per-chunk digests."""

    def __init__(self, chunk_size: int) -> None:
        self._chunk_size = chunk_size
        self._hash = hashlib.sha256()
        self._filled = 0

    def feed(self, block: memoryview) -> Iterator[bytes]:
        """Hash ``block``, yielding the digest of each chunk it completes."""
        position = 0
        while position < len(block):
            take = min(len(block) - position, self._chunk_size - self._filled)
            self._hash.update(block[position : position + take])
            position += take
            self._filled += take
            if self._filled == self._chunk_size:
                yield self._hash.digest()
                self._hash, self._filled = hashlib.sha256(), 0

    def finish(self) -> bytes | None:
        """Return the digest of the short last chunk, or None if there is none."""
        return self._hash.digest() if self._filled else None


class _BackgroundHash:
    """One SHA-256 whose updates run on a worker thread, one block at a time.

    ``start(block)`` must be followed by ``wait()`` before the block's buffer
    is reused. Use as a context manager so the worker thread always ends.
    """

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sha256-whole")
        self._pending: Future | None = None

    def start(self, block: memoryview) -> None:
        if len(block) < PARALLEL_MIN_BYTES:
            self.hash.update(block)
        else:
            self._pending = self._pool.submit(self.hash.update, block)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def __enter__(self) -> "_BackgroundHash":
        return self

    def __exit__(self, *exc_info: object) -> None:
        # shutdown(wait=True) also lets a still-running update finish before
        # the buffer it reads goes away.
        self._pool.shutdown(wait=True)


def _stream_chunk_digests(
    source: BinaryIO,
    chunk_size: int,
    *,
    whole: _BackgroundHash | None = None,
    copy_to: BinaryIO | None = None,
    on_progress: ProgressCallback | None = None,
    limit: int | None = None,
) -> Iterator[bytes]:
    """Read ``source`` once, yielding each chunk's raw digest in order.

    Every byte read also goes to ``whole`` and ``copy_to`` when given.
    """
    chunks = _ChunkHasher(chunk_size)
    for block in _read_blocks(source, limit):
        if whole is not None:
            whole.start(block)
        if copy_to is not None:
            _write_all(copy_to, block)
        yield from chunks.feed(block)
        if whole is not None:
            whole.wait()
        if on_progress is not None:
            on_progress(len(block))
    tail = chunks.finish()
    if tail is not None:
        yield tail


# ----------------------------------------------------------------- manifest


def _require_int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass, but True is never a meaningful size.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"manifest {name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"manifest {name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Manifest:
    """What a file must be: size, chunk size, whole-file and per-chunk SHA-256.

    ``chunk_digests`` is the concatenation of one raw 32-byte digest per chunk.
    ``root`` is their hash list root (``hash_list_root``): computed when not
    given; when given (read back from a catalog, received in a header) it
    must be the one the digests give. Building one checks itself and raises
    ``ValueError`` when a field has the wrong type or the fields disagree, so
    a ``Manifest`` in hand is consistent.
    """

    size: int
    chunk_size: int
    sha256: str
    chunk_digests: bytes | memoryview = field(repr=False)  # bytes, or a read-only view nobody else changes
    root: str = ""

    def __post_init__(self) -> None:
        _require_int("size", self.size, 0)
        _require_int("chunk_size", self.chunk_size, 1)
        if not isinstance(self.sha256, str) or not _SHA256_HEX.fullmatch(self.sha256):
            raise ValueError("manifest sha256 must be 64 lowercase hex characters")
        if not isinstance(self.chunk_digests, (bytes, bytearray, memoryview)):
            raise ValueError("manifest chunk_digests must be bytes")
        # Store immutable bytes even when handed a (reused) receive buffer. A read-only view is taken as
        # owned (the transport hands out one over a buffer nobody else holds) and kept: no second copy of
        # a digest list that may be 128 MiB.
        if not (isinstance(self.chunk_digests, memoryview) and self.chunk_digests.readonly):
            object.__setattr__(self, "chunk_digests", bytes(self.chunk_digests))
        expected = DIGEST_BYTES * self.chunk_count
        if len(self.chunk_digests) != expected:
            raise ValueError(
                f"manifest has {len(self.chunk_digests)} bytes of chunk digests, "
                f"expected {expected} for {self.chunk_count} chunks"
            )
        root = hash_list_root(self.size, self.chunk_size, self.chunk_digests)  # 15 ms per million chunks
        if self.root and self.root != root:
            raise ValueError("manifest root does not match its chunk digests")
        object.__setattr__(self, "root", root)

    @property
    def chunk_count(self) -> int:
        """Number of chunks; 0 for an empty file."""
        return chunk_count(self.size, self.chunk_size)

    def chunk_span(self, index: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``index``; ``ValueError`` if out of range."""
        return chunk_span(index, self.size, self.chunk_size)

    def chunk_digest(self, index: int) -> bytes:
        """Raw 32-byte digest of chunk ``index``; ``ValueError`` if out of range."""
        self.chunk_span(index)
        start = index * DIGEST_BYTES
        return bytes(self.chunk_digests[start : start + DIGEST_BYTES])

    def verify_chunk(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """True when ``data`` has chunk ``index``'s exact length and digest.

        Raises ``ValueError`` only when ``index`` is out of range.
        """
        return self._chunk_problem(index, data) is None

    def check_chunk(
        self, index: int, data: bytes | bytearray | memoryview, *, label: str = ""
    ) -> None:
        """Return if ``data`` is chunk ``index``; else raise ``IntegrityError``.

        The one-line message names the chunk index, prefixed by ``label``
        (typically the file name) when given. ``ValueError`` if ``index`` is
        out of range.
        """
        problem = self._chunk_problem(index, data)
        if problem is not None:
            prefix = f"{label}: " if label else ""
            raise IntegrityError(f"{prefix}chunk {index} {problem}")

    def _chunk_problem(self, index: int, data: bytes | bytearray | memoryview) -> str | None:
        _offset, length = self.chunk_span(index)
        received = memoryview(data).nbytes
        if received != length:
            return f"has {received} bytes, expected {length}"
        if hashlib.sha256(data).digest() != self.chunk_digest(index):
            return "failed SHA-256 verification"
        return None

    def __hash__(self) -> int:
        return hash((self.size, self.chunk_size, self.sha256, self.root))  # the root stands for the digests

    def to_header(self) -> dict:
        """JSON-safe fields for a protocol header; the digests travel apart as
        a binary payload of ``32 * chunks`` bytes."""
        return {
            "size": self.size,
            "chunk_size": self.chunk_size,
            "sha256": self.sha256,
            "chunks": self.chunk_count,
            "root": self.root,
        }

    @classmethod
    def from_header(cls, header: Mapping, chunk_digests: bytes) -> "Manifest":
        """Rebuild a manifest from ``to_header()`` output and its digest payload.

        Raises ``ValueError`` with a readable message when a field is missing,
        has the wrong type, the chunk count disagrees with the digests, or
        the header's ``root`` is not the one the digests give.
        """
        if not isinstance(header, Mapping):
            raise ValueError("manifest header must be a mapping")
        missing = [key for key in ("size", "chunk_size", "sha256", "chunks") if key not in header]
        if missing:
            raise ValueError(f"manifest header lacks {', '.join(missing)}")
        manifest = cls(header["size"], header["chunk_size"], header["sha256"], chunk_digests)
        if manifest.chunk_size > MAX_CHUNK_SIZE_BYTES:  # a receiver allocates one chunk: a sender must not choose
            raise ValueError(f"chunk_size {manifest.chunk_size} is over {MAX_CHUNK_SIZE_BYTES}")
        chunks = _require_int("chunks", header["chunks"], 0)
        if chunks != manifest.chunk_count:
            raise ValueError(
                f"manifest header says {chunks} chunks, size and chunk_size give "
                f"{manifest.chunk_count}"
            )
        if header.get("root") != manifest.root:  # last: a chunk_size over the limit is named as such
            raise ValueError("manifest root does not match its chunk digests (or is missing)")
        return manifest


def hash_list_root(size: int, chunk_size: int, chunk_digests: bytes | memoryview) -> str:
    """The hex root of a hash list: SHA-256 over a prefix naming the layout, then every chunk digest in order."""
    digest = hashlib.sha256(_ROOT_PREFIX)
    digest.update(size.to_bytes(8, "big") + chunk_size.to_bytes(8, "big"))
    digest.update(chunk_digests)
    return digest.hexdigest()


def build_manifest(
    source: BinaryIO,
    chunk_size: int,
    *,
    copy_to: BinaryIO | None = None,
    on_progress: ProgressCallback | None = None,
) -> Manifest:
    """Read ``source`` to EOF once and return its manifest.

    Chunk digests and the whole-file hash come from the same single read.
    With ``copy_to`` every byte read is also written there, so a file can be
    copied into a store while it is hashed. ``on_progress(n)`` is called on
    the calling thread after each block of ``n`` bytes. ``ValueError`` if
    ``chunk_size`` is not positive; I/O errors propagate.
    """
    _require_int("chunk_size", chunk_size, 1)
    digests = bytearray()
    size = 0

    def count(n: int) -> None:
        nonlocal size
        size += n
        if on_progress is not None:
            on_progress(n)

    with _BackgroundHash() as whole:
        for digest in _stream_chunk_digests(
            source, chunk_size, whole=whole, copy_to=copy_to, on_progress=count
        ):
            digests += digest
    return Manifest(size, chunk_size, whole.hash.hexdigest(), bytes(digests))


def manifest_of_file(
    path: str | os.PathLike,
    chunk_size: int,
    *,
    copy_to: BinaryIO | None = None,
    on_progress: ProgressCallback | None = None,
) -> Manifest:
    """``build_manifest`` of the file at ``path``; ``OSError`` if unreadable."""
    with open(path, "rb", buffering=0) as source:
        return build_manifest(source, chunk_size, copy_to=copy_to, on_progress=on_progress)


def bad_chunks(
    path: str | os.PathLike,
    manifest: Manifest,
    *,
    on_progress: ProgressCallback | None = None,
) -> list[int]:
    """Re-hash the file at ``path``; return, ascending, the chunk indexes that
    do not match ``manifest``.

    Chunks cut short by EOF, or wholly beyond it, are bad; a missing file
    therefore has every chunk bad. Bytes past ``manifest.size`` are ignored.
    Other ``OSError``s propagate.
    """
    try:
        source = open(path, "rb", buffering=0)
    except FileNotFoundError:
        return list(range(manifest.chunk_count))
    bad: list[int] = []
    seen = 0
    with source:
        digests = _stream_chunk_digests(
            source, manifest.chunk_size, on_progress=on_progress, limit=manifest.size
        )
        for index, digest in enumerate(digests):
            if digest != manifest.chunk_digest(index):
                bad.append(index)
            seen = index + 1
    bad.extend(range(seen, manifest.chunk_count))
    return bad
