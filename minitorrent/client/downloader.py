"""Downloading one file: verified chunks, resumable, never a corrupt final file.

The life of a download of ``NAME`` into ``DIR``:

1. Fetch the manifest. If ``DIR/NAME`` already exists it must hold exactly
   that content (then there is nothing to do), otherwise the download is
   refused: an existing different file is never overwritten.
2. Open the part file through the part-file lifecycle
   (``minitorrent.common.partfile``): ``DIR/NAME.part`` if it is the one this
   client created and recorded (its recorded chunks are hashed again before
   they are trusted, a local read, not a fetch), otherwise a new one. A
   ``NAME.part`` this client did not create is never touched: the download
   goes to ``NAME.2.part`` (or the next free number) instead.
3. Fetch the missing chunks over a few pooled connections, keeping
   ``pipeline_depth`` requests in flight on each. Every chunk is checked
   against the manifest's digest list *before* it is written; that list is
   bound to the file by the manifest's root (``Manifest.from_header`` refuses
   one that does not match), so once every chunk has passed, the file is
   proven: each byte is hashed once, and no second whole-file pass follows.
   A connection that fails is replaced, with backoff, until ``retry_deadline_s`` passes without progress;
   if the server itself is gone the replacement comes from whichever server
   is active now (the backup after a failover). Every request names the
   file's SHA-256, so chunks of two versions are never mixed. Each verified
   chunk is recorded as it is written, so a killed client loses at most the
   chunks it was receiving; a write-back thread flushes the part file every
   64 MiB, so the final ``fsync`` has little left to do.
4. Only once every chunk is verified is the part file synced and linked to
   its final name (``os.link``, which refuses to replace anything) and the
   record moved to the completed files.
"""
from __future__ import annotations

import base64
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from database import ClientStore
from error_handler import (
    AuthenticationFailed,
    ConnectionFailed,
    DownloadCancelled,
    DownloadError,
    MiniTorrentError,
    RemoteError,
    backoff_delays,
)
from integrity import Manifest
from minitorrent.client.chunkboard import ChunkBoard, ChunkSet, Source
from minitorrent.client.progress import Progress
from minitorrent.common.fs import regular_file_sha256
from minitorrent.common.partfile import PART_SUFFIX, FinalNameTaken, PartFile, PartFileRefused
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

# Where folder downloads stage their small files, inside the output folder (same file system: a rename is atomic).
# No download is written there: a served folder of that name would mix with the staged trees and their locks.
STAGING = ".minitorrent-incoming"
STREAMS_PER_DOWNLOAD = 2  # two cores: one stream hashes while the other receives
MAX_CHUNK_ATTEMPTS = 3  # a chunk failing verification this often means the source is damaged
SHARE_BATCH = 8  # verified chunks offered to peers at a time (each is recorded at once)
MAX_PEERS_PER_DOWNLOAD = 8  # peer streams of one download, beside the server's
PEER_REFRESH_S = 1.0  # how often a download asks the tracker for (new) peers
CANCEL_CHECK_S = 0.1  # how soon a pause or cancel takes effect
IDLE_WAIT_S = 0.2  # a stream with nothing to request looks again at least this often


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
        use_peers: bool = True,
        seeder: Seeder | None = None,
        download_limit: TokenBucket | None = None,
    ) -> None:
        self.server = server
        self.store = store
        self.pipeline_depth = pipeline_depth
        self.on_progress = on_progress
        self.use_peers = use_peers
        self.seeder = seeder  # offers what is verified to other clients while downloading
        self.download_limit = download_limit or TokenBucket(0)

    def seed_port(self) -> int:
        """This client's seed port (0 if not seeding): the tracker leaves us out of our own peers."""
        return self.seeder.port if self.seeder else 0

    def download(self, name: str, output_dir: Path, cancel: threading.Event | None = None) -> DownloadResult:
        """Download ``name`` into ``output_dir``; raise ``DownloadError`` with a one-line reason.

        On failure no file exists under the final name; verified chunks stay
        in the part file (``NAME.part``, or ``NAME.2.part`` if another
        program's ``NAME.part`` is there) so that running it again resumes.
        Setting ``cancel`` (from any thread) stops the download within a
        fraction of a second with ``DownloadCancelled``: a pause, resumable
        the same way.
        """
        started = time.monotonic()
        name = _checked_name(name)
        manifest = self._fetch_manifest(name)
        final = destination(output_dir, name)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                return self._already_present(name, final, manifest, started)
            job = _Job(self, name, final, Path(output_dir), manifest, cancel or threading.Event())
            fetched, resumed = job.run()
        except OSError as error:
            raise DownloadError(f"{name}: cannot write {error.filename or final}: {error.strerror or error}") from error
        except PartFileRefused as error:  # no free part name, or no room for the file
            raise DownloadError(str(error)) from error
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
        if regular_file_sha256(final) != manifest.sha256:  # opened, then checked: a FIFO swapped in cannot block us
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


def destination(output_dir: Path, name: str) -> Path:
    """Where ``name`` goes under ``output_dir``; ``DownloadError`` unless it stays inside it.

    ``name`` has passed ``check_file_name`` (no ``..``, not absolute), but a
    link already inside the output folder (``photos -> /etc``) would still
    lead out: the real path of the file's folder must lie under the real
    output folder before anything is created. Nothing goes in ``STAGING``.
    """
    final = Path(output_dir) / _checked_name(name)
    if name.partition("/")[0] == STAGING:
        raise DownloadError(f"{name}: {STAGING} is where folder downloads stage their files; not written there")
    real_output = os.path.realpath(output_dir)
    if os.path.commonpath([os.path.realpath(final.parent), real_output]) != real_output:
        raise DownloadError(f"{name}: would be written outside {output_dir} (through a link); refused")
    return final


class _Job:
    """The state of one running download, shared by its stream threads.

    The servers (two streams, failing over between main and backup) and each
    peer the tracker names (one stream each) pull work from one
    ``ChunkBoard``; every chunk is verified before it is written, whoever
    sent it.
    """

    def __init__(self, owner: Downloader, name: str, final: Path, output_dir: Path, manifest: Manifest,
                 cancel: threading.Event) -> None:
        self.owner = owner
        self.cancel = cancel
        self.name = name
        self.final = final
        self.output_dir = output_dir  # the file's folder must lie inside it, also when the file is installed
        self.manifest = manifest
        self.part: PartFile | None = None  # once run() has opened it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._attempts: dict[int, int] = {}
        self._unshared = 0  # verified chunks not yet offered to peers
        self._done_bytes = 0
        self._fetched_bytes = 0
        self._last_progress = time.monotonic()
        self._verified = ChunkSet(manifest.chunk_count)  # a live view the seeder serves from
        self.duplicate_chunks = 0  # requests for chunks already verified: the board must make this 0
        self.board = ChunkBoard(manifest.chunk_count)
        self.server_source = Source("server", is_server=True)
        self._peers: dict[tuple[str, int], Source] = {}
        self._announced: dict[tuple[str, int], str | None] = {}  # each peer's last bitmap from the tracker, as sent
        self._peer_secure: dict[tuple[str, int], Secure | None] = {}  # how each peer's connections are secured
        self._peer_connections: set = set()  # open peer sessions' connections, cut when the download ends
        self._threads: list[threading.Thread] = []

    # The whole run ---------------------------------------------------------------

    def run(self) -> tuple[int, int]:
        """Fetch, verify and install the file; returns (bytes fetched, chunks resumed)."""
        part = PartFile.open(self.owner.store, self.final, self.name, self.manifest,
                             self.final.with_name(self.final.name + PART_SUFFIX), prove_whole_file=False,
                             inside=self.output_dir)
        self.part = part
        try:
            if part.resumed:
                log.info("%s: resuming with %d of %d chunks verified", self.name, len(part.resumed),
                         self.manifest.chunk_count)
            self._prepare(part)
            try:
                self._fetch_all(part)
            finally:
                self._share_partial()
            self._install(part)
        finally:
            part.close()
        return self._fetched_bytes, len(part.resumed)

    def sources(self) -> dict[str, int]:
        """Bytes received in this run from each source that sent any."""
        everyone = [self.server_source, *self._peers.values()]
        received = {source.label: self.board.status(source).bytes for source in everyone}
        return {label: nbytes for label, nbytes in received.items() if nbytes}

    def _prepare(self, part: PartFile) -> None:
        self.board.mark_done(part.resumed)
        self._verified.update(part.resumed)
        self._done_bytes = sum(self.manifest.chunk_span(i)[1] for i in part.resumed)
        self._share_partial()
        self._notify()

    def _install(self, part: PartFile) -> None:
        if self._failure is not None:
            raise self._failure
        if not part.complete:
            raise DownloadError(f"{self.name}: download stopped before all chunks arrived")
        try:
            part.install(on_installed=self._seed_whole)  # every chunk matched the root-bound digest list
        except FinalNameTaken as error:
            raise DownloadError(f"{self.final} appeared during the download; kept {part.path.name}") from error
        log.info("%s: downloaded and verified (%d bytes)", self.name, self.manifest.size)

    def _seed_whole(self, final: Path) -> None:
        """Seed from the final name before the part file's name goes."""
        if self.owner.seeder:
            self.owner.seeder.source.add_complete(final, self.name, self.manifest)
            self.owner.seeder.changed()

    # Streams --------------------------------------------------------------------

    def _fetch_all(self, part: PartFile) -> None:
        if self.board.finished:
            return
        # A second stream for a single missing chunk would only hold a server slot another client needs.
        for n in range(min(STREAMS_PER_DOWNLOAD, self.board.remaining())):
            self._spawn(self._server_stream, (part,), f"get-{self.name[:16]}-server{n}")
        next_refresh = time.monotonic()
        try:
            while not self._stop.is_set() and not self.board.finished:
                if self.cancel.is_set():
                    self._fail(DownloadCancelled(f"{self.name}: stopped; verified chunks are kept"))
                    break
                if self.owner.use_peers and time.monotonic() >= next_refresh:
                    self._find_peers(part,)
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

    def _find_peers(self, part: PartFile) -> None:
        """Ask the tracker who holds this file; start a stream for each new peer."""
        request = protocol.GetPeers(self.manifest.sha256, self.owner.seed_port())
        reply = self.owner.server.try_call(lambda s: s.call(request, protocol.PeerList))
        # A dropped peer frees its slot.
        live = sum(1 for source in self._peers.values() if not self.board.is_dropped(source))
        for entry in reply.message.peers if reply else []:
            try:
                address = (str(entry["host"]), int(entry["port"]))
                if address in self._peers and self._announced.get(address) == entry.get("have"):
                    continue  # the same holdings as a second ago: nothing to decode or recount
                have = _peer_have(entry, self.manifest)
                secure = self._secure_for(entry)
            except (KeyError, TypeError, ValueError):
                continue  # a malformed entry names nobody we could reach (or no identity we could pin)
            self._announced[address] = entry.get("have")
            self._peer_secure.setdefault(address, secure)
            source = self._peers.get(address)
            if source is None and live < MAX_PEERS_PER_DOWNLOAD:
                live += 1
                source = self._peers[address] = Source(f"peer {address[0]}:{address[1]}", have=have)
                self.board.add_peer(source)
                self._spawn(self._peer_stream, (source, address, part), f"get-{self.name[:16]}-{source.label}")
            elif source is not None and not self.board.is_dropped(source):
                self.board.update_have(source, have)

    def _secure_for(self, entry: dict) -> Secure | None:
        """TLS that accepts only the identity the tracker gave for this peer; ``ValueError`` if it gave none."""
        client_tls = self.owner.server.secure
        if client_tls is None:
            return None  # transfer.encrypt is false: plain TCP everywhere
        return client_tls.expecting(parse_id(str(entry.get("id") or "")))

    def _server_stream(self, part: PartFile) -> None:
        """Keep a connection to the active server busy until the board is done; fail over as needed."""
        buffer = bytearray(self.manifest.chunk_size)
        delays = backoff_delays(cap_s=MAX_RECONNECT_DELAY_S)
        server = self.owner.server
        try:
            while not self._stop.is_set() and not self.board.closed:
                try:  # a failed server is forgotten: the next attempt asks every server who is active
                    server.attempt(lambda session: self._pump(session, self.server_source, part, buffer))
                    delays = backoff_delays(cap_s=MAX_RECONNECT_DELAY_S)
                except ConnectionFailed as error:
                    self._wait_before_reconnect(error, next(delays))
        except BaseException as error:  # hand the failure to the thread running the job
            self._fail(error)

    def _peer_stream(self, source: Source, address: tuple[str, int], part: PartFile) -> None:
        """Pull chunks from one peer; any failure drops it (the others and the server carry on)."""
        buffer = bytearray(self.manifest.chunk_size)
        pool = ConnectionPool(*address, io_timeout_s=self.owner.server.io_timeout_s, max_idle=1,
                              secure=self._peer_secure.get(address))
        try:
            while not self.board.closed:
                try:
                    with pool.session() as session:
                        self._pump_peer(session, source, part, buffer)
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

    def _pump_peer(self, session: ServerSession, source: Source, part: PartFile,
                   buffer: bytearray) -> None:
        """``_pump`` on a peer session, which ``_cut_peer_connections`` may cut when the download ends."""
        with self._lock:
            self._peer_connections.add(session.connection)
        try:
            self._pump(session, source, part, buffer)
        finally:
            with self._lock:
                self._peer_connections.discard(session.connection)

    def _pump(self, session: ServerSession, source: Source, part: PartFile,
              buffer: bytearray) -> None:
        """Keep ``pipeline_depth`` requests in flight on ``session`` and take in the replies."""
        in_flight: deque[int] = deque()
        idle = False  # the connection sat unused: the other side may have closed it meanwhile
        try:
            while not self._stop.is_set() and not self.board.is_dropped(source):
                if self.board.closed and not source.is_server:
                    return  # the download ended: what this peer still owes us is not needed
                try:
                    self._send_requests(session, source, in_flight, part)
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
                self._accept_chunk(part, source, index, frame)
        finally:
            if in_flight:
                session.reusable = False  # their replies would reach the pool's next user
            self.board.release(list(in_flight), source)

    def _send_requests(self, session: ServerSession, source: Source, in_flight: deque[int], part: PartFile) -> None:
        depth = self.owner.pipeline_depth
        if len(in_flight) > depth // 2:
            return  # refill by halves: one send (one GIL hand-off, one board pick) per half pipeline, not per chunk
        wanted = self.board.take(source, depth - len(in_flight))
        if not wanted:
            return
        duplicates = sum(1 for i in wanted if part.has(i))
        with self._lock:
            self.duplicate_chunks += duplicates
        in_flight.extend(wanted)
        session.connection.send_many([protocol.GetChunk(self.name, self.manifest.sha256, i) for i in wanted])

    def _refused(self, source: Source, index: int, error: RemoteError) -> None:
        """A source answered a chunk request with an error."""
        if source.is_server:
            raise error  # the server does not have what its manifest promised: fatal
        if error.code == ErrorCode.NOT_FOUND and self.board.lacks(source, index):
            return  # a peer's announcement was ahead of what it holds: someone else brings the chunk
        raise error

    def _accept_chunk(self, part: PartFile, source: Source, index: int,
                      frame: protocol.Frame) -> None:
        length = self.manifest.chunk_span(index)[1]
        if frame.message.index != index or not self.manifest.verify_chunk(index, frame.payload):
            self.board.release([index], source)
            self._strike(source, index)
            return
        self.owner.download_limit.consume(length)
        if not self.board.arrived(index, source, length):
            return  # an endgame duplicate: the other copy won
        part.write_verified(index, frame.payload)  # recorded before it counts: a kill cannot lose it
        self._verified.add(index)
        with self._lock:
            self._done_bytes += length
            self._fetched_bytes += length
            self._last_progress = time.monotonic()
            self._unshared += 1
            share = self._unshared >= SHARE_BATCH
        if share:
            self._share_partial()
        self._notify()

    def _strike(self, source: Source, index: int) -> None:
        if not source.is_server:
            dropped = self.board.strike(source, f"chunk {index}")
            log.warning("%s: chunk %d from %s failed SHA-256 verification (strike %d%s)", self.name, index,
                        source.label, self.board.status(source).strikes, "; dropped" if dropped else "")
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

    def _share_partial(self) -> None:
        """Offer the verified chunks to peers (when seeding) and tell the tracker."""
        with self._lock:
            self._unshared = 0
        seeder = self.owner.seeder
        if seeder is None:
            return
        seeder.source.update_partial(self.part.path, self.name, self.manifest, self._verified)  # live: no copy
        seeder.changed()

    def _notify(self) -> None:
        if self.owner.on_progress is None:
            return
        chunks_done = self.part.verified_count
        with self._lock:
            progress = Progress(self.name, self.manifest.size, self._done_bytes, self._fetched_bytes,
                                chunks_done, self.manifest.chunk_count, self.sources())
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
