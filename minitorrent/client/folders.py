"""Downloading a folder: every file under ``photos/``, structure kept, each verified.

A folder is the catalog names that start with ``photos/`` (server/folder_scan.py).
``client.py get photos/`` lists them (the listing pages are the one request
that names many files), then:

* A file of more than one chunk goes through ``Downloader.download``: its
  own part file, peers, failover and resume as for any single file. So does
  a one-chunk file of at least ``PEER_WORTHY_BYTES`` that a seeding client
  holds (the tracker is asked about them first, in pipelined rounds).
* A file of at most one chunk (most of a tree of thousands of small files)
  needs no manifest request: with one chunk, the chunk's SHA-256 *is* the
  file's SHA-256, which the listing already carries. So the listing is the
  batch of manifests, and the small files are fetched on one connection in
  batches (up to ``BATCH_BYTES`` of files in one reply), ``BATCHES_IN_FLIGHT``
  of them outstanding: ``get_batch`` (names in the payload, up to
  ``MAX_LISTED_BATCH_FILES``) from a server whose welcome lists the
  ``batches`` feature, ``get_files`` (``MAX_BATCH_FILES``) from an older one.

The small files' life keeps the single-file guarantees without paying an
``fsync``, a rename and a database commit per file:

1. Each reply is verified (length and SHA-256) in memory, then written to
   the folder's staged tree, ``DIR/.minitorrent-incoming/folder-<key>/``, at
   its path inside the folder (``_StagedFolder``). One content shared under
   two names is fetched once and staged as two links.
2. One ``syncfs`` makes every staged file durable at once.
3. The staged tree is moved to the folder's final place with one
   ``renameat2(RENAME_NOREPLACE)`` (``common/fs.rename_noreplace``: never
   replaces anything) when nothing is there yet; where the folder is there
   already (an earlier run, the user's own files), folder by folder and file
   by file the same way. Each folder touched is fsynced once. The final
   folders are opened by descriptor, one name at a time from the output
   folder's, and checked to lie inside it: a link another process plants in
   the output folder once the names were checked leads nothing out
   (``_FolderFds``).
4. The download counts go to the server in ``downloaded_batch`` requests
   (``downloaded_many`` to an older server), each batch's as soon as it is
   staged, between the next batch requests: a file is counted once its
   bytes are verified, and the server counts while we write.

A crash at any point resumes: final names are only ever verified, durable
content, and a staged tree is reused on the next run file by file, each
kept only if its bytes still hash to its version (a local read of a few
KiB, not a fetch), anything else in it removed. A lock file beside the
staged tree keeps a second download of the same folder into the same place
out while one runs (the kernel drops it when its process dies). When the
server in use goes, the small files still missing are asked of whichever
server is active (as a single download fails over). Files below
``PEER_WORTHY_BYTES`` come from the servers only: asking a peer for 4 KiB
costs more than it saves.
"""
from __future__ import annotations

import bisect
import errno
import fcntl
import hashlib
import itertools
import logging
import operator
import os
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

from error_handler import ConnectionFailed, DownloadCancelled, DownloadError, MiniTorrentError, RemoteError
from minitorrent.client.downloader import STAGING, Downloader, destination
from minitorrent.client.progress import FILE_DONE, FILE_FAILED, FILE_VERIFIED, Progress
from minitorrent.common.fs import opened_inside, regular_file_sha256, rename_noreplace, sync_filesystem
from minitorrent.net.remote import MAX_RECONNECT_DELAY_S, ServerClient, ServerSession
from minitorrent.wire import protocol
from minitorrent.wire.protocol import ProtocolError, check_file_name, check_folder_name

log = logging.getLogger(__name__)

REPORTS_IN_FLIGHT = 8  # report frames (up to 1 MiB each) sent before their answers (tiny) are read
BATCH_BYTES = 1024 * 1024  # file bytes asked for in one get_batch or get_files: a reply is at most this (the receive buffer)
# The names and versions of one get_batch, at most (a get_files header's size): the requests in flight stay
# well inside the server's receive buffer, so our sending them never waits on its sending us a reply.
BATCH_REQUEST_BYTES = 64 * 1024
BATCHES_IN_FLIGHT = 4  # batch requests outstanding: the server reads the next batch while we write this one
REQUESTS_IN_FLIGHT_BYTES = BATCHES_IN_FLIGHT * BATCH_REQUEST_BYTES  # batches and reports of them, at most
PROGRESS_EVERY_FILES = 64  # the folder's progress is told every this many small files, not 10,000 times
# A one-chunk file this big is worth a download of its own when a peer holds it (P2P, as for any file): a
# batch carries only a few such files anyway, so batching saves little and the server pays it all.
PEER_WORTHY_BYTES = 256 * 1024
PEER_QUESTIONS_IN_FLIGHT = 64  # tracker questions per round: their replies (30 peers each) never fill a buffer


@dataclass
class FolderResult:
    """What ``download_folder`` did: counts, bytes, and one line per file that failed."""

    folder: str
    path: Path
    files: int = 0
    downloaded: int = 0
    present: int = 0
    size: int = 0
    fetched_bytes: int = 0
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)  # as DownloadResult's: windows show both alike

    @property
    def outcome(self) -> str:
        """"already present" when every file was there already, else "downloaded" (as DownloadResult's)."""
        return "already present" if self.files and self.present == self.files else "downloaded"


class _Asked(NamedTuple):
    """A request in flight on a folder download's connection."""

    files: list[_Small]
    fetch: bool  # a batch asked for (answered by files_data), else a report of staged files (answered by ok)
    size: int  # its names' bytes: what the server holds unread until it gets to it


class _Small(NamedTuple):  # a tuple: 10,000 of them are made as fast as a listing is read
    name: str
    size: int
    sha256: str
    final: str  # a plain path string: 10,000 Path objects cost more than the syscalls they name


def folder_entries(server: ServerClient, folder: str) -> list[dict]:
    """The catalog entries in ``folder`` (``photos/``), sorted by name; ``DownloadError`` if none."""
    try:
        check_folder_name(folder.rstrip("/"))
    except ProtocolError as error:
        raise DownloadError(str(error)) from error
    prefix = folder.rstrip("/") + "/"
    listed = server.list_files(prefix, under=prefix, counts=False)  # a download needs no download counts
    entries = sorted((e for e in listed if str(e.get("name", "")).startswith(prefix)), key=lambda e: e["name"])
    if not entries:
        raise DownloadError(f"{prefix}: no such folder on the server")
    return entries


class FolderDownload:
    """One folder download; ``run`` does it in the caller's thread."""

    def __init__(self, downloader: Downloader, folder: str, output_dir: Path, cancel: threading.Event,
                 on_progress: Callable[[Progress], None] | None) -> None:
        self.downloader = downloader
        self.server = downloader.server
        self.folder = folder.rstrip("/") + "/"
        self.output_dir = Path(output_dir)
        self.cancel = cancel
        self.on_progress = on_progress
        self.result = FolderResult(self.folder, self.output_dir / self.folder)
        self._staged = 0  # small files staged in this run
        self._staging: _StagedFolder | None = None  # while small files are staged and placed
        self._changes: list[tuple[str, str]] = []  # files whose state changed since the last progress report
        self._unreported: deque[_Small] = deque()  # staged in this run, not reported to the server yet
        self._listed: dict[str, set[str]] = {}  # output folder -> the names in it when first looked at

    def run(self) -> FolderResult:
        """Download every file of the folder; failures of single files are listed, not raised."""
        started = time.monotonic()
        entries = folder_entries(self.server, self.folder)
        self.result.files = len(entries)
        self.result.size = sum(int(e.get("size", 0)) for e in entries)
        small, large = self._split(entries)
        self._notify()
        if small:
            self._small_files(small)
        for entry in large:
            self._large_file(entry["name"])
        if self._changes:  # the last large file failed: its row must say so too
            self._notify()
        self.result.seconds = time.monotonic() - started
        return self.result

    def _split(self, entries: list[dict]) -> tuple[list[_Small], list[dict]]:
        """Small files (at most one chunk, already present ones counted) and the rest."""
        small, large = [], []
        inside = _InsideCheck(self.output_dir, protocol.plainly_safe_names([entry.get("name") for entry in entries]))
        present = self._present if os.path.lexists(self.result.path) else _absent  # a first download: nothing there
        for entry in entries:
            try:
                final = inside.destination(entry["name"])
                size, sha256, chunks = int(entry["size"]), str(entry["sha256"]), int(entry["chunks"])
                if chunks > 1:
                    large.append(entry)
                elif not 0 <= size <= protocol.MAX_CHUNK_BYTES:  # a lie: it would size the receive buffer, or
                    # (negative) be neither fetched nor staged, so missing with no line said
                    raise DownloadError(f"{entry['name']}: listed as {size} bytes in one chunk "
                                        f"(a chunk holds 0 to {protocol.MAX_CHUNK_BYTES})")
                elif present(final, sha256):
                    self._changes.append((entry["name"], FILE_DONE))
                else:
                    small.append(_Small(entry["name"], size, sha256, final))
            except (KeyError, TypeError, ValueError) as error:
                self._failed(entry.get("name"), f"{entry.get('name')!r}: a malformed listing entry ({error})")
            except DownloadError as error:
                self._failed(entry.get("name"), str(error))
        held = self._held_by_peers([file.sha256 for file in small if file.size >= PEER_WORTHY_BYTES])
        large += [{"name": file.name} for file in small if file.sha256 in held]
        return [file for file in small if file.sha256 not in held], large

    def _held_by_peers(self, contents: list[str]) -> set[str]:
        """Which of ``contents`` some seeding client holds: the tracker is asked in pipelined rounds."""
        requests = [protocol.GetPeers(sha256, self.downloader.seed_port()) for sha256 in dict.fromkeys(contents)]

        def ask(session: ServerSession) -> list[protocol.Message]:
            replies = []
            for start in range(0, len(requests), PEER_QUESTIONS_IN_FLIGHT):
                window = requests[start:start + PEER_QUESTIONS_IN_FLIGHT]
                session.connection.send_many(window)
                replies += [session.receive(protocol.PeerList).message for _ in window]
            return replies

        try:
            replies = self.server.try_call(ask) if requests else None
        except MiniTorrentError as error:  # the tracker would not say: the servers serve them, as before
            log.debug("%s: no peers asked: %s", self.folder, error)
            replies = None
        return {request.sha256 for request, reply in zip(requests, replies or []) if reply.peers}

    def _present(self, final: str, sha256: str) -> bool:
        """True (and counted) if ``final`` holds that content; ``DownloadError`` if it holds another."""
        folder, _, name = final.rpartition("/")
        if name not in self._names_in(folder):
            return False
        if regular_file_sha256(final) != sha256:  # opened, then checked: a FIFO swapped in cannot block us
            raise DownloadError(f"{final} already exists with different content; not overwriting it")
        self.result.present += 1
        return True

    def _names_in(self, folder: str) -> set[str]:
        """What ``folder`` holds, listed once: one listing a folder, not a stat a file (usually it is not there yet)."""
        names = self._listed.get(folder)
        if names is None:
            try:
                names = set(os.listdir(folder))
            except (FileNotFoundError, NotADirectoryError):
                names = set()
            self._listed[folder] = names
        return names

    def _large_file(self, name: str) -> None:
        self._check_cancel()
        try:
            outcome = self.downloader.download(name, self.output_dir, self.cancel)
        except DownloadCancelled:
            raise
        except DownloadError as error:
            self._failed(name, str(error))
            return
        self._changes.append((name, FILE_DONE))
        self.result.fetched_bytes += outcome.fetched_bytes
        if outcome.outcome == "downloaded":
            self.result.downloaded += 1
        else:
            self.result.present += 1
        self._notify()

    # Small files -----------------------------------------------------------------

    def _small_files(self, files: list[_Small]) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            fds = _FolderFds(str(self.output_dir))
        except OSError as error:  # a file where the folder goes, no permission, a read-only file system
            raise DownloadError(f"{self.folder}: cannot write in {self.output_dir}: {error.strerror or error}") from error
        seconds: list[_Small] | None = None  # the second names of a content placed; None: stopped before placing
        try:
            try:
                self._staging = _StagedFolder(fds, self.folder)
            except OSError as error:  # the staging folder cannot be made or opened (a file or a link there)
                raise DownloadError(f"{self.folder}: cannot stage in {self.output_dir / STAGING}: "
                                    f"{error.strerror or error}") from error
            try:
                seconds = self._stage_and_place(files)
            finally:
                self._staging.close()
        except OSError as error:  # the disk failed syncing or placing (EIO, ENOSPC): one line, not a traceback
            raise DownloadError(f"{self.folder}: cannot place it in {self.output_dir}: {error.strerror or error}; "
                                "what was verified is kept") from error
        finally:
            fds.close()
            # Also what was staged and never reported (no fetch ran; or a pause or a failure: a later run places
            # it as kept, uncounted). A folder that stopped tries once: a pause must not wait on a server gone.
            self._report([*self._unreported, *(seconds or [])], patient=seconds is not None)

    def _stage_and_place(self, files: list[_Small]) -> list[_Small]:
        """Stage each file not staged already (one fetch a content), then place them all; the second names of a
        content placed (staged as links, reported by none of ``_pump``'s reports)."""
        first_of: dict[str, _Small] = {}
        for file in files:
            first_of.setdefault(file.sha256, file)  # the first name of a content fetches it, the others link to it
        kept = self._staging.reuse({file.name: file for file in first_of.values()})
        missing = [file for file in first_of.values() if file.name not in kept]
        self._stage([(f, b"") for f in missing if f.size == 0])  # nothing to fetch: staged as it is
        self._fetch(deque(f for f in missing if f.size > 0))
        return [file for file in self._install(files, first_of) if first_of[file.sha256] is not file]

    def _fetch(self, missing: deque[_Small]) -> None:
        """Fetch every file in ``missing`` into staging; fail over between servers like a single download."""
        last_progress, delay = time.monotonic(), 0.05
        while missing:
            before = len(missing)
            try:
                pool = self.server.active_pool()
                try:
                    with pool.session() as session:
                        self._pump(session, missing)
                except ConnectionFailed:
                    self.server.forget(pool)  # the next attempt asks every server who is active
                    raise
            except ConnectionFailed as error:
                if len(missing) < before:
                    last_progress, delay = time.monotonic(), 0.05
                if time.monotonic() - last_progress > self.server.retry_deadline_s:
                    raise DownloadError(f"{self.folder}: server unreachable: {error}") from error
                self.server.stop.wait(delay)
                delay = min(delay * 2, MAX_RECONNECT_DELAY_S)
                self._check_cancel()  # between tries too: with no server answering, a pause waits on no deadline

    def _pump(self, session: ServerSession, missing: deque[_Small]) -> None:
        """Keep batch requests in flight, stage each verified file of each reply, and report the staged files.

        A file is counted as downloaded once its bytes are verified and
        staged: each batch's files are reported in a request of their own,
        sent with the next batch requests, so the server counts them while
        we write the next batch (reported only after placing, 10,000 files
        cost a serial round of reports at the end).
        """
        in_flight: deque[_Asked] = deque()
        buffer = bytearray(max(BATCH_BYTES, max((f.size for f in missing), default=0)))
        listed = protocol.FEATURE_BATCHES in session.welcome.features.split()  # else protocol 1's get_files
        try:
            while missing or in_flight or self._unreported:
                self._check_cancel()
                self._ask(session, missing, in_flight, listed)
                asked = in_flight[0]  # still in flight until its reply is read whole
                if asked.fetch:
                    frame = session.receive(protocol.FilesData, buffer)
                    in_flight.popleft()
                    self._take_batch(asked.files, frame)
                else:
                    _expect_counted(session, asked.files, self.folder)
                    in_flight.popleft()
        finally:  # a failover, a pause, a failure: what was asked and not answered is asked again (see _unanswered)
            if in_flight:
                session.reusable = False  # their replies would reach the pool's next user
                _unanswered(in_flight, missing, self._unreported)

    def _ask(self, session: ServerSession, missing: deque[_Small], in_flight: deque[_Asked], listed: bool) -> None:
        """Send, in one write, a report of the files staged since the last one, then batch requests, as many as fit:
        ``BATCHES_IN_FLIGHT`` batches and ``REQUESTS_IN_FLIGHT_BYTES`` of requests in all."""
        room = REQUESTS_IN_FLIGHT_BYTES - sum(asked.size for asked in in_flight)
        batches = sum(asked.fetch for asked in in_flight)
        requests, payloads = [], []
        while room >= BATCH_REQUEST_BYTES and (self._unreported or (missing and batches < BATCHES_IN_FLIGHT)):
            fetch = not self._unreported
            if fetch:
                files = _next_batch(missing, listed, BATCH_BYTES, BATCH_REQUEST_BYTES)
                batches += 1
            else:
                files = _next_batch(self._unreported, listed, None, BATCH_REQUEST_BYTES)
            request, payload = _request(files, listed, fetch)
            size = len(payload) or sum(map(protocol.batch_entry_bytes, (file.name for file in files)))
            in_flight.append(_Asked(files, fetch, size))
            requests.append(request)
            payloads.append(payload)
            room -= size
        if requests:
            session.connection.send_many(requests, payloads)

    def _take_batch(self, batch: list[_Small], frame: protocol.Frame) -> None:
        """Cut a ``files_data`` payload into its files and stage each one that verifies (``_stage``)."""
        reply, payload = frame.message, memoryview(frame.payload)
        if len(reply.sizes) != len(batch):
            raise protocol.RemoteProtocolError(f"files_data answered {len(reply.sizes)} files, {len(batch)} asked")
        if sum(size for size in reply.sizes if size > 0) != len(payload):
            raise protocol.RemoteProtocolError(f"files_data carried {len(payload)} bytes for other sizes")
        served, offset = [], 0
        for file, size, error in zip(batch, reply.sizes, reply.errors):
            if size < 0:
                self._failed(file.name, f"{file.name}: not served ({error})")
                continue
            served.append((file, payload[offset:offset + size]))
            offset += size
        self._stage(served)

    def _stage(self, served: list[tuple[_Small, bytes | memoryview]]) -> None:
        """Verify each file's bytes and stage them, to be reported (``_unreported``); the others listed as failed.

        The progress is counted once for the lot: a folder of 10,000 files
        makes every statement a file cost 10,000 times.
        """
        staged, sha256 = [], hashlib.sha256
        try:
            for file, data in served:
                if len(data) != file.size or sha256(data).hexdigest() != file.sha256:
                    self._failed(file.name, f"{file.name}: failed SHA-256 verification; not written")
                elif self._staged_whole(file, data):
                    staged.append(file)
        finally:  # the folder stopped mid-batch (a full disk): the files staged before are kept, so counted
            self._unreported += staged
            self._changes += [(file.name, FILE_VERIFIED) for file in staged]
            before, self._staged = self._staged, self._staged + len(staged)
            self.result.fetched_bytes += sum(file.size for file in staged)
        if self._staged // PROGRESS_EVERY_FILES > before // PROGRESS_EVERY_FILES:
            self._notify()

    def _staged_whole(self, file: _Small, data: bytes | memoryview) -> bool:
        """Write verified ``data`` to ``file``'s staged name; False (the file listed as failed) if another file of the
        folder is in the way, ``DownloadError`` if the folder cannot go on (a full disk, a file planted)."""
        try:
            self._staging.write(file, data)
            return True
        except OSError as error:
            clash = self._staging.clash(file, error)
            if clash is None:  # a full disk, or something planted where a folder goes: the folder stops here
                raise DownloadError(f"{self.folder}: cannot stage {file.name}: {error.strerror or error}; "
                                    "what was verified is kept") from error
            self._failed(file.name, f"{file.name}: {clash}; not written")
            return False

    def _install(self, files: list[_Small], first_of: dict[str, _Small]) -> list[_Small]:
        """Give every staged file its final name (``_StagedFolder.place``); the files that have it now."""
        staged = []
        for file in files:
            first = first_of[file.sha256]
            if not self._staging.holds(first):
                if first is not file:  # its twin's failure is listed; say this one failed too
                    self._failed(file.name, f"{file.name}: not written (same content as {first.name}, which failed)")
                continue
            if first is file or self._linked(first, file):
                staged.append(file)
        refused = self._staging.place()
        installed = []
        for file in staged:
            if file.final in refused:
                self._failed(file.name, refused[file.final])
            else:
                installed.append(file)
                self._changes.append((file.name, FILE_DONE))
        self.result.downloaded += len(installed)
        self._notify()
        return installed

    def _linked(self, first: _Small, file: _Small) -> bool:
        """Stage ``file`` as a link to ``first`` (one content, two names: fetched once); False (listed) if that fails."""
        try:
            self._staging.link(first, file)
            return True
        except OSError as error:
            self._failed(file.name, f"{file.name}: cannot stage it: {error.strerror or error}")
            return False

    def _report(self, files: list[_Small], patient: bool) -> None:
        """Tell the server of ``files``, in one pipelined burst (counts only: never fatal); ``patient``: failing over
        and retrying as any call, else one try."""
        if not files:
            return
        call = self.server.call if patient else self.server.try_call
        try:
            call(lambda session: _report_all(session, files, self.folder))
        except MiniTorrentError as error:
            log.warning("could not report the downloads of %s: %s", self.folder, error)

    def _check_cancel(self) -> None:
        """``DownloadCancelled`` if the folder was paused or cancelled."""
        if self.cancel.is_set():
            raise DownloadCancelled(f"{self.folder}: stopped; what was verified is kept")

    def _failed(self, name: object, line: str) -> None:
        """One file failed: listed in the result, and told with the next progress report."""
        self.result.failed.append(line)
        self._changes.append((str(name), FILE_FAILED))

    def _notify(self) -> None:
        """Report the folder's progress with the files that changed since the last report (caller's thread)."""
        changes, self._changes = tuple(self._changes), []
        if self.on_progress is None:
            return
        result = self.result
        done_files = result.downloaded + result.present
        self.on_progress(Progress(self.folder, result.size, min(result.size, result.fetched_bytes),
                                  result.fetched_bytes, done_files, result.files, files=changes))


class _InsideCheck:
    """``downloader.destination`` for many names: each folder's real path is resolved once, not once per file."""

    def __init__(self, output_dir: Path, names_checked: bool = False) -> None:
        self.output_dir = output_dir
        self._prefix = os.path.join(output_dir, "")  # the output folder and a slash: a checked name is relative
        self._names_checked = names_checked  # every name passed (protocol.plainly_safe_names) already
        self._checked: set[str] = set()

    def destination(self, name: str) -> str:
        """Where ``name`` goes; ``DownloadError`` if the name is unsafe or its folder leads out."""
        if not self._names_checked:
            try:
                check_file_name(name)  # first: a name is never joined to a path before it passed
            except ProtocolError as error:
                raise DownloadError(str(error)) from error
        final = self._prefix + name
        folder = final.rpartition("/")[0]
        if folder not in self._checked:
            destination(self.output_dir, name)  # resolves the folder's real path; DownloadError if it leads out
            self._checked.add(folder)
        return final


class _FolderFds:
    """Folders under the output folder, made and opened by descriptor, each checked to lie inside it.

    ``downloader.destination`` checks each name's folder before the download;
    another process could still swap a folder for a link (``photos ->
    ~/.ssh``) before the files are placed. Here each folder is opened one
    name at a time from its parent's descriptor, and what the descriptor is
    (its real path, whatever links led there) must lie inside the output
    folder; files are then named relative to it, so a link planted later
    changes nothing. Links that stay inside (``a -> b``) work as before.
    """

    def __init__(self, output_dir: str) -> None:
        self.top = output_dir
        self._real_top = os.path.realpath(output_dir)
        self._fds: dict[str, int] = {output_dir: os.open(output_dir, os.O_RDONLY | os.O_DIRECTORY)}

    def fd(self, folder: str) -> int:
        """A descriptor of ``folder`` (a path under the output folder), made if missing; ``OSError`` if it leads out."""
        fd = self._fds.get(folder)
        if fd is not None:
            return fd
        parent, name = os.path.dirname(folder), os.path.basename(folder)
        if not folder.startswith(self.top + os.sep):
            raise OSError(f"{folder} is not inside {self.top}")
        parent_fd = self.fd(parent)
        try:
            os.mkdir(name, dir_fd=parent_fd)
        except FileExistsError:
            pass
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=parent_fd)
        if not opened_inside(fd, self._real_top):
            os.close(fd)
            raise OSError(f"{folder} leads outside {self.top} (through a link); refused")
        self._fds[folder] = fd
        return fd

    def close(self) -> None:
        """Close every descriptor opened."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _StagedFolder:
    """A folder's small files, staged where their final folder will be made in one rename.

    Each verified file is written under ``OUT/.minitorrent-incoming/<key>/``
    at its path inside the folder (``2024/beach.jpg``); ``key`` names the
    folder (``folder-`` and part of its path's SHA-256), so two folders
    never share a staged tree, nested or not. ``place`` then moves the
    staged tree to the folder's final place with one
    ``renameat2(RENAME_NOREPLACE)`` when nothing is there yet (a fresh
    download: one rename, not 10,000); where something is (an earlier run,
    the user's own files), it goes down a level and moves each file the same
    way, never replacing anything. While a download uses a staged tree it
    holds ``<key>.lock`` (``flock``; the kernel lets go when the process dies,
    SIGKILL included): a second download of the same folder into the same
    output is refused, not mixed in. A staged tree left by a crash is
    ``reuse``d: each file kept only if it is one wanted and still hashes to
    its version, anything else removed. Only the downloading user writes in
    ``.minitorrent-incoming`` (``_open_staging``), and a staged file is
    created, never rewritten: so whatever is staged was put there by us.
    """

    def __init__(self, fds: _FolderFds, folder: str) -> None:
        self._fds = fds
        self.final = os.path.join(fds.top, folder.rstrip("/"))  # where the staged tree goes
        self._folder = folder
        self._key = staging_key(folder)
        self._incoming, self._lock = _locked_staging(fds.fd(fds.top), self._key + ".lock", f"{folder} into {fds.top}")
        self._dirs: dict[str, int] = {}
        try:
            self._dirs[""] = self._open_dir(self._incoming, self._key)
        except OSError:
            os.close(self._lock)  # a window may run many downloads: the lock must not outlive this one
            os.close(self._incoming)
            raise
        self._finals: dict[str, _Small] = {}  # final path -> the file staged for it
        self._placed = False

    def holds(self, file: _Small) -> bool:
        """True if ``file`` is staged (verified, this run or kept from the last)."""
        return file.final in self._finals

    def write(self, file: _Small, data: bytes | memoryview) -> None:
        """Stage ``file`` (already verified) with ``data``; ``FileExistsError`` if anything is at its name.

        Created, never truncated: what is there is not ours to write (a hard
        link planted there would carry our bytes to its other names; where a
        file system ignores case, ``Case.txt`` and ``case.txt`` are one file).
        """
        folder, name = self._split(file)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=self._dir(folder))
        try:
            if os.write(fd, data) != len(data):  # a full disk or a size limit took part of it: never staged as whole
                raise OSError(errno.ENOSPC, "the file system took only part of the file")
        finally:
            os.close(fd)
        self._finals[file.final] = file

    def clash(self, file: _Small, error: OSError) -> str | None:
        """Why ``write`` met ``error`` if another file of the folder is in the way (that one file fails), else None.

        Something at its name (another name of the folder where case is
        ignored), or a file staged where one of its folders goes (a listing
        naming ``a`` and ``a/b``, which a catalog never does).
        """
        if isinstance(error, FileExistsError):
            return "something else is staged at its name (a file system that ignores case?)"
        if isinstance(error, NotADirectoryError):
            folder = os.path.dirname(file.final)
            while folder.startswith(self.final + os.sep):
                if folder in self._finals:
                    return f"{self._finals[folder].name} is listed as a file"
                folder = os.path.dirname(folder)
        return None

    def link(self, first: _Small, file: _Small) -> None:
        """Stage ``file`` as a second name of ``first``'s staged content (``OSError`` if the link fails)."""
        (first_folder, first_name), (folder, name) = self._split(first), self._split(file)
        os.link(first_name, name, src_dir_fd=self._dir(first_folder), dst_dir_fd=self._dir(folder),
                follow_symlinks=False)
        self._finals[file.final] = file

    def reuse(self, wanted: dict[str, _Small]) -> set[str]:
        """Keep what an earlier run staged of ``wanted`` (name -> file) if it still verifies; remove the rest.

        Returns the names kept. Usually nothing is staged: one listing says so.
        """
        if not os.listdir(self._dirs[""]):
            return set()
        kept = set()
        for path, folders, names, fd in os.fwalk(dir_fd=self._dirs[""], topdown=False):
            for name in names:
                file = wanted.get(self._name_of(path, name))
                # no link followed, no FIFO read; another user's file could change once hashed
                if file is not None and regular_file_sha256(name, fd, follow_links=False,
                                                            owner=os.geteuid()) == file.sha256:
                    kept.add(file.name)
                    self._finals[file.final] = file
                else:
                    os.unlink(name, dir_fd=fd)
            for folder in folders:
                _remove_if_empty(folder, fd)
        return kept

    def place(self) -> dict[str, str]:
        """One syncfs, then the staged tree to its final place; final path -> why, for each file refused."""
        refused: dict[str, str] = {}
        if not self._finals:
            return refused  # nothing verified: no folder is made
        sync_filesystem(f"/proc/self/fd/{self._incoming}")
        touched = self._place(self._incoming, self._key, self.final, refused)
        self._placed = True
        for folder in sorted(_with_parents(touched, self._fds.top)):
            os.fsync(self._fds.fd(folder))  # the folder opened to place in, not whatever its path names now
        return refused

    def close(self) -> None:
        """Let go of the staged tree: once placed, remove what is left of it (refused files); before, keep it
        for the next run. Then the lock, and the staging folder if it is empty."""
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        if self._placed:
            try:
                shutil.rmtree(self._key, dir_fd=self._incoming)
            except FileNotFoundError:
                pass  # placed whole
        else:
            _remove_if_empty(self._key, self._incoming)
        try:
            os.unlink(self._key + ".lock", dir_fd=self._incoming)  # while locked: nobody else holds a lock on it
        except FileNotFoundError:
            pass  # removed by hand meanwhile
        os.close(self._lock)
        try:
            os.fsync(self._incoming)
        finally:
            os.close(self._incoming)
        _remove_if_empty(STAGING, self._fds.fd(self._fds.top))

    def _place(self, source_fd: int, source: str, final: str, refused: dict[str, str]) -> set[str]:
        """Move the staged folder ``source`` to ``final``: whole if nothing is there, else file by file."""
        try:
            rename_noreplace(source, os.path.basename(final), source_fd, self._fds.fd(os.path.dirname(final)))
            return {os.path.dirname(final)}
        except OSError:  # something is there; or no renameat2 here, and a folder cannot be linked: file by file
            pass
        try:
            final_fd = self._fds.fd(final)
        except OSError as error:  # not a folder, or one leading out of the output folder
            return self._refuse_under(final, error, refused)
        touched = set()
        folder_fd = self._open_dir(source_fd, source)
        try:
            for entry in os.scandir(folder_fd):
                target = os.path.join(final, entry.name)
                if entry.is_dir(follow_symlinks=False):
                    touched |= self._place(folder_fd, entry.name, target, refused)
                    continue
                try:
                    rename_noreplace(entry.name, entry.name, folder_fd, final_fd)
                    touched.add(final)
                except FileExistsError:
                    refused[target] = f"{target} appeared during the download; not overwriting it"
                except OSError as error:
                    refused[target] = f"cannot write {target}: {error.strerror or error}"
        finally:
            os.close(folder_fd)
        return touched

    def _refuse_under(self, final: str, error: OSError, refused: dict[str, str]) -> set[str]:
        for path in self._finals:
            if path.startswith(final + os.sep):
                refused[path] = f"cannot write {path}: {error.strerror or error}"
        return set()

    def _split(self, file: _Small) -> tuple[str, str]:
        """(its folder inside the staged tree, its own name)."""
        folder, _, name = file.name[len(self._folder):].rpartition("/")
        return folder, name

    def _name_of(self, path: str, name: str) -> str:
        """The catalog name of a staged file found at ``path``/``name`` (``os.fwalk``'s) under the staged tree."""
        return self._folder + os.path.normpath(os.path.join(path, name))

    def _dir(self, folder: str) -> int:
        """The descriptor of ``folder`` in the staged tree, made if missing (opened one name at a time)."""
        fd = self._dirs.get(folder)
        if fd is None:
            parent, _, name = folder.rpartition("/")
            fd = self._dirs[folder] = self._open_dir(self._dir(parent), name)
        return fd

    @staticmethod
    def _open_dir(parent_fd: int, name: str) -> int:
        """The staged folder ``name`` in ``parent_fd``, made if missing; ``OSError`` if it is a link or not ours."""
        try:
            os.mkdir(name, dir_fd=parent_fd)
        except FileExistsError:
            pass
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
        try:
            _owned_by_us(fd)
        except OSError:
            os.close(fd)
            raise
        return fd


def _locked_staging(output_fd: int, lock_name: str, what: str) -> tuple[int, int]:
    """(the staging folder, a descriptor holding the lock ``lock_name`` in it); ``DownloadError`` if another holds it.

    Another download ending removes the staging folder if it finds it empty:
    if it did so between our opening it and our lock file's creation (from
    then on the lock file keeps it), it is made and opened again.
    """
    for _ in range(3):
        incoming = _open_staging(output_fd)
        try:
            return incoming, _lock_staging(incoming, lock_name, what)
        except FileNotFoundError:  # removed under us: made again
            os.close(incoming)
        except BaseException:
            os.close(incoming)
            raise
    raise DownloadError(f"{what}: its staging folder kept being removed")


def _open_staging(output_fd: int) -> int:
    """The output folder's staging folder, made if missing, writable by us alone; ``OSError`` if it is not ours.

    Where other users may write in the output folder (``/tmp``), one of them
    could make it first: in a folder of theirs they could swap a staged file
    once it was verified, and the staged tree moved into place would be theirs.
    """
    try:
        os.mkdir(STAGING, 0o700, dir_fd=output_fd)
    except FileExistsError:
        pass
    fd = os.open(STAGING, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=output_fd)
    try:
        if _owned_by_us(fd).st_mode & 0o077:  # made by an older version, or under another umask
            os.fchmod(fd, 0o700)
    except OSError:
        os.close(fd)
        raise
    return fd


def _owned_by_us(fd: int) -> os.stat_result:
    """The status of the open folder ``fd``, if it belongs to this process's user; else ``PermissionError``."""
    status = os.fstat(fd)
    if status.st_uid != os.geteuid():
        raise PermissionError(errno.EPERM, f"it belongs to another user (uid {status.st_uid}); not staging there")
    return status


def staging_key(folder: str) -> str:
    """The name of ``folder``'s staged tree in ``.minitorrent-incoming`` (its lock file adds ``.lock``)."""
    return "folder-" + hashlib.sha256(folder.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _lock_staging(folder_fd: int, name: str, what: str) -> int:
    """A descriptor holding an exclusive ``flock`` on ``name`` in ``folder_fd``; ``DownloadError`` if another holds it.

    The lock file is removed by its holder when done; a lock taken on a file
    just removed is dropped and taken again on the new one.
    """
    for _ in range(3):
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644, dir_fd=folder_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DownloadError(f"{what}: another download of that folder is running there; "
                                "try again when it is done") from None
        try:
            if os.fstat(fd).st_ino == os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise DownloadError(f"{what}: could not lock its staging folder")


def _absent(final: str, sha256: str) -> bool:
    """``FolderDownload._present`` where the folder is not there at all."""
    return False


def _remove_if_empty(name: str, folder_fd: int) -> None:
    """Remove the folder ``name`` in ``folder_fd`` if it is empty (a link there: removed too)."""
    try:
        os.rmdir(name, dir_fd=folder_fd)
    except NotADirectoryError:
        os.unlink(name, dir_fd=folder_fd)
    except OSError:
        pass  # not empty: something in it is kept


def _next_batch(files: deque[_Small], listed: bool, most_bytes: int | None = None,
                most_listed_bytes: int = protocol.MAX_BATCH_LIST_BYTES) -> list[_Small]:
    """Files off the front of ``files`` (not empty) for one request (at least one), while their sizes add up to at
    most ``most_bytes`` (None: sizes not counted, a report) and the request stays in its bounds: a ``get_batch`` or
    ``downloaded_batch`` (``listed``) names ``MAX_LISTED_BATCH_FILES`` in ``most_listed_bytes``, protocol 1's
    requests ``MAX_BATCH_FILES``."""
    front = list(itertools.islice(files, protocol.MAX_LISTED_BATCH_FILES if listed else protocol.MAX_BATCH_FILES))
    if most_bytes is not None:
        del front[_within(map(operator.attrgetter("size"), front), most_bytes):]
    if listed:  # on what the sizes left: a name's bound is a Python call
        del front[_within(map(protocol.batch_entry_bytes, map(operator.attrgetter("name"), front)), most_listed_bytes):]
    return [files.popleft() for _ in range(max(len(front), 1))]


def _within(costs: Iterable[int], most: int) -> int:
    """How many of ``costs``, from the first, add up to at most ``most`` (C loops: a batch is a thousand files)."""
    return bisect.bisect_right(list(itertools.accumulate(costs)), most)


def _request(files: list[_Small], listed: bool, fetch: bool) -> tuple[protocol.Message, bytes]:
    """(request, payload) asking for ``files`` (``fetch``), or reporting them downloaded: ``get_batch`` or
    ``downloaded_batch`` with the names in the payload (``listed``), else protocol 1's ``get_files`` or
    ``downloaded_many`` with the names in the header."""
    names, sha256s = [f.name for f in files], [f.sha256 for f in files]
    if listed:
        return (protocol.GetBatch() if fetch else protocol.ReportDownloadedBatch()), protocol.encode_batch(names, sha256s)
    return (protocol.GetFiles(names, sha256s) if fetch else protocol.ReportDownloadedMany(names, sha256s)), b""


def _expect_counted(session: ServerSession, files: list[_Small], folder: str) -> None:
    """Read the answer to a report of ``files``: a refusal is logged, not fatal (the files are downloaded all the same)."""
    try:
        session.receive(protocol.Ok)
    except RemoteError as error:
        log.warning("%s: the server did not count %d downloads: %s", folder, len(files), error)


def _unanswered(in_flight: deque[_Asked], missing: deque[_Small], unreported: deque[_Small]) -> None:
    """Put the requests left unanswered back in front: batches into ``missing``, reports into ``unreported``.

    A report with no answer yet may never have been read: the server answers
    one request at a time, and the connection is closed now. So it is sent
    again (by the next connection, or by the last report of a folder that
    stopped); an identified client's is counted once all the same (the
    access list), an anonymous one's may count twice.
    """
    for asked in reversed(in_flight):
        (missing if asked.fetch else unreported).extendleft(reversed(asked.files))


def _report_all(session: ServerSession, files: list[_Small], folder: str) -> None:
    """``downloaded_batch`` requests (``downloaded_many`` to an older server), ``REPORTS_IN_FLIGHT`` sent before their
    answers are read; a refused one is logged (``_expect_counted``) and the others still read."""
    listed = protocol.FEATURE_BATCHES in session.welcome.features.split()
    left = deque(files)
    batches = []
    while left:
        batches.append(_next_batch(left, listed))
    for start in range(0, len(batches), REPORTS_IN_FLIGHT):
        window = batches[start:start + REPORTS_IN_FLIGHT]
        requests, payloads = zip(*(_request(batch, listed, fetch=False) for batch in window))
        session.connection.send_many(list(requests), list(payloads))
        for batch in window:
            _expect_counted(session, batch, folder)


def _with_parents(folders: set[str], top: str) -> set[str]:
    """``folders``, every folder between them and ``top``, and ``top`` (a new subfolder's entry lives in its parent)."""
    every = {top}
    for folder in folders:
        while folder not in every and folder.startswith(top + os.sep):
            every.add(folder)
            folder = os.path.dirname(folder)
    return every


@dataclass(frozen=True)
class FolderSummary:
    """A folder as a listing shows it: its path (ending in ``/``), files and bytes under it (all depths)."""

    path: str
    files: int
    size: int


def summarize_folders(entries: list[dict]) -> list[FolderSummary]:
    """Every folder that holds a listed file, at any depth, sorted by path; no widget needed."""
    files: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for entry in entries:
        parts = str(entry["name"]).split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            folder = "/".join(parts[:depth]) + "/"
            files[folder] = files.get(folder, 0) + 1
            sizes[folder] = sizes.get(folder, 0) + int(entry.get("size", 0))
    return [FolderSummary(path, files[path], sizes[path]) for path in sorted(files)]
