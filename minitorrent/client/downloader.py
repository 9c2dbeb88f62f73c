"""Downloading one file: verified chunks, resumable, never a corrupt final file.

The life of a download of ``NAME`` into ``DIR``:

1. Fetch the manifest. If ``DIR/NAME`` already exists it must hold exactly
   that content (then there is nothing to do), otherwise the download is
   refused: an existing different file is never overwritten.
2. Open ``DIR/NAME.part`` and the client database's record of which chunks of
   it are verified. A record for another version of the file is discarded
   (chunks of two versions are never mixed); recorded chunks are hashed again
   from disk before they are trusted, which costs a local read, not a fetch.
3. Fetch the missing chunks over a few pooled connections, keeping
   ``pipeline_depth`` requests in flight on each. Every chunk is checked
   against the manifest *before* it is written. A connection that fails is
   replaced, with backoff, until ``retry_deadline_s`` passes without progress;
   if the server itself is gone the replacement comes from whichever server
   is active now (the backup after a failover). Every request names the
   file's SHA-256, so chunks of two versions are never mixed.
4. Meanwhile a hasher thread follows the verified prefix of the file and
   computes the whole-file SHA-256, so the final check costs no extra pass.
5. Only if that matches the manifest is the ``.part`` file linked to its final
   name (``os.link``, which refuses to replace anything) and the record moved
   to the completed files.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from database import ClientStore, DownloadState
from error_handler import (
    AuthenticationFailed,
    ConnectionFailed,
    DownloadCancelled,
    DownloadError,
    MiniTorrentError,
    RemoteError,
    backoff_delays,
)
from integrity import Manifest, sha256_file
from minitorrent.client.chunkboard import ChunkBoard, Source
from minitorrent.client.progress import Progress
from minitorrent.common.fs import fsync_dir, read_exactly_at
from minitorrent.net.remote import (
    MAX_RECONNECT_DELAY_S,
    ConnectionPool,
    ServerClient,
    ServerSession,
)
from minitorrent.net.throttle import TokenBucket
from minitorrent.wire import protocol
from minitorrent.wire.identity import parse_id
from minitorrent.wire.protocol import ErrorCode, ProtocolError, check_file_name
from minitorrent.wire.tls import Secure

if TYPE_CHECKING:
    from minitorrent.client.seeding import Seeder

log = logging.getLogger(__name__)

STREAMS_PER_DOWNLOAD = 2  # two cores: one stream hashes while the other receives
MAX_CHUNK_ATTEMPTS = 3  # a chunk failing verification this often means the source is damaged
MARK_BATCH = 8  # verified chunks recorded (and offered to peers) per database transaction
MAX_PEERS_PER_DOWNLOAD = 8  # peer streams of one download, beside the server's
PEER_REFRESH_S = 1.0  # how often a download asks the tracker for (new) peers
CANCEL_CHECK_S = 0.1  # how soon a pause or cancel takes effect
IDLE_WAIT_S = 0.2  # a stream with nothing to request looks again at least this often
SYNC_EVERY_BYTES = 64 * 1024 * 1024  # the hasher flushes the .part file this often


@dataclass(frozen=True)
class DownloadResult:
    """What ``download`` did: ``outcome`` is downloaded or already present."""

    name: str
    path: Path
    outcome: str
    size: int
    fetched_bytes: int
    resumed_chunks: int
    seconds: float
    manifest: Manifest
    duplicate_chunks: int = 0  # requests for chunks already verified: always 0, tests check it
    sources: dict[str, int] = field(default_factory=dict)  # bytes received per source


class Downloader:
    """Downloads files from one server into a folder. One ``download`` at a time per thread."""

    def __init__(
        self,
        server: ServerClient,
        store: ClientStore,
        *,
        pipeline_depth: int,
        on_progress: Callable[[Progress], None] | None = None,
        report_downloads: bool = True,
        use_peers: bool = True,
        seeder: Seeder | None = None,
        download_limit: TokenBucket | None = None,
    ) -> None:
        self.server = server
        self.store = store
        self.pipeline_depth = pipeline_depth
        self.on_progress = on_progress
        self.report_downloads = report_downloads  # False for server-to-server copies, which are no downloads
        self.use_peers = use_peers
        self.seeder = seeder  # offers what is verified to other clients while downloading
        self.download_limit = download_limit or TokenBucket(0)

    def seed_port(self) -> int:
        """This client's seed port (0 if not seeding): the tracker leaves us out of our own peers."""
        return self.seeder.port if self.seeder else 0

    def download(self, name: str, output_dir: Path, cancel: threading.Event | None = None) -> DownloadResult:
        """Download ``name`` into ``output_dir``; raise ``DownloadError`` with a one-line reason.

        On failure no file exists under the final name; verified chunks stay
        in ``NAME.part`` so that running it again resumes. Setting ``cancel``
        (from any thread) stops the download within a fraction of a second
        with ``DownloadCancelled``: a pause, resumable the same way.
        """
        started = time.monotonic()
        name = _checked_name(name)
        manifest = self._fetch_manifest(name)
        final = Path(output_dir) / name
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                return self._already_present(name, final, manifest, started)
            job = _Job(self, name, final, manifest, cancel or threading.Event())
            fetched, resumed = job.run()
        except OSError as error:
            raise DownloadError(f"{name}: cannot write {error.filename or final}: {error.strerror or error}") from error
        if self.report_downloads:
            self._report(name, manifest)
        return DownloadResult(name, final, "downloaded", manifest.size, fetched, resumed, time.monotonic() - started,
                              manifest, job.duplicate_chunks, job.sources())

    def _fetch_manifest(self, name: str) -> Manifest:
        try:
            return self.server.manifest(name)
        except RemoteError as error:
            if error.code == ErrorCode.NOT_FOUND:
                raise DownloadError(f"{name}: no such file on the server") from error
            raise DownloadError(f"{name}: {error}") from error
        except MiniTorrentError as error:
            raise DownloadError(f"{name}: {error}") from error

    def _already_present(self, name: str, final: Path, manifest: Manifest, started: float) -> DownloadResult:
        if not final.is_file() or sha256_file(final) != manifest.sha256:
            raise DownloadError(f"{final} already exists with different content; not overwriting it")
        return DownloadResult(name, final, "already present", manifest.size, 0, 0, time.monotonic() - started,
                              manifest)

    def _report(self, name: str, manifest: Manifest) -> None:
        try:
            self.server.report_downloaded(name, manifest.sha256)
        except MiniTorrentError as error:  # the file is safe; only the server's counter misses it
            log.warning("could not report the download of %s: %s", name, error)


def _checked_name(name: str) -> str:
    try:
        return check_file_name(name)
    except ProtocolError as error:
        raise DownloadError(str(error)) from error


class _Job:
    """The state of one running download, shared by its stream threads.

    The servers (two streams, failing over between main and backup) and each
    peer the tracker names (one stream each) pull work from one
    ``ChunkBoard``; every chunk is verified before it is written, whoever
    sent it.
    """

    def __init__(self, owner: Downloader, name: str, final: Path, manifest: Manifest,
                 cancel: threading.Event) -> None:
        self.owner = owner
        self.cancel = cancel
        self.name = name
        self.final = final
        self.part = final.with_name(name + ".part")
        self.manifest = manifest
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._attempts: dict[int, int] = {}
        self._unmarked: list[int] = []
        self._done_bytes = 0
        self._fetched_bytes = 0
        self._last_progress = time.monotonic()
        self._hasher: _WholeFileHasher | None = None
        self._verified: set[int] = set()
        self.duplicate_chunks = 0  # requests for chunks already verified: the board must make this 0
        self.board = ChunkBoard(manifest.chunk_count)
        self.server_source = Source("server", is_server=True)
        self._peers: dict[tuple[str, int], Source] = {}
        self._peer_secure: dict[tuple[str, int], Secure | None] = {}  # how each peer's connections are secured
        self._peer_connections: set = set()  # open peer sessions' connections, cut when the download ends
        self._threads: list[threading.Thread] = []

    # The whole run ---------------------------------------------------------------

    def run(self) -> tuple[int, int]:
        """Fetch, verify and install the file; returns (bytes fetched, chunks resumed)."""
        state = self.owner.store.begin_download(str(self.final), self.name, self.manifest)
        fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            resumed = self._recheck_resumed(fd, state)
            self._prepare(fd, state, resumed)
            self._hasher = _WholeFileHasher(fd, self.manifest, resumed)
            self._hasher.start()
            try:
                self._fetch_all(fd, state)
            finally:
                self._hasher.finish_or_cancel(self._failure is None and self._all_verified())
                self._flush_marks(state)
            self._check_whole_file(state)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._install(state)
        return self._fetched_bytes, len(resumed)

    def _all_verified(self) -> bool:
        with self._lock:
            return len(self._verified) == self.manifest.chunk_count

    def sources(self) -> dict[str, int]:
        """Bytes received in this run from each source that sent any."""
        everyone = [self.server_source, *self._peers.values()]
        return {source.label: source.bytes for source in everyone if source.bytes}

    def _recheck_resumed(self, fd: int, state: DownloadState) -> set[int]:
        if not state.verified:
            return set()
        good = {i for i in state.verified if _chunk_on_disk_ok(fd, self.manifest, i)}
        if good != state.verified:
            log.warning("%s: %d recorded chunks failed a recheck and will be fetched again",
                        self.name, len(state.verified - good))
            self.owner.store.forget_verified(state.id, state.verified - good)
        log.info("%s: resuming with %d of %d chunks verified", self.name, len(good), self.manifest.chunk_count)
        return good

    def _prepare(self, fd: int, state: DownloadState, resumed: set[int]) -> None:
        if not resumed:
            os.ftruncate(fd, 0)  # a leftover .part with no record is not trusted
        os.ftruncate(fd, self.manifest.size)
        self.board.done.update(resumed)
        self._verified = set(resumed)
        self._done_bytes = sum(self.manifest.chunk_span(i)[1] for i in resumed)
        self._share_partial()
        self._notify()

    def _check_whole_file(self, state: DownloadState) -> None:
        if self._failure is not None:
            raise self._failure
        if not self._all_verified():
            raise DownloadError(f"{self.name}: download stopped before all chunks arrived")
        if self._hasher.hexdigest() != self.manifest.sha256:
            self.owner.store.abandon_download(str(self.final))
            self.part.unlink(missing_ok=True)
            if self.owner.seeder:
                self.owner.seeder.source.drop(self.manifest.sha256)
            raise DownloadError(f"{self.name}: whole-file SHA-256 does not match the manifest; download discarded")

    def _install(self, state: DownloadState) -> None:
        try:
            os.link(self.part, self.final)  # unlike rename, never replaces a file that appeared meanwhile
        except FileExistsError as error:
            raise DownloadError(f"{self.final} appeared during the download; kept {self.part.name}") from error
        fsync_dir(self.final.parent)
        if self.owner.seeder:  # seed from the final name before the .part goes
            self.owner.seeder.source.add_complete(self.final, self.name, self.manifest)
            self.owner.seeder.changed()
        self.part.unlink()
        self.owner.store.finish_download(state.id)
        log.info("%s: downloaded and verified (%d bytes)", self.name, self.manifest.size)

    # Streams --------------------------------------------------------------------

    def _fetch_all(self, fd: int, state: DownloadState) -> None:
        if self.board.finished:
            return
        for n in range(STREAMS_PER_DOWNLOAD):
            self._spawn(self._server_stream, (fd, state), f"get-{self.name[:16]}-server{n}")
        next_refresh = time.monotonic()
        try:
            while not self._stop.is_set() and not self.board.finished:
                if self.cancel.is_set():
                    self._fail(DownloadCancelled(f"{self.name}: stopped; verified chunks are kept"))
                    break
                if self.owner.use_peers and time.monotonic() >= next_refresh:
                    self._find_peers(fd, state)
                    next_refresh = time.monotonic() + PEER_REFRESH_S
                self.board.wait_until_finished(min(CANCEL_CHECK_S, max(0.0, next_refresh - time.monotonic())))
        finally:
            self.board.close()
            self._cut_peer_connections()
            for thread in self._threads:
                thread.join()

    def _cut_peer_connections(self) -> None:
        """The download ended: wake peer streams still waiting for replies nobody needs now."""
        with self._lock:
            connections = list(self._peer_connections)
        for connection in connections:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _spawn(self, target: Callable, args: tuple, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _find_peers(self, fd: int, state: DownloadState) -> None:
        """Ask the tracker who holds this file; start a stream for each new peer."""
        request = protocol.GetPeers(self.manifest.sha256, self.owner.seed_port())
        reply = self.owner.server.try_call(lambda s: s.call(request, protocol.PeerList))
        live = sum(1 for source in self._peers.values() if not source.dropped)  # a dropped peer frees its slot
        for entry in reply.message.peers if reply else []:
            try:
                address, have = (str(entry["host"]), int(entry["port"])), _peer_have(entry, self.manifest)
                secure = self._secure_for(entry)
            except (KeyError, TypeError, ValueError):
                continue  # a malformed entry names nobody we could reach (or no identity we could pin)
            self._peer_secure.setdefault(address, secure)
            source = self._peers.get(address)
            if source is None and live < MAX_PEERS_PER_DOWNLOAD:
                live += 1
                source = self._peers[address] = Source(f"peer {address[0]}:{address[1]}", have=have)
                self.board.add_peer(source)
                self._spawn(self._peer_stream, (source, address, fd, state), f"get-{self.name[:16]}-{source.label}")
            elif source is not None and not source.dropped:
                self.board.update_have(source, have)

    def _secure_for(self, entry: dict) -> Secure | None:
        """TLS that accepts only the identity the tracker gave for this peer; ``ValueError`` if it gave none."""
        client_tls = self.owner.server.secure
        if client_tls is None:
            return None  # transfer.encrypt is false: plain TCP everywhere
        return client_tls.expecting(parse_id(str(entry.get("id") or "")))

    def _server_stream(self, fd: int, state: DownloadState) -> None:
        """Keep a connection to the active server busy until the board is done; fail over as needed."""
        buffer = bytearray(self.manifest.chunk_size)
        delays = backoff_delays(cap_s=MAX_RECONNECT_DELAY_S)
        server = self.owner.server
        try:
            while not self._stop.is_set() and not self.board.closed:
                try:
                    pool = server.active_pool()
                    try:
                        with pool.session() as session:
                            self._pump(session, self.server_source, fd, state, buffer)
                    except ConnectionFailed:
                        server.forget(pool)  # the next attempt asks every server who is active
                        raise
                    delays = backoff_delays(cap_s=MAX_RECONNECT_DELAY_S)
                except ConnectionFailed as error:
                    self._wait_before_reconnect(error, next(delays))
        except BaseException as error:  # hand the failure to the thread running the job
            self._fail(error)

    def _peer_stream(self, source: Source, address: tuple[str, int], fd: int, state: DownloadState) -> None:
        """Pull chunks from one peer; any failure drops it (the others and the server carry on)."""
        buffer = bytearray(self.manifest.chunk_size)
        pool = ConnectionPool(*address, io_timeout_s=self.owner.server.pools[0].io_timeout_s, max_idle=1,
                              secure=self._peer_secure.get(address))
        try:
            while not self.board.closed:
                try:
                    with pool.session() as session:
                        self._pump_peer(session, source, fd, state, buffer)
                    return
                except _IdleConnectionClosed as closed:  # its idle_timeout, not a failure: dial again
                    log.debug("%s: %s; reconnecting", self.name, closed)
        except (ConnectionFailed, RemoteError, ProtocolError, AuthenticationFailed) as error:
            if not self.board.closed:  # after the end, a connection we cut is no failure of the peer
                self.board.drop(source, str(error))
                log.info("%s: stopped using %s: %s", self.name, source.label, error)
        except BaseException as error:
            self._fail(error)
        finally:
            pool.close()

    def _pump_peer(self, session: ServerSession, source: Source, fd: int, state: DownloadState,
                   buffer: bytearray) -> None:
        """``_pump`` on a peer session, which ``_cut_peer_connections`` may cut when the download ends."""
        with self._lock:
            self._peer_connections.add(session.connection)
        try:
            self._pump(session, source, fd, state, buffer)
        finally:
            with self._lock:
                self._peer_connections.discard(session.connection)

    def _pump(self, session: ServerSession, source: Source, fd: int, state: DownloadState,
              buffer: bytearray) -> None:
        """Keep ``pipeline_depth`` requests in flight on ``session`` and take in the replies."""
        in_flight: deque[int] = deque()
        idle = False  # the connection sat unused: the other side may have closed it meanwhile
        try:
            while not self._stop.is_set() and not source.dropped:
                if self.board.closed and not source.is_server:
                    return  # the download ended: what this peer still owes us is not needed
                try:
                    self._send_requests(session, source, in_flight)
                except ConnectionFailed as error:
                    raise _IdleConnectionClosed(str(error)) if idle else error
                if not in_flight:
                    if self.board.closed:
                        return
                    self.board.wait_for_change(IDLE_WAIT_S)
                    idle = True
                    continue
                index = in_flight.popleft()
                try:
                    frame = session.receive(protocol.ChunkData, buffer)
                except RemoteError as error:
                    self.board.release([index], source)
                    self._refused(source, index, error)
                    continue
                except ConnectionFailed as error:
                    in_flight.appendleft(index)
                    raise _IdleConnectionClosed(str(error)) if idle else error
                except BaseException:
                    in_flight.appendleft(index)
                    raise
                idle = False
                self._accept_chunk(fd, state, source, index, frame)
        finally:
            if in_flight:
                session.reusable = False  # their replies would reach the pool's next user
            self.board.release(list(in_flight), source)

    def _send_requests(self, session: ServerSession, source: Source, in_flight: deque[int]) -> None:
        wanted = self.board.take(source, self.owner.pipeline_depth - len(in_flight))
        if not wanted:
            return
        with self._lock:
            self.duplicate_chunks += sum(1 for i in wanted if i in self._verified)
        in_flight.extend(wanted)
        session.connection.send_many([protocol.GetChunk(self.name, self.manifest.sha256, i) for i in wanted])

    def _refused(self, source: Source, index: int, error: RemoteError) -> None:
        """A source answered a chunk request with an error."""
        if source.is_server:
            raise error  # the server does not have what its manifest promised: fatal
        if error.code == ErrorCode.NOT_FOUND and source.have is not None:
            self.board.update_have(source, source.have - {index})  # its announcement was ahead of it
        else:
            raise error

    def _accept_chunk(self, fd: int, state: DownloadState, source: Source, index: int,
                      frame: protocol.Frame) -> None:
        offset, length = self.manifest.chunk_span(index)
        if frame.message.index != index or not self.manifest.verify_chunk(index, frame.payload):
            self.board.release([index], source)
            self._strike(source, index)
            return
        self.owner.download_limit.consume(length)
        if not self.board.arrived(index, source, length):
            return  # an endgame duplicate: the other copy won
        os.pwrite(fd, frame.payload, offset)
        with self._lock:
            self._verified.add(index)
            self._done_bytes += length
            self._fetched_bytes += length
            self._last_progress = time.monotonic()
            self._unmarked.append(index)
            flush = len(self._unmarked) >= MARK_BATCH
        self._hasher.chunk_ready(index)
        if flush:
            self._flush_marks(state)
        self._notify()

    def _strike(self, source: Source, index: int) -> None:
        if not source.is_server:
            dropped = self.board.strike(source, f"chunk {index}")
            log.warning("%s: chunk %d from %s failed SHA-256 verification (strike %d%s)", self.name, index,
                        source.label, source.strikes, "; dropped" if dropped else "")
            return
        with self._lock:
            attempts = self._attempts[index] = self._attempts.get(index, 0) + 1
        log.warning("%s: chunk %d failed SHA-256 verification (attempt %d)", self.name, index, attempts)
        if attempts >= MAX_CHUNK_ATTEMPTS:
            raise DownloadError(
                f"{self.name}: chunk {index} failed SHA-256 verification {attempts} times; "
                "the server's copy is damaged"
            )

    def _wait_before_reconnect(self, error: ConnectionFailed, delay_s: float) -> None:
        deadline_s = self.owner.server.retry_deadline_s
        with self._lock:
            stalled_s = time.monotonic() - self._last_progress
        if stalled_s >= deadline_s:
            raise DownloadError(f"{self.name}: server unreachable for {stalled_s:.0f} s: {error}")
        log.info("%s: %s; reconnecting in %.1f s", self.name, error, delay_s)
        self._stop.wait(min(delay_s, deadline_s - stalled_s))

    # Shared bookkeeping -----------------------------------------------------------

    def _fail(self, error: BaseException) -> None:
        if isinstance(error, RemoteError):
            error = DownloadError(f"{self.name}: {_explain(error)}")
        elif isinstance(error, ProtocolError):
            error = DownloadError(f"{self.name}: the server broke the protocol: {error}")
        with self._lock:
            if self._failure is None:
                self._failure = error
        self._stop.set()
        self.board.close()

    def _flush_marks(self, state: DownloadState) -> None:
        with self._lock:
            batch, self._unmarked = self._unmarked, []
        if batch:
            self.owner.store.mark_verified(state.id, batch)
            self._share_partial()

    def _share_partial(self) -> None:
        """Offer the verified chunks to peers (when seeding) and tell the tracker."""
        seeder = self.owner.seeder
        if seeder is None:
            return
        with self._lock:
            verified = set(self._verified)
        seeder.source.update_partial(self.part, self.name, self.manifest, verified)
        seeder.changed()

    def _notify(self) -> None:
        if self.owner.on_progress is None:
            return
        with self._lock:
            progress = Progress(self.name, self.manifest.size, self._done_bytes, self._fetched_bytes,
                                len(self._verified), self.manifest.chunk_count, self.sources())
        self.owner.on_progress(progress)


class _IdleConnectionClosed(ConnectionFailed):
    """A connection failed on its first use after sitting idle: most likely the other side's idle_timeout."""


def _peer_have(entry: dict, manifest: Manifest) -> set[int] | None:
    """The chunks a tracker entry says a peer holds (None: all of them)."""
    have = entry.get("have")
    if have is None:
        return None
    return protocol.bitmap_to_chunks(base64.b64decode(have, validate=True), manifest.chunk_count)


def _explain(error: RemoteError) -> str:
    if error.code == ErrorCode.STALE_VERSION:
        return "the file changed on the server during the download; run the command again"
    if error.code == ErrorCode.NOT_FOUND:
        return "the file was removed from the server during the download"
    return str(error)


class _WholeFileHasher:
    """Hashes the file in order as its chunks become verified, in its own thread.

    Reading back from the page cache is cheap; doing it alongside the download
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

    def start(self) -> None:
        """Start hashing in the background."""
        self._thread.start()

    def chunk_ready(self, index: int) -> None:
        """Chunk ``index`` is verified and written; any thread."""
        with self._cond:
            self._ready.add(index)
            self._cond.notify()

    def finish_or_cancel(self, finish: bool) -> None:
        """Wait for the hash to complete, or stop it if the download failed."""
        if not finish:
            with self._cond:
                self._cancelled = True
                self._cond.notify()
        self._thread.join()

    def hexdigest(self) -> str:
        """The whole-file SHA-256 (after ``finish_or_cancel(True)``)."""
        return self._hash.hexdigest()

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


def _chunk_on_disk_ok(fd: int, manifest: Manifest, index: int) -> bool:
    offset, length = manifest.chunk_span(index)
    view = memoryview(bytearray(length))
    return read_exactly_at(fd, view, offset) and manifest.verify_chunk(index, view)
