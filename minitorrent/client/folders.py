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
  batch of manifests, and the small files are fetched on one connection by
  ``get_files`` requests (up to ``MAX_BATCH_FILES`` files, ``BATCH_BYTES``
  bytes, in one reply), ``BATCHES_IN_FLIGHT`` of them outstanding.

The small files' life keeps the single-file guarantees without paying an
``fsync`` and a database commit per file:

1. Each reply is verified (length and SHA-256) in memory, then written to
   the folder's staging area, ``DIR/.minitorrent-incoming/<sha256>``: named
   by content, so it is never mistaken for another file, and one content
   shared under two names is fetched once.
2. One ``syncfs`` makes every staged file durable at once.
3. Each file is moved to its final name by ``renameat2(RENAME_NOREPLACE)``
   (``common/fs.rename_noreplace``: never replaces anything, as ``os.link``
   which it falls back to) and every folder touched is fsynced once. The
   staging area and each final folder are opened by descriptor, one name at
   a time from the output folder's, and checked to lie inside it: a link
   another process plants in the output folder once the names were checked
   leads nothing out (``_FolderFds``).
4. The download counts go to the server in ``downloaded_many`` requests,
   pipelined (one round trip for the lot, not one per file).

A crash at any point resumes: final names are only ever verified content,
and a staged file is reused on the next run if its bytes still hash to its
name (a local read of a few KiB, not a fetch), dropped otherwise. When the
server in use goes, the small files still missing are asked of whichever
server is active (as a single download fails over). Files below
``PEER_WORTHY_BYTES`` come from the servers only: asking a peer for 4 KiB
costs more than it saves.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from error_handler import ConnectionFailed, DownloadCancelled, DownloadError, MiniTorrentError
from integrity import sha256_file
from minitorrent.client.downloader import Downloader, destination
from minitorrent.client.progress import FILE_DONE, FILE_FAILED, FILE_VERIFIED, Progress
from minitorrent.common.fs import fsync_dir, rename_noreplace, sync_filesystem
from minitorrent.net.remote import MAX_RECONNECT_DELAY_S, ServerClient, ServerSession
from minitorrent.wire import protocol
from minitorrent.wire.protocol import ProtocolError, check_file_name, check_folder_name

log = logging.getLogger(__name__)

STAGING = ".minitorrent-incoming"  # inside the output folder: same file system, so a link is atomic
REPORTS_IN_FLIGHT = 8  # report frames (up to 1 MiB each) sent before their answers (tiny) are read
BATCH_BYTES = 1024 * 1024  # file bytes asked for in one get_batch or get_files: a reply is at most this (the receive buffer)
BATCHES_IN_FLIGHT = 4  # get_files requests outstanding: the server reads the next batch while we write this one
PROGRESS_EVERY_FILES = 64  # the folder's progress is told every this many small files, not 10,000 times
# A one-chunk file this big is worth a download of its own when a peer holds it (P2P, as for any file): a
# get_files batch carries only a few such files anyway, so batching saves little and the server pays it all.
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


@dataclass(frozen=True)
class _Small:
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
    entries = sorted((e for e in server.list_files(prefix, under=prefix) if str(e.get("name", "")).startswith(prefix)),
                     key=lambda e: e["name"])
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
        self.staging = self.output_dir / STAGING
        self.cancel = cancel
        self.on_progress = on_progress
        self.result = FolderResult(self.folder, self.output_dir / self.folder)
        self._staged = 0  # small files staged in this run
        self._staging_path = str(self.staging)
        self._fds: _FolderFds | None = None  # while small files are staged and placed
        self._staging_fd = -1
        self._staged_shas: set[str] = set()  # verified and staged (this run or reused from the last)
        self._changes: list[tuple[str, str]] = []  # files whose state changed since the last progress report
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
        inside = _InsideCheck(self.output_dir)
        for entry in entries:
            try:
                final = inside.destination(entry["name"])
                size, sha256, chunks = int(entry["size"]), str(entry["sha256"]), int(entry["chunks"])
                if chunks > 1:
                    large.append(entry)
                elif size > protocol.MAX_CHUNK_BYTES:  # a lie: it would size the receive buffer (one chunk at most)
                    raise DownloadError(f"{entry['name']}: listed as {size} bytes in one chunk, more than any chunk")
                elif self._present(final, sha256):
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
        folder, name = os.path.split(final)
        if name not in self._names_in(folder):
            return False
        if not os.path.isfile(final) or sha256_file(final) != sha256:
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
        if self.cancel.is_set():
            raise DownloadCancelled(f"{self.folder}: stopped; what was verified is kept")
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
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._fds = _FolderFds(str(self.output_dir))
        try:
            self._staging_fd = self._fds.fd(self._staging_path)
            self._stage_and_place(files)
        finally:
            self._fds.close()

    def _stage_and_place(self, files: list[_Small]) -> None:
        wanted: dict[str, _Small] = {}
        for file in files:
            wanted.setdefault(file.sha256, file)  # the first name of a content fetches it (as _install assumes)
        left_over = set(os.listdir(self._staging_fd))  # one listing, not a stat per file: usually empty
        missing = deque(f for sha, f in wanted.items() if sha not in left_over or not self._staged_ok(sha))
        for empty in [f for f in missing if f.size == 0]:  # nothing to fetch: staged as it is
            self._stage(empty, b"")
        self._fetch(deque(f for f in missing if f.size > 0))
        installed = self._install(files)
        self._report(installed)

    def _staged_ok(self, sha256: str) -> bool:
        """A staged file from an earlier run is reused only if it still hashes to its name."""
        if sha256_file(f"/proc/self/fd/{self._staging_fd}/{sha256}") == sha256:  # the folder opened, not its name
            self._staged_shas.add(sha256)
            return True
        os.unlink(sha256, dir_fd=self._staging_fd)
        return False

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

    def _pump(self, session: ServerSession, missing: deque[_Small]) -> None:
        """Keep ``BATCHES_IN_FLIGHT`` ``get_files`` requests in flight; stage each verified file of each reply."""
        in_flight: deque[list[_Small]] = deque()
        buffer = bytearray(max(BATCH_BYTES, max((f.size for f in missing), default=0)))
        listed = protocol.FEATURE_BATCHES in session.welcome.features.split()  # else protocol 1's get_files
        try:
            while missing or in_flight:
                if self.cancel.is_set():
                    raise DownloadCancelled(f"{self.folder}: stopped; what was verified is kept")
                requests, payloads = [], []
                while missing and len(in_flight) < BATCHES_IN_FLIGHT:
                    batch = _take_batch(missing, listed, BATCH_BYTES, _size)
                    in_flight.append(batch)
                    names, sha256s = [f.name for f in batch], [f.sha256 for f in batch]
                    requests.append(protocol.GetBatch() if listed else protocol.GetFiles(names, sha256s))
                    payloads.append(protocol.encode_batch(names, sha256s) if listed else b"")
                if requests:
                    session.connection.send_many(requests, payloads)
                frame = session.receive(protocol.FilesData, buffer)
                self._take_batch(in_flight.popleft(), frame)
        finally:
            if in_flight:
                session.reusable = False  # their replies would reach the pool's next user
                for batch in reversed(in_flight):
                    missing.extendleft(reversed(batch))

    def _take_batch(self, batch: list[_Small], frame: protocol.Frame) -> None:
        """Cut a ``files_data`` payload into its files and stage each one that verifies."""
        reply, payload = frame.message, memoryview(frame.payload)
        if len(reply.sizes) != len(batch):
            raise protocol.RemoteProtocolError(f"files_data answered {len(reply.sizes)} files, {len(batch)} asked")
        offset = 0
        for file, size, error in zip(batch, reply.sizes, reply.errors):
            if size < 0:
                self._failed(file.name, f"{file.name}: not served ({error})")
                continue
            self._stage(file, payload[offset:offset + size])
            offset += size
        if offset != len(payload):
            raise protocol.RemoteProtocolError(f"files_data carried {len(payload)} bytes for sizes adding up to {offset}")

    def _stage(self, file: _Small, data: bytes | memoryview) -> None:
        if len(data) != file.size or hashlib.sha256(data).hexdigest() != file.sha256:
            self._failed(file.name, f"{file.name}: failed SHA-256 verification; not written")
            return
        fd = os.open(file.sha256, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644,
                     dir_fd=self._staging_fd)
        try:
            os.write(fd, data)  # at most one chunk; a short write on a regular file would be an error already
        finally:
            os.close(fd)
        self._staged_shas.add(file.sha256)
        self._changes.append((file.name, FILE_VERIFIED))
        self.result.fetched_bytes += len(data)
        self._staged += 1
        if self._staged % PROGRESS_EVERY_FILES == 0:
            self._notify()

    def _install(self, files: list[_Small]) -> list[_Small]:
        """One syncfs, then each verified file moved to its final name, then each folder fsynced once."""
        sync_filesystem(self.staging)
        folders: set[str] = set()
        installed = []
        fetched_as: dict[str, _Small] = {}  # sha256 -> the file it was fetched for (one content, two names: fetched once)
        content_at: dict[str, tuple[int, str]] = {}  # sha256 -> (folder fd, name): its first final name, once placed
        for file in files:
            fetched_as.setdefault(file.sha256, file)
            if file.sha256 not in self._staged_shas:
                if fetched_as[file.sha256] is not file:  # its twin's failure is listed; say this one failed too
                    self._failed(file.name, f"{file.name}: not written (same content as "
                                            f"{fetched_as[file.sha256].name}, which failed)")
                continue
            folder = os.path.dirname(file.final)
            if self._place(file, folder, content_at):
                folders.add(folder)
                installed.append(file)
                self._changes.append((file.name, FILE_DONE))
        for folder in sorted(_with_parents(folders, str(self.output_dir))):
            fsync_dir(folder)
        self._clear_staging({f.sha256 for f in files if f.sha256 not in content_at})
        self.result.downloaded += len(installed)
        self._notify()
        return installed

    def _place(self, file: _Small, folder: str, content_at: dict[str, tuple[int, str]]) -> bool:
        """Give ``file`` its final name without replacing anything; False (and listed) if that fails.

        The first name of a content takes the staged file (a rename, never
        replacing); a second name of the same content is a link to the first,
        as both were links to one staged file before.
        """
        try:
            folder_fd, name = self._fds.fd(folder), os.path.basename(file.final)
            if file.sha256 in content_at:
                first_fd, first_name = content_at[file.sha256]
                os.link(first_name, name, src_dir_fd=first_fd, dst_dir_fd=folder_fd, follow_symlinks=False)
            else:
                rename_noreplace(file.sha256, name, self._staging_fd, folder_fd)
                content_at[file.sha256] = (folder_fd, name)
            return True
        except FileExistsError:
            self._failed(file.name, f"{file.final} appeared during the download; not overwriting it")
        except OSError as error:
            self._failed(file.name, f"{file.name}: cannot write {file.final}: {error.strerror or error}")
        return False

    def _clear_staging(self, shas: set[str]) -> None:
        """Remove what is still staged of ``shas`` (files that failed to install), then the staging folder if empty."""
        for sha256 in shas:
            try:
                os.unlink(sha256, dir_fd=self._staging_fd)
            except FileNotFoundError:
                pass
        fsync_dir(self.staging)
        try:
            self.staging.rmdir()
        except OSError:
            pass  # another folder download still stages there

    def _report(self, installed: list[_Small]) -> None:
        """Tell the server of every finished file in one pipelined burst (counts only: never fatal)."""
        try:
            self.server.call(lambda session: _report_all(session, installed))
        except MiniTorrentError as error:
            log.warning("could not report the downloads of %s: %s", self.folder, error)

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

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self._output = str(output_dir)
        self._checked: set[str] = set()

    def destination(self, name: str) -> str:
        """Where ``name`` goes; ``DownloadError`` if the name is unsafe or its folder leads out."""
        try:
            check_file_name(name)  # first: a name is never joined to a path before it passed
        except ProtocolError as error:
            raise DownloadError(str(error)) from error
        final = os.path.join(self._output, name)
        folder = os.path.dirname(final)
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
        self._top = output_dir
        self._real_top = os.path.realpath(output_dir)
        self._fds: dict[str, int] = {output_dir: os.open(output_dir, os.O_RDONLY | os.O_DIRECTORY)}

    def fd(self, folder: str) -> int:
        """A descriptor of ``folder`` (a path under the output folder), made if missing; ``OSError`` if it leads out."""
        fd = self._fds.get(folder)
        if fd is not None:
            return fd
        parent, name = os.path.dirname(folder), os.path.basename(folder)
        if not folder.startswith(self._top + os.sep):
            raise OSError(f"{folder} is not inside {self._top}")
        parent_fd = self.fd(parent)
        try:
            os.mkdir(name, dir_fd=parent_fd)
        except FileExistsError:
            pass
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=parent_fd)
        real = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.commonpath([real, self._real_top]) != self._real_top:
            os.close(fd)
            raise OSError(f"{folder} leads outside {self._top} (through a link); refused")
        self._fds[folder] = fd
        return fd

    def close(self) -> None:
        """Close every descriptor opened."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _take_batch(files: deque[_Small], listed: bool, most_bytes: int, cost: Callable[[_Small], int]) -> list[_Small]:
    """Files off the front of ``files`` for one request (at least one), while their ``cost`` adds up to at most
    ``most_bytes`` and the request stays in its bounds: a ``get_batch`` or ``downloaded_batch`` (``listed``)
    names ``MAX_LISTED_BATCH_FILES`` in ``MAX_BATCH_LIST_BYTES``, protocol 1's requests ``MAX_BATCH_FILES``."""
    most_files = protocol.MAX_LISTED_BATCH_FILES if listed else protocol.MAX_BATCH_FILES
    batch: list[_Small] = []
    total = named = 0
    while files and len(batch) < most_files:
        file = files[0]
        entry = protocol.batch_entry_bytes(file.name) if listed else 0
        if batch and (total + cost(file) > most_bytes or named + entry > protocol.MAX_BATCH_LIST_BYTES):
            break
        batch.append(files.popleft())
        total += cost(file)
        named += entry
    return batch


def _size(file: _Small) -> int:
    return file.size


def _nothing(file: _Small) -> int:
    return 0


def _report_all(session: ServerSession, files: list[_Small]) -> None:
    """``downloaded_batch`` requests (``downloaded_many`` to an older server), all sent before the first answer is read."""
    listed = protocol.FEATURE_BATCHES in session.welcome.features.split()
    left = deque(files)
    requests, payloads = [], []
    while left:
        batch = _take_batch(left, listed, 0, _nothing)
        names, sha256s = [f.name for f in batch], [f.sha256 for f in batch]
        requests.append(protocol.ReportDownloadedBatch() if listed else protocol.ReportDownloadedMany(names, sha256s))
        payloads.append(protocol.encode_batch(names, sha256s) if listed else b"")
    for start in range(0, len(requests), REPORTS_IN_FLIGHT):
        session.connection.send_many(requests[start:start + REPORTS_IN_FLIGHT], payloads[start:start + REPORTS_IN_FLIGHT])
        for _ in requests[start:start + REPORTS_IN_FLIGHT]:
            session.receive(protocol.Ok)


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
