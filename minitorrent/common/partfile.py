"""One part-file lifecycle for everything that receives a file chunk by chunk.

The client's downloads, the backup's replicas and the main's failback fetch
all receive a file from the network into a partial file. They all follow
these steps, which live here and nowhere else:

1. **Create.** Only if the folder has room for the whole file (a size from
   the network must not fill a disk, nor leave a sparse giant behind), the
   part file is created with ``O_CREAT | O_EXCL`` (so it is ours: we made
   it) in the final name's folder, opened by descriptor, and recorded, with
   its identity (device and inode), in a ``PartialStore`` before a byte
   goes into it. A name already taken by a
   file we have no record of creating is never opened for writing, truncated
   or deleted: the next free name is used instead (``movie.bin.part``, then
   ``movie.bin.2.part``, ``movie.bin.3.part``...) and that file is left
   exactly as it was.
2. **Resume.** A recorded part file is reopened only while it is still the
   file we created (a regular file with the same device and inode, and the
   size we gave it, since a deleted file's inode number may be reused at
   once; a symlink is never followed, a FIFO never waited on), and every
   chunk recorded as verified is hashed again from disk before it is
   trusted; those that fail are forgotten and fetched again. A record made
   for another version of the file (another manifest) is discarded with its
   part file: chunks of two versions are never mixed.
3. **Record.** ``write_verified`` writes a chunk the caller has checked
   against the manifest (all of it: a short write is continued), then
   records it, one short SQLite transaction per chunk, so a process killed
   at any moment loses at most the chunks it was still receiving.
4. **Install.** Once every chunk is in and the whole-file SHA-256 (hashed in
   order by a background thread as chunks arrive, so it costs no extra pass)
   matches the manifest, the part file is fsynced, the open file itself (not
   whatever the part name holds by then) linked under the final name
   (``linkat`` never replaces a file that is there), the folder fsynced, the
   part name removed (if it still names that file) and the record finished.
   A run killed between the link and the record is tidied by the next
   ``open`` (or ``finish_interrupted_installs``): the final name holds the
   recorded inode. A local read or sync error while hashing is raised as
   such and keeps the part file: it is not taken for corruption.
5. **Discard.** A whole-file mismatch, or a caller that cancels for good,
   removes the part file (if it is still ours, checked right before the
   unlink) and its record (by its id).

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

import errno
import hashlib
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Callable, Iterator

from database import PartialState, PartialStore
from error_handler import IntegrityError, MiniTorrentError
from integrity import Manifest
from minitorrent.common.fs import opened_inside, read_exactly_at
from minitorrent.common.units import human_size

log = logging.getLogger(__name__)

PART_SUFFIX = ".part"
PART_NAME_ATTEMPTS = 100  # "<name>.part", then "<name>.2.part" ... "<name>.100.part"
# The most a part name adds to a file's name (".100.part"): a file name longer
# than 255 bytes minus this could not have all its part names on disk.
LONGEST_PART_SUFFIX_BYTES = len(f".{PART_NAME_ATTEMPTS}{PART_SUFFIX}")
SYNC_EVERY_BYTES = 64 * 1024 * 1024  # the hasher writes the part file back this often, not all at the end
PART_FILE_MODE = 0o644
# Opening a path we did not just create: never follow a symlink, never block on
# a FIFO, never make a terminal our controlling one.
_EXISTING = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
# What opening the recorded path may fail with when nothing of ours is there:
# gone, a symlink (O_NOFOLLOW), a socket, a folder. Anything else (EMFILE,
# EACCES, EIO) is a local fault, raised: our own part file must not be orphaned by it.
_NOT_OUR_FILE = frozenset({errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.EISDIR})


class PartFileRefused(MiniTorrentError):
    """No part file can be created for this file (the reason says why)."""


class NoFreePartName(PartFileRefused):
    """Every part name for a file is taken by files we did not create."""


class NotEnoughSpace(PartFileRefused):
    """The folder has less free space than the file needs; no part file was created."""


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

    def __init__(self, store: PartialStore, state: PartialState, final: Path, name: str, fd: int | None,
                 resumed: set[int], prove_whole_file: bool = True, folder: int | None = None) -> None:
        self._store = store
        self._state = state
        self.final = final
        self.name = name  # as the opener calls the file now (for messages): the record may hold an older name
        self.path = Path(state.part_path)
        self.manifest = state.manifest
        self.resumed = frozenset(resumed)
        self._fd = fd
        self._folder = folder  # the final name's folder, opened when the part file was: see open()
        self._lock = threading.Lock()
        self._verified = set(resumed)
        self._installed = fd is None  # see open(): a killed run had installed it already
        self._closed = self._installed
        self._follower: _InOrderHasher | _WriteBack | None = None
        if fd is not None:
            self._follower = _InOrderHasher(fd, self.manifest, resumed) if prove_whole_file else _WriteBack(fd, self.manifest)

    @classmethod
    def open(cls, store: PartialStore, final: Path, name: str, manifest: Manifest, part: Path,
             prove_whole_file: bool = True, inside: Path | None = None) -> PartFile:
        """Resume the recorded part file for ``final``, or create one (first free name from ``part``).

        The final name's folder (``part``'s too) is opened now; the part file
        is created, and the file installed, in that folder, whatever its path
        leads to later: a folder swapped for a link while the file arrives
        changes nothing. With ``inside``, the
        folder opened must lie inside it (its real path, whatever links led
        there), else ``PartFileRefused``.

        ``prove_whole_file`` False skips the second, whole-file SHA-256 pass:
        for a manifest whose digest list is bound to the file by its root
        (``Manifest.from_header`` checks it), every chunk verified against that
        list already proves the file, so each byte is hashed once.

        If a run was killed after giving the part file its final name, its
        bookkeeping is finished now and the result is already installed
        (``complete``; ``install`` only calls its callback). Raises
        ``OSError`` when the folder cannot be written, ``NoFreePartName``
        when every candidate name is taken by a file that is not ours,
        ``NotEnoughSpace`` when the folder cannot hold the file,
        ``CatalogError`` when another process recorded a part file for
        ``final`` at the same moment (its record and file are left alone).
        """
        state = store.partial_for(str(final))
        if state is not None and state.manifest != manifest:
            log.info("%s: the recorded partial file is of another version; discarding it", name)
            _discard(store, state)
            state = None
        if state is not None and _finish_interrupted_install(store, state, final):
            return cls(store, state, final, name, None, set(range(manifest.chunk_count)))
        folder = _open_folder(final.parent, inside)
        try:
            fd = _reopen_ours(state) if state is not None else None
            if fd is None:
                if state is not None:
                    store.abandon_partial(state.id)  # its part file is gone or no longer ours: the chunks went with it
                fd, state = _create(store, final, name, manifest, part, folder)
        except BaseException:
            os.close(folder)
            raise
        try:
            if not state.part_identity:  # recorded by a version that kept no identity; it always made the file
                store.set_part_identity(state.id, _identity(os.fstat(fd)))
            resumed = _recheck(store, fd, state)
        except BaseException:
            os.close(fd)
            os.close(folder)
            raise
        return cls(store, state, final, name, fd, resumed, prove_whole_file, folder)

    @property
    def verified(self) -> frozenset[int]:
        """The chunks written and recorded so far (any thread)."""
        with self._lock:
            return frozenset(self._verified)

    @property
    def verified_count(self) -> int:
        """How many chunks are written and recorded.

        Read without the lock (``len`` of a set is one atomic step): a progress
        report must not wait while another stream writes its chunk under it.
        """
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
        file was installed, discarded or closed, ``OSError`` if the chunk
        could not be written whole (it is then not recorded). Any thread.
        """
        offset, _ = self.manifest.chunk_span(index)
        with self._lock:  # also keeps the fd open while we write: close() takes this lock
            if self._closed:
                raise PartFileClosed(f"{self.name}: no longer receiving")
            if index in self._verified:
                return False
            _write_all_at(self._fd, data, offset)  # first the bytes (see the module docstring) ...
            self._store.mark_verified(self._state.id, [index])  # ... then the record that says so
            self._verified.add(index)
            made_complete = len(self._verified) == self.manifest.chunk_count
        self._follower.chunk_ready(index)
        return made_complete

    def install(self, on_installed: Callable[[Path], None] | None = None) -> None:
        """Prove the whole file and give it its final name; the part file and its record go.

        ``on_installed(final)`` runs once the final name is durable and before
        the part name is removed (a seeder switches files then). Raises
        ``IntegrityError`` when the whole-file SHA-256 differs (the part file
        is discarded), ``FinalNameTaken`` when a file appeared under the
        final name, ``OSError`` when the part file cannot be read back or
        synced (in both cases the part file and its record are kept, to be
        installed after the next ``open``).
        """
        with self._lock:
            installed = self._installed
            if not installed and (self._closed or len(self._verified) != self.manifest.chunk_count):
                raise PartFileClosed(f"{self.name}: not complete, or no longer receiving")
            self._closed = True  # no write may start now
        if installed:
            if on_installed is not None:
                on_installed(self.final)
            return
        try:
            self._prove_and_link(on_installed)
        finally:
            os.close(self._fd)
            os.close(self._folder)
        self._installed = True

    def _prove_and_link(self, on_installed: Callable[[Path], None] | None) -> None:
        digest = self._follower.finish()  # a local read or sync error is raised here: the part file is kept
        os.fsync(self._fd)
        ours = _identity(os.fstat(self._fd))
        if digest is not None and digest != self.manifest.sha256:
            _remove(self._store, self._state, ours)
            raise IntegrityError(f"{self.name}: whole-file SHA-256 does not match the manifest; discarded")
        _link_durably(self._fd, self._folder, self.final, self.path)
        if on_installed is not None:
            on_installed(self.final)
        # The part name goes before the record: killed in between, open() finds the
        # final name holding the recorded inode and finishes the bookkeeping.
        _unlink_if(self.path, ours, self._folder)
        self._store.finish_partial(self._state.id)

    def close(self) -> None:
        """Stop receiving and keep what is verified, to resume later. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._follower.cancel()
        os.close(self._fd)
        os.close(self._folder)

    def discard(self) -> None:
        """Stop receiving, delete the part file (if it is still ours) and its record."""
        self.close()
        if not self._installed:
            _discard(self._store, self._state)


def discard_recorded(store: PartialStore, final: Path) -> None:
    """Delete the recorded part file for ``final`` (only if it is still ours) and its record."""
    state = store.partial_for(str(final))
    if state is not None:
        _discard(store, state)


def finish_interrupted_installs(store: PartialStore) -> int:
    """Finish the bookkeeping of every file a killed run had already installed; how many there were.

    For records whose owner may never open them again (their final file
    exists, so the owner sees nothing to receive).
    """
    return sum(_finish_interrupted_install(store, state, Path(state.dest_path)) for state in store.in_progress())


def part_names(part: Path) -> Iterator[Path]:
    """The names a part file may take: ``part`` itself, then numbered ones before its suffix."""
    yield part
    for number in range(2, PART_NAME_ATTEMPTS + 1):
        yield part.with_name(f"{part.stem}.{number}{part.suffix}")


def _identity(status: os.stat_result) -> str:
    return f"{status.st_dev}:{status.st_ino}"


def _write_all_at(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``pwrite`` until every byte is written (a write may be short); ``OSError`` if none can be."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(errno.EIO, f"no byte written at offset {offset}")
        view, offset = view[written:], offset + written


def _require_space(folder: Path, folder_fd: int, size: int, name: str) -> None:
    """Refuse, before anything is created, a file the folder has no room for (a size comes from the network)."""
    status = os.fstatvfs(folder_fd)
    available = status.f_bavail * status.f_frsize
    if size > available:
        raise NotEnoughSpace(f"{name}: needs {human_size(size)} ({size} bytes) in {folder}, "
                             f"which has {human_size(available)} ({available} bytes) free")


def _create(store: PartialStore, final: Path, name: str, manifest: Manifest, part: Path,
            folder: int) -> tuple[int, PartialState]:
    """Create the first free part name with O_EXCL in the open ``folder`` (``part``'s and ``final``'s) and record it.

    In the folder opened, not by its path: a folder swapped for a link since
    then gets no part file (the bytes would arrive outside the output folder).
    """
    _require_space(part.parent, folder, manifest.size, name)
    for candidate in part_names(part):
        try:
            fd = os.open(candidate.name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PART_FILE_MODE,
                         dir_fd=folder)
        except FileExistsError:
            continue
        if candidate != part:
            log.warning("%s: %s exists and is not a partial file of ours: left untouched; receiving into %s",
                        name, part, candidate.name)
        try:
            os.ftruncate(fd, manifest.size)  # sized before it is recorded: the size is part of how we know it
            return fd, store.begin_partial(str(final), name, manifest, str(candidate), _identity(os.fstat(fd)))
        except BaseException:
            os.close(fd)
            os.unlink(candidate.name, dir_fd=folder)  # we created it a moment ago and recorded nothing in it
            raise
    raise NoFreePartName(f"{name}: {part} and {PART_NAME_ATTEMPTS - 1} numbered names are taken by other files")


def _open_existing(path: str, flags: int) -> int | None:
    """``path`` opened without following, blocking or a terminal; None if nothing of ours can be there."""
    try:
        return os.open(path, flags | _EXISTING)
    except OSError as error:
        if error.errno in _NOT_OUR_FILE:
            return None
        raise


def _reopen_ours(state: PartialState) -> int | None:
    """The recorded part file, opened, if it is still the one we created; None otherwise."""
    fd = _open_existing(state.part_path, os.O_RDWR)
    if fd is not None and not _is_ours(fd, state):
        os.close(fd)
        log.warning("%s: %s is no longer the file we created: left untouched", state.name, state.part_path)
        return None
    return fd


def _is_ours(fd: int, state: PartialState) -> bool:
    """True if ``fd`` is the part file ``state`` records: a regular file, same inode, the size we gave it.

    The size matters because a deleted file's inode number is often handed
    to the very next file created in the folder. A version 1 record kept no
    identity; that version always sized its own part file, so the size decides.
    """
    status = os.fstat(fd)
    same_inode = not state.part_identity or _identity(status) == state.part_identity
    return stat.S_ISREG(status.st_mode) and same_inode and status.st_size == state.manifest.size


def _finish_interrupted_install(store: PartialStore, state: PartialState, final: Path) -> bool:
    """True if the final name already holds the recorded part file's inode (a run killed while installing).

    Its bookkeeping is finished then: the part name removed (if it still
    names that inode) and the record finished.
    """
    if not state.part_identity:
        return False
    try:
        status = os.lstat(final)
    except FileNotFoundError:
        return False
    if not (stat.S_ISREG(status.st_mode) and _identity(status) == state.part_identity
            and status.st_size == state.manifest.size):
        return False
    log.info("%s: installed by an earlier run that stopped before tidying up; tidied now", state.name)
    _unlink_if(Path(state.part_path), state.part_identity)
    store.finish_partial(state.id)
    return True


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


def _open_folder(folder: Path, inside: Path | None) -> int:
    """A descriptor of ``folder``; with ``inside``, ``PartFileRefused`` unless its real path lies inside that."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    if inside is not None and not opened_inside(fd, os.path.realpath(inside)):
        os.close(fd)
        raise PartFileRefused(f"{folder} leads outside {inside} (through a link); refused")
    return fd


def _link_durably(fd: int, folder: int, final: Path, part: Path) -> None:
    """Give the open file ``fd`` the name ``final`` in the open ``folder`` (never replacing a file there), durably.

    Linked from the open file, not from the part name: whatever was renamed
    onto the part name since it was hashed never gets the final name. Into
    the folder opened with the part file, not by its path: a folder swapped
    for a link since then does not take the file elsewhere.
    ``dst_dir_fd`` makes ``os.link`` call linkat with AT_SYMLINK_FOLLOW, which
    resolves ``/proc/self/fd/N`` to the file itself.
    """
    try:
        os.link(f"/proc/self/fd/{fd}", final.name, dst_dir_fd=folder)
    except FileExistsError as error:
        raise FinalNameTaken(f"{final} appeared meanwhile; kept {part.name}") from error
    except FileNotFoundError as error:  # the file has no name left: linkat will not give it one
        raise OSError(errno.ENOENT, f"{part} was deleted or replaced before it got its final name") from error
    os.fsync(folder)


def _unlink_if(path: Path, identity: str, folder: int | None = None) -> bool:
    """Remove ``path`` if it names the file of that identity, compared right before the unlink.

    With ``folder`` (the open folder ``path`` is in), the name is looked up there, not along ``path``.
    """
    name = path if folder is None else path.name
    try:
        status = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if _identity(status) != identity:
        log.warning("%s is no longer the file we created: left untouched", path)
        return False
    os.unlink(name, dir_fd=folder)
    return True


def _remove(store: PartialStore, state: PartialState, identity: str) -> None:
    """Drop the record, then (only if this call dropped it) the part file if it still has ``identity``."""
    if store.abandon_partial(state.id):  # else another holder discarded it, and may have begun anew at that name
        _unlink_if(Path(state.part_path), identity)


def _discard(store: PartialStore, state: PartialState) -> None:
    """Delete the recorded part file if it is still ours, and the record (by its id)."""
    fd = _open_existing(state.part_path, os.O_RDONLY)
    if fd is None:
        store.abandon_partial(state.id)
        return
    try:
        if _is_ours(fd, state):
            _remove(store, state, _identity(os.fstat(fd)))
        else:
            store.abandon_partial(state.id)
    finally:
        os.close(fd)


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
        self._error: Exception | None = None
        self._hash = hashlib.sha256()
        self._thread = threading.Thread(target=self._run, name="whole-file-hash", daemon=True)
        self._thread.start()

    def chunk_ready(self, index: int) -> None:
        """Chunk ``index`` is verified and written; any thread."""
        with self._cond:
            self._ready.add(index)
            self._cond.notify()

    def finish(self) -> str:
        """Wait for every chunk to be hashed; the whole-file SHA-256 (call once all are ready).

        Raises the ``OSError`` that stopped the hashing (a read or a sync of
        the part file failed): a local fault, not a sign the bytes are wrong.
        """
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()

    def cancel(self) -> None:
        """Stop hashing (the file will not be completed now) and wait for the thread."""
        with self._cond:
            self._cancelled = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        try:
            self._hash_in_order()
        except Exception as error:  # kept for finish(): the thread has no one else to tell
            self._error = error

    def _hash_in_order(self) -> None:
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
                raise OSError(errno.EIO, f"the part file ends before offset {offset + length}")
            self._hash.update(view)
            unsynced += length
            if unsynced >= SYNC_EVERY_BYTES:
                os.fdatasync(self._fd)  # write back during the transfer, not all in the final fsync
                unsynced = 0


class _WriteBack:
    """Writes the part file back every ``SYNC_EVERY_BYTES`` of verified chunks, in its own thread.

    Used instead of ``_InOrderHasher`` when the chunks alone prove the file:
    the writers only count bytes (no wake-up per chunk), and the final
    ``fsync`` then writes back only the tail, not the whole file at the end.
    """

    def __init__(self, fd: int, manifest: Manifest) -> None:
        self._fd = fd
        self._manifest = manifest
        self._lock = threading.Lock()
        self._unsynced = 0
        self._due = threading.Event()
        self._stopped = False
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="write-back", daemon=True)
        self._thread.start()

    def chunk_ready(self, index: int) -> None:
        """Chunk ``index`` is verified and written; any thread."""
        with self._lock:
            self._unsynced += self._manifest.chunk_span(index)[1]
            due = self._unsynced >= SYNC_EVERY_BYTES
            if due:
                self._unsynced = 0
        if due:
            self._due.set()

    def finish(self) -> None:
        """Stop the thread; raises the ``OSError`` a write-back met (a local fault). No digest: None."""
        self.cancel()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """End the thread (after a write-back it is doing)."""
        self._stopped = True
        self._due.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            if self._stopped:
                return
            try:
                os.fdatasync(self._fd)  # write back during the transfer, not all in the final fsync
            except OSError as error:  # kept for finish(): the install must not go on
                self._error = error
                return
