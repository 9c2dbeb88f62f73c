"""One part-file lifecycle for everything that receives a file chunk by chunk.

The client's downloads, the backup's replicas and the main's failback fetch
all receive a file from the network into a partial file. They all follow
these steps, which live here and nowhere else:

1. **Create.** The part file is created with ``O_CREAT | O_EXCL`` (so it is
   ours: we made it) and recorded, with its identity (device and inode), in
   a ``PartialStore`` before a byte goes into it. A name already taken by a
   file we have no record of creating is never opened for writing, truncated
   or deleted: the next free name is used instead (``movie.bin.part``, then
   ``movie.bin.2.part``, ``movie.bin.3.part``...) and that file is left
   exactly as it was.
2. **Resume.** A recorded part file is reopened only while it is still the
   file we created (same device and inode, and the size we gave it, since
   a deleted file's inode number may be reused at once; a symlink is never
   followed), and every
   chunk recorded as verified is hashed again from disk before it is
   trusted; those that fail are forgotten and fetched again. A record made
   for another version of the file (another manifest) is discarded with its
   part file: chunks of two versions are never mixed.
3. **Record.** ``write_verified`` writes a chunk the caller has checked
   against the manifest, then records it, one short SQLite transaction per
   chunk, so a process killed at any moment loses at most the chunks it was
   still receiving.
4. **Install.** Once every chunk is in and the whole-file SHA-256 (hashed in
   order by a background thread as chunks arrive, so it costs no extra pass)
   matches the manifest, the part file is fsynced, linked under the final
   name (``os.link`` never replaces a file that is there), the folder is
   fsynced, the record finished, and the part name removed.
5. **Discard.** A whole-file mismatch, or a caller that cancels for good,
   removes the part file (if it is still ours) and its record.

Ordering, and why there is no fsync per chunk: a chunk's bytes are written
(``pwrite``, into the page cache) *before* the transaction that records
them commits. A killed process (even SIGKILL) loses neither: both are in the
kernel's hands. A power cut may lose the last few commits (WAL with
``synchronous=NORMAL``), which only means fewer chunks recorded; or it may
keep a record whose bytes never reached the disk, which is harmless because
step 2 hashes every recorded chunk again and step 4 hashes the whole file
before anything gets its final name. The record is a hint that saves a
fetch, never a proof; the hashes are the proof.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Iterator

from database import PartialState, PartialStore
from error_handler import IntegrityError, MiniTorrentError
from integrity import Manifest
from minitorrent.common.fs import fsync_dir, read_exactly_at

log = logging.getLogger(__name__)

PART_NAME_ATTEMPTS = 100  # "<name>.part", then "<name>.2.part" ... "<name>.100.part"
SYNC_EVERY_BYTES = 64 * 1024 * 1024  # the hasher writes the part file back this often, not all at the end
PART_FILE_MODE = 0o644


class NoFreePartName(MiniTorrentError):
    """Every part name for a file is taken by files we did not create."""


class FinalNameTaken(MiniTorrentError):
    """A file appeared under the final name while the part file was filled; the part file is kept."""


class PartFileClosed(MiniTorrentError):
    """A chunk arrived for a part file already installed, discarded or closed."""


class PartFile:
    """One file being received: its part file on disk and its record. Thread-safe.

    Open one with ``PartFile.open``; any thread may then call
    ``write_verified``; one thread calls ``install`` when ``complete``,
    and ``close`` in every case (after ``install`` it does nothing).
    """

    def __init__(self, store: PartialStore, state: PartialState, final: Path, fd: int, resumed: set[int]) -> None:
        self._store = store
        self._state = state
        self.final = final
        self.path = Path(state.part_path)
        self.manifest = state.manifest
        self.resumed = frozenset(resumed)
        self._fd = fd
        self._lock = threading.Lock()
        self._verified = set(resumed)
        self._closed = False
        self._hasher = _InOrderHasher(fd, self.manifest, resumed)

    @classmethod
    def open(cls, store: PartialStore, final: Path, name: str, manifest: Manifest, part: Path) -> PartFile:
        """Resume the recorded part file for ``final``, or create one (first free name from ``part``).

        Raises ``OSError`` when the folder cannot be written, ``NoFreePartName``
        when every candidate name is taken by a file that is not ours.
        """
        state = store.partial_for(str(final))
        if state is not None and state.manifest != manifest:
            log.info("%s: the recorded partial file is of another version; discarding it", name)
            _discard(store, state)
            state = None
        fd = _reopen_ours(store, state) if state is not None else None
        if fd is None:
            fd, state = _create(store, final, name, manifest, part)
        try:
            resumed = _recheck(store, fd, state)
        except BaseException:
            os.close(fd)
            raise
        return cls(store, state, final, fd, resumed)

    @property
    def name(self) -> str:
        """The file's name (as the sender calls it)."""
        return self._state.name

    @property
    def verified(self) -> frozenset[int]:
        """The chunks written and recorded so far (any thread)."""
        with self._lock:
            return frozenset(self._verified)

    @property
    def verified_count(self) -> int:
        """How many chunks are written and recorded."""
        with self._lock:
            return len(self._verified)

    def has(self, index: int) -> bool:
        """True if chunk ``index`` is written and recorded."""
        with self._lock:
            return index in self._verified

    @property
    def complete(self) -> bool:
        """True once every chunk is written and recorded."""
        return self.verified_count == self.manifest.chunk_count

    def write_verified(self, index: int, data: bytes | memoryview) -> bool:
        """Write chunk ``index``, already checked against the manifest, then record it.

        Returns True if this very call made the file complete (so exactly one
        caller goes on to ``install``). Raises ``PartFileClosed`` once the
        file was installed, discarded or closed. Any thread.
        """
        offset, _ = self.manifest.chunk_span(index)
        with self._lock:  # also keeps the fd open while we write: close() takes this lock
            if self._closed:
                raise PartFileClosed(f"{self.name}: no longer receiving")
            if index in self._verified:
                return False
            os.pwrite(self._fd, data, offset)  # first the bytes (see the module docstring) ...
            self._store.mark_verified(self._state.id, [index])  # ... then the record that says so
            self._verified.add(index)
            made_complete = len(self._verified) == self.manifest.chunk_count
        self._hasher.chunk_ready(index)
        return made_complete

    def install(self, on_installed: Callable[[Path], None] | None = None) -> None:
        """Prove the whole file and give it its final name; the part file and its record go.

        ``on_installed(final)`` runs once the final name is durable and before
        the part name is removed (a seeder switches files then). Raises
        ``IntegrityError`` when the whole-file SHA-256 differs (the part file
        is discarded), ``FinalNameTaken`` when a file appeared under the
        final name (the part file is kept, to be installed later).
        """
        with self._lock:
            if self._closed or len(self._verified) != self.manifest.chunk_count:
                raise PartFileClosed(f"{self.name}: not complete, or no longer receiving")
            self._closed = True  # no write may start now
        digest = self._hasher.finish()
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
        if digest != self.manifest.sha256:
            _discard(self._store, self._state)
            raise IntegrityError(f"{self.name}: whole-file SHA-256 does not match the manifest; discarded")
        try:
            os.link(self.path, self.final)  # unlike rename, never replaces a file that appeared meanwhile
        except FileExistsError as error:
            raise FinalNameTaken(f"{self.final} appeared meanwhile; kept {self.path.name}") from error
        fsync_dir(self.final.parent)
        if on_installed is not None:
            on_installed(self.final)
        self._store.finish_partial(self._state.id)
        self.path.unlink()

    def close(self) -> None:
        """Stop receiving and keep what is verified, to resume later. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._hasher.cancel()
        os.close(self._fd)

    def discard(self) -> None:
        """Stop receiving, delete the part file (it is ours) and its record."""
        self.close()
        _discard(self._store, self._state)


def discard_recorded(store: PartialStore, final: Path) -> None:
    """Delete the recorded part file for ``final`` (only if it is still ours) and its record."""
    state = store.partial_for(str(final))
    if state is not None:
        _discard(store, state)


def part_names(part: Path) -> Iterator[Path]:
    """The names a part file may take: ``part`` itself, then numbered ones before its suffix."""
    yield part
    for number in range(2, PART_NAME_ATTEMPTS + 1):
        yield part.with_name(f"{part.stem}.{number}{part.suffix}")


def _identity(fd: int) -> str:
    stat = os.fstat(fd)
    return f"{stat.st_dev}:{stat.st_ino}"


def _create(store: PartialStore, final: Path, name: str, manifest: Manifest, part: Path) -> tuple[int, PartialState]:
    """Create the first free part name with O_EXCL and record it as ours."""
    for candidate in part_names(part):
        try:
            fd = os.open(candidate, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PART_FILE_MODE)
        except FileExistsError:
            continue
        if candidate != part:
            log.warning("%s: %s exists and is not a partial file of ours: left untouched; receiving into %s",
                        name, part, candidate.name)
        try:
            os.ftruncate(fd, manifest.size)  # sized before it is recorded: the size is part of how we know it
            return fd, store.begin_partial(str(final), name, manifest, str(candidate), _identity(fd))
        except BaseException:
            os.close(fd)
            candidate.unlink()  # we created it a moment ago and recorded nothing in it
            raise
    raise NoFreePartName(f"{name}: {part} and {PART_NAME_ATTEMPTS - 1} numbered names are taken by other files")


def _reopen_ours(store: PartialStore, state: PartialState) -> int | None:
    """The recorded part file, opened, if it is still the one we created; None otherwise."""
    try:
        fd = os.open(state.part_path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:  # gone, or a symlink put in its place: start afresh
        return None
    if not _is_ours(fd, state):
        os.close(fd)
        log.warning("%s: %s is no longer the file we created: left untouched", state.name, state.part_path)
        return None
    if not state.part_identity:  # recorded by a version that kept no identity; it always made the file itself
        store.set_part_identity(state.id, _identity(fd))
    return fd


def _is_ours(fd: int, state: PartialState) -> bool:
    """True if ``fd`` is the part file ``state`` records: same inode, and the size we gave it.

    The size matters because a deleted file's inode number is often handed
    to the very next file created in the folder. A version 1 record kept no
    identity; that version always sized its own part file, so the size decides.
    """
    stat = os.fstat(fd)
    same_inode = not state.part_identity or f"{stat.st_dev}:{stat.st_ino}" == state.part_identity
    return same_inode and stat.st_size == state.manifest.size


def _recheck(store: PartialStore, fd: int, state: PartialState) -> set[int]:
    """The recorded chunks whose bytes on disk still match the manifest; the others are forgotten."""
    good = {index for index in state.verified if _chunk_on_disk_ok(fd, state.manifest, index)}
    if good != state.verified:
        log.warning("%s: %d recorded chunks failed a recheck and will be fetched again",
                    state.name, len(state.verified - good))
        store.forget_verified(state.id, state.verified - good)
    return good


def _chunk_on_disk_ok(fd: int, manifest: Manifest, index: int) -> bool:
    offset, length = manifest.chunk_span(index)
    view = memoryview(bytearray(length))
    return read_exactly_at(fd, view, offset) and manifest.verify_chunk(index, view)


def _discard(store: PartialStore, state: PartialState) -> None:
    """Delete the recorded part file if it is still ours, then the record."""
    try:
        fd = os.open(state.part_path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        fd = None
    if fd is not None:
        ours = _is_ours(fd, state)
        os.close(fd)
        if ours:
            Path(state.part_path).unlink(missing_ok=True)
    store.abandon_partial(state.dest_path)


class _InOrderHasher:
    """Hashes the file in order as its chunks become verified, in its own thread.

    Reading back from the page cache is cheap; doing it alongside the transfer
    means the whole-file SHA-256 is ready the moment the last chunk lands.
    """

    def __init__(self, fd: int, manifest: Manifest, ready: set[int]) -> None:
        self._fd = fd
        self._manifest = manifest
        self._ready = set(ready)
        self._cond = threading.Condition()
        self._cancelled = False
        self._hash = hashlib.sha256()
        self._thread = threading.Thread(target=self._run, name="whole-file-hash", daemon=True)
        self._thread.start()

    def chunk_ready(self, index: int) -> None:
        """Chunk ``index`` is verified and written; any thread."""
        with self._cond:
            self._ready.add(index)
            self._cond.notify()

    def finish(self) -> str:
        """Wait for every chunk to be hashed; the whole-file SHA-256 (call once all are ready)."""
        self._thread.join()
        return self._hash.hexdigest()

    def cancel(self) -> None:
        """Stop hashing (the file will not be completed now) and wait for the thread."""
        with self._cond:
            self._cancelled = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        buffer = bytearray(self._manifest.chunk_size)
        unsynced = 0
        for index in range(self._manifest.chunk_count):
            with self._cond:
                while index not in self._ready and not self._cancelled:
                    self._cond.wait()
                if self._cancelled:
                    return
                self._ready.discard(index)
            offset, length = self._manifest.chunk_span(index)
            view = memoryview(buffer)[:length]
            if not read_exactly_at(self._fd, view, offset):
                return  # cannot happen after ftruncate; the digest then simply will not match
            self._hash.update(view)
            unsynced += length
            if unsynced >= SYNC_EVERY_BYTES:
                os.fdatasync(self._fd)  # write back during the transfer, not all in the final fsync
                unsynced = 0
