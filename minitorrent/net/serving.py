"""The request-serving core shared by every program that serves chunks.

The main server and the backup serve their catalogs through it, and a
seeding client will serve its files through the same code, each by handing
it a different ``FileSource``. The server owns the listening socket, caps the
number of connections, and runs one handler thread per connection. A handler
reads a request, answers it, and loops until the peer leaves, goes idle past
``idle_timeout_s``, or breaks the framing.

Shared state lives on the server (the source, metrics, the set of open
connections); a handler only keeps what belongs to its connection, its
``ConnectionState`` first.

Slots. A greeted client takes one of ``max_connections`` client slots; the
peer server's connections take one of ``PEER_SLOTS`` once they
authenticate (never before: anyone can claim to be the peer). Connections
still in their handshake get ``handshake_room`` places beyond the client
slots, and must finish it (a client's hello, or a peer's proof) within
``handshake_timeout_s`` of connecting, however they trickle bytes or
whatever else they send meanwhile. When the places are full, a newcomer is
not simply turned away: the server sheds a connection that is waiting for a
request, idle for ``SHED_IDLE_AFTER_S``, or from an address holding more
slots than the newcomer's (see ``choose_idle_victim``), so idle connections
(a client's own pooled ones, or a stranger's dozen) never lock out
connections with work to do, and one machine cannot keep another out. Only
when every slot is busy answering a request (or fairly held) is a newcomer
told BUSY.
"""
from __future__ import annotations

import enum
import logging
import os
import selectors
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import BinaryIO, Callable, Protocol

from error_handler import ConnectionFailed, MiniTorrentError
from metrics import Metrics
from minitorrent.common.fs import ChunkLocation
from minitorrent.net.throttle import TokenBucket
from minitorrent.net.tracker import Tracker
from minitorrent.wire import auth, protocol
from minitorrent.wire.identity import verify_identify
from minitorrent.wire.protocol import (
    ErrorCode,
    ErrorReply,
    Frame,
    Message,
    ProtocolError,
    RequestFailed,
)
from minitorrent.wire.tls import ServerTls, server_identity
from minitorrent.wire.transport import Connection, ConnectionClosed

log = logging.getLogger(__name__)

BUSY_REPLY_TIMEOUT_S = 1.0  # a turned-away client gets this long to read "busy"
ACCEPT_RETRY_S = 0.1  # pause after a failed accept()
SHED_IDLE_AFTER_S = 1.0  # a connection idle this long may give its slot to a newcomer (a stream never is)
HELLO_WAIT_S = 5.0  # a hello finding every client slot busy waits up to this (and half the handshake deadline)
SLOT_RECHECK_S = 0.25  # a waiting hello looks again this often for a connection idle long enough to shed
MAX_LINGERING_TURNED_AWAY = 32  # turned-away connections closed gently at once (beyond: closed at once)


class ConnectionState(enum.Enum):
    """Where one connection is in its life; only ever moves forward."""

    NEW = "new"  # connected, no hello yet: must say it within the handshake deadline
    GREETED = "greeted"  # a client that said hello: it holds a client slot
    CHALLENGED = "challenged"  # claims to be the peer server: must prove it within the handshake deadline
    AUTHENTICATED = "authenticated"  # the peer server, proven: it holds a peer slot
    CLOSING = "closing"  # on its way out (shed, refused or done): holds no slot

    @property
    def in_handshake(self) -> bool:
        """True while the connection must still finish its handshake (under the deadline)."""
        return self in (ConnectionState.NEW, ConnectionState.CHALLENGED)


class ServingRole(Protocol):
    """The server's role as the serving core sees it (the server floor's ``NodeState`` is one).

    The serving core only asks whether to serve and reports the epochs it hears;
    the rules that decide roles live on the server floor.
    """

    server_id: str

    @property
    def role(self) -> enum.Enum:
        """The current role (its ``value`` goes into replies)."""

    @property
    def epoch(self) -> int:
        """The current epoch."""

    @property
    def primary(self) -> str:
        """The address of the server believed active, as "host:port" ("" if unknown)."""

    def is_active(self) -> bool:
        """True while this server serves clients now (what replies give as its role)."""

    def check_serving(self) -> None:
        """Raise ``RequestFailed`` (NOT_ACTIVE) unless this server serves clients now."""

    def observe_epoch(self, epoch: int, source: str, primary: str = "") -> bool:
        """Learn of ``epoch`` from ``source``; True if it made this server step down."""


@dataclass(frozen=True)
class ListingPage:
    """Entries of a listing after some name, encoded for a cursor page (see ``FileSource.list_page``)."""

    entries: bytes  # by name, in ``layout``: "" a JSON array of entry objects (as ``list_files`` gives them)
    count: int  # how many entries
    last_name: str  # the name of the last one ("" when there is none)
    more: bool  # whether a next page may hold more (False: this page ends the listing)
    layout: str = ""  # or protocol.LIST_LAYOUT_PACKED (see protocol.pack_list_columns)


class FileSource(Protocol):
    """What a server serves from. Called from handler threads concurrently."""

    def list_files(self, search: str, offset: int = 0, limit: int | None = None) -> tuple[list[dict], int]:
        """A page of the entries whose names contain ``search`` (any case), by name, and how many match."""

    def list_page(self, search: str, after: str, limit: int, matches: int, under: str = "",
                  layout: str = "", counts: bool = True) -> ListingPage:
        """Up to ``limit`` entries whose names contain ``search`` and sort after ``after``, by name.

        ``matches`` is how many names matched when the listing began (a hint).
        ``under`` (a folder ending in ``/``, or ""): only names that start with it.
        ``layout``, the one the client asked for (the page says which it is in).
        ``counts`` false: the entries' download counts may be left 0.
        """

    def count_matching(self, search: str, under: str = "") -> int:
        """How many names contain ``search`` (any case); all of them for "" (only those under ``under``)."""

    def count_files(self) -> tuple[int, int]:
        """(number of files, total bytes)."""

    def manifest(self, name: str) -> tuple[dict, bytes]:
        """(manifest header, raw chunk digests); ``RequestFailed`` if unknown."""

    def locate_chunk(self, name: str, sha256: str, index: int) -> ChunkLocation:
        """Where chunk ``index`` of that version of ``name`` is; ``RequestFailed`` if not served."""

    def locate_files(self, names: list[str], sha256s: list[str]) -> list[ChunkLocation | RequestFailed]:
        """``locate_chunk(name, sha256, 0)`` for each file of a ``get_files`` batch, or the ``RequestFailed`` it raises."""

    def shared_versions(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Those of the (name, sha256) pairs shared as that version, in order (one query)."""

    def record_downloads(self, pairs: list[tuple[str, str]]) -> list[str]:
        """Clients finished and verified downloads of these (name, sha256): counted in one commit where they are
        stored; the names counted."""


class ClientAccess(Protocol):
    """Who may download, and whose reports count (the server floor's access policy is one)."""

    def allows(self, identity: str) -> bool:
        """May the client with this proven identity ("" if none) list and download? Any thread."""

    def first_reports(self, identity: str, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The (name, sha256) pairs this identified client reports for the first time (none for no identity)."""


class PeerConnection(Protocol):
    """What a peer handler gets of the authenticated peer's connection: a way to answer it."""

    @property
    def peer(self) -> str:
        """The peer's address, "host:port", for logs."""

    def send(self, message: Message, payload: bytes | memoryview = b"") -> None:
        """Send one reply (raises ``ConnectionClosed``)."""


PeerHandler = Callable[[PeerConnection, Frame], None]
PEER_SLOTS = 4  # authenticated peer connections, beyond max_connections: a full server still hears its peer


class RequestServer:
    """Serve a ``FileSource`` on a TCP port to up to ``max_connections`` clients.

    ``node`` says whether client requests are served (active) or refused with
    STANDBY, and carries the epoch; without one the server is always active
    at epoch 0. ``peer_handlers`` answer the peer (replication) requests of
    an authenticated main server; ``secret`` is what it must prove to know,
    and ``peer_identity`` (when set) the identity it must prove to have.
    With ``epoch_secret`` (the cluster secret) the welcome carries a proof of
    this server's epoch, and an epoch a client relays is believed only with
    such a proof.
    ``status_extra()`` adds entries to status replies. With a ``tracker``
    it answers seeding clients' announcements and peer requests;
    ``upload_limit`` paces every chunk it sends. With ``tls`` every
    connection runs over TLS 1.3 with that identity, clients prove theirs
    (``Identify``), and ``access`` says which may download and whose
    reports count; ``client_handlers`` answer further client requests.
    """

    def __init__(
        self,
        source: FileSource,
        *,
        host: str,
        port: int,
        name: str,
        max_connections: int,
        idle_timeout_s: float,
        io_timeout_s: float,
        metrics: Metrics | None = None,
        node: ServingRole | None = None,
        secret: str = "",
        secret_hint: str = "the servers do not share the same server.secret",
        peer_handlers: dict[type[Message], PeerHandler] | None = None,
        status_extra: Callable[[], dict] | None = None,
        tracker: Tracker | None = None,
        upload_limit: TokenBucket | None = None,
        epoch_secret: str = "",
        tls: ServerTls | None = None,
        access: ClientAccess | None = None,
        client_handlers: dict[type[Message], PeerHandler] | None = None,
        peer_identity: str = "",
    ) -> None:
        self.source = source
        self.epoch_secret = epoch_secret
        self._unproven_epoch_logged = False
        self.tls = tls  # None: plain TCP (tests of the framing, and benchmarks that ask for it)
        self.access = access  # None: every client may download, every report counts
        self.client_handlers = client_handlers or {}  # extra requests of greeted clients (pairing)
        self.tracker = tracker
        self.upload_limit = upload_limit or TokenBucket(0)
        self.name = name
        self.node = node
        self.secret = secret
        self.secret_hint = secret_hint
        self.peer_identity = peer_identity  # the identity the peer must prove besides the secret ("": any)
        self.peer_handlers = peer_handlers or {}
        self.status_extra = status_extra
        self.server_id = node.server_id if node else uuid.uuid4().hex[:12]
        self.metrics = metrics or Metrics()
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.io_timeout_s = io_timeout_s
        self.handshake_timeout_s = min(io_timeout_s, idle_timeout_s)
        self.shed_idle_after_s = SHED_IDLE_AFTER_S
        self.hello_wait_s = min(HELLO_WAIT_S, self.handshake_timeout_s / 2)  # the client's hello waits io_timeout
        # Connections in their handshake beyond the clients': the peer must get in to prove itself, and in a
        # crowd as many hellos may wait for a slot as there are slots.
        self.handshake_room = max(PEER_SLOTS, max_connections)
        self._requested_address = (host, port)
        self._listener: socket.socket | None = None
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._lock = threading.Lock()
        self._slot_freed = threading.Condition(self._lock)  # a client slot was given back
        self._handlers: dict[threading.Thread, _Handler] = {}
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lingering = threading.BoundedSemaphore(MAX_LINGERING_TURNED_AWAY)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound; the port is real even if 0 was asked."""
        if self._listener is None:
            raise RuntimeError("server not started")
        return self._listener.getsockname()[:2]

    def start(self) -> tuple[str, int]:
        """Bind, listen and start accepting in a background thread.

        Raises ``MiniTorrentError`` if the address cannot be bound.
        """
        host, port = self._requested_address
        try:
            self._listener = socket.create_server((host, port), backlog=128, reuse_port=False)
        except OSError as error:
            raise MiniTorrentError(f"cannot listen on {host}:{port}: {error.strerror or error}") from error
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"{self.name}-accept", daemon=True)
        self._accept_thread.start()
        log.info("%s listening on %s:%d (max %d clients)", self.name, *self.address, self.max_connections)
        return self.address

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, close every connection and wait for the handlers."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wakeup_w.send(b"x")
        if self._accept_thread:
            self._accept_thread.join(timeout_s)
        with self._lock:
            handlers = dict(self._handlers)
        for handler in handlers.values():
            _shutdown(handler.connection.sock)
        for thread in handlers:
            thread.join(timeout_s)
        if self._listener:
            self._listener.close()
        self._wakeup_r.close()
        self._wakeup_w.close()
        log.info("%s stopped", self.name)

    # Accepting -----------------------------------------------------------------

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wakeup_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._listener:
                        self._accept_one()

    def _accept_one(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError as error:  # out of file descriptors, say: pause rather than spin on select()
            log.warning("accept failed: %s", error)
            self._stopping.wait(ACCEPT_RETRY_S)
            return
        try:
            self._hand_to_thread(sock)
        except Exception:  # a connection we cannot serve must not end the accepting
            log.exception("cannot serve a new connection")
            sock.close()

    def _hand_to_thread(self, sock: socket.socket) -> None:
        if self.tls:
            sock = self.tls.wrap(sock)  # the handshake itself runs in the connection's thread
        connection = Connection(sock, io_timeout_s=self.io_timeout_s, idle_timeout_s=self.handshake_timeout_s)
        handler = _Handler(self, connection)
        thread = threading.Thread(target=self._serve, args=(handler,), daemon=True,
                                  name=f"{self.name}-conn-{connection.peer}")
        with self._lock:
            admitted = self._take_place(handler.source, ConnectionState.NEW)
            if admitted:
                self._handlers[thread] = handler
        if not admitted:
            self.turn_away(connection)
            return
        try:
            thread.start()
        except RuntimeError:  # no more threads: forget the slot and let the caller close the socket
            with self._lock:
                self._handlers.pop(thread, None)
            raise

    def _take_place(self, source: str, becoming: ConnectionState) -> bool:
        """True if there is room for a connection from ``source`` becoming ``becoming``, shedding one if need be.

        ``NEW`` (a connection just accepted) competes with everything but the
        authenticated peer for ``max_connections + handshake_room`` places;
        ``GREETED`` (a client's hello) with the other clients for the
        ``max_connections`` slots. Called under ``_lock``.
        """
        if becoming is ConnectionState.GREETED:
            holders, room = [h for h in self._handlers.values() if h.state is ConnectionState.GREETED], 0
        else:
            holders = [h for h in self._handlers.values() if h.state.in_handshake or h.state is ConnectionState.GREETED]
            room = self.handshake_room
        if len(holders) < self.max_connections + room:
            return True
        victim = choose_idle_victim(holders, source, time.monotonic(), self.shed_idle_after_s)
        if victim is None:
            return False
        log.info("full: shedding idle connection %s (%s) for a newcomer from %s",
                 victim.connection.peer, victim.state.value, source)
        victim.shed()
        return True

    def take_client_slot(self, handler: _Handler) -> bool:
        """Make a client's connection GREETED once a client slot is (or can be made) free.

        A hello finding every slot busy waits up to ``hello_wait_s`` for one to
        be given back, so that in a crowd the next free slot goes to a
        connection already waiting, and BUSY (and a client's retry at random)
        stays the exception. False if none came free in time.
        """
        deadline = time.monotonic() + self.hello_wait_s
        with self._slot_freed:
            while handler.state is ConnectionState.NEW:
                if self._take_place(handler.source, ConnectionState.GREETED):
                    handler.state = ConnectionState.GREETED
                    break
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping.is_set():
                    break
                self._slot_freed.wait(min(left, SLOT_RECHECK_S))  # meanwhile a holder may have idled long enough
            return handler.state is ConnectionState.GREETED

    def slot_freed(self) -> None:
        """Wake the hellos waiting for a client slot (a connection is closing). Not under ``_lock``."""
        with self._slot_freed:
            self._slot_freed.notify_all()

    def turn_away(self, connection: Connection) -> None:
        """Tell a connection the server is busy, and close it."""
        log.info("busy: turned away %s (%d clients connected)", connection.peer, self.max_connections)
        connection.io_timeout_s = BUSY_REPLY_TIMEOUT_S
        try:
            connection.send(ErrorReply(ErrorCode.BUSY, f"server busy: {self.max_connections} clients connected, retry later"))
        except ConnectionClosed:
            pass
        self.metrics.request_done(ok=False)
        self._close_gently(connection)

    def _close_gently(self, connection: Connection) -> None:
        """Lingering close off the accepting thread (a peer that never closes must not stall accepts).

        At most ``MAX_LINGERING_TURNED_AWAY`` at a time; past that the
        connection is closed at once (its BUSY may then be lost to a reset,
        which the client treats as busy too).
        """
        if not self._lingering.acquire(blocking=False):
            connection.close()
            return

        def linger() -> None:
            try:
                connection.close_lingering()
            finally:
                self._lingering.release()

        try:
            threading.Thread(target=linger, name=f"{self.name}-turned-away", daemon=True).start()
        except RuntimeError:  # no more threads
            self._lingering.release()
            connection.close()

    def connection_states(self) -> list[ConnectionState]:
        """The state of every open connection (for status and tests); any thread."""
        with self._lock:
            return [handler.state for handler in self._handlers.values()]

    def take_peer_slot(self, handler: _Handler) -> bool:
        """Move a proven peer's connection to a peer slot (AUTHENTICATED); False if they are all taken."""
        with self._lock:
            peers = sum(1 for h in self._handlers.values() if h.state is ConnectionState.AUTHENTICATED)
            if peers >= PEER_SLOTS or handler.state is not ConnectionState.CHALLENGED:
                return False
            handler.state = ConnectionState.AUTHENTICATED
            return True

    def welcome(self, nonce: str = "", proof: str = "") -> protocol.Welcome:
        """The welcome this server gives now: its role, epoch (proven while active) and who is primary."""
        node = self.node
        role, epoch, primary = ("active", 0, "")
        if node:  # whether it serves *now*: a leader whose lease may have run out says standby, and refuses
            role, epoch, primary = ("active" if node.is_active() else "standby"), node.epoch, node.primary
        epoch_proof = auth.prove_epoch(self.epoch_secret, epoch, self.server_id) if node and role == "active" else ""
        return protocol.Welcome(protocol.PROTOCOL_VERSION, role, epoch, self.server_id, self.name, primary,
                                nonce, proof, epoch_proof, protocol.FEATURES)

    def observe_relayed_epoch(self, hello: protocol.Hello, peer: str) -> None:
        """Learn the epoch a client relays, if a server holding the cluster secret proved it; else ignore it.

        An epoch is authority: a stranger's hello must not make this server
        step down (or, later, promote past it). The first unproven claim is
        logged as a warning, later ones only at debug level.
        """
        if self.node is None or hello.epoch <= self.node.epoch:
            return
        if auth.epoch_proof_ok(self.epoch_secret, hello.epoch, hello.epoch_server, hello.epoch_proof):
            self.node.observe_epoch(hello.epoch, f"a proof from server {hello.epoch_server} relayed by {peer}")
            return
        level = logging.DEBUG if self._unproven_epoch_logged else logging.WARNING
        self._unproven_epoch_logged = True
        log.log(level, "ignored epoch %d from %s: no proof from a server of this cluster (logged once)",
                hello.epoch, peer)

    # Serving one connection ----------------------------------------------------------

    def _serve(self, handler: _Handler) -> None:
        self.metrics.connection_opened()
        try:
            if self.tls:
                self.tls.handshake(handler.connection.sock, self.handshake_timeout_s)
            handler.handle()
        except ConnectionFailed as failed:
            log.debug("%s: %s", handler.connection.peer, failed)
        finally:
            handler.finish()
            self.metrics.connection_closed()
            with self._lock:
                self._handlers.pop(threading.current_thread(), None)


def choose_idle_victim(holders: list[_Handler], newcomer: str, now: float,
                       idle_after_s: float = SHED_IDLE_AFTER_S) -> _Handler | None:
    """The connection to shed for a newcomer from address ``newcomer``, or None if none may go.

    A connection answering a request is never shed. One waiting for its
    next frame may be, if it has been idle ``idle_after_s`` (a download
    stream never is) or if its address holds more slots than the newcomer's
    would (slots are shared fairly per address, so a dozen connections from
    one machine, however busy, cannot keep another machine out). The address
    holding the most slots loses first; within it a connection still in its
    handshake, then the longest idle.
    """
    held: dict[str, int] = {newcomer: 1}
    for handler in holders:
        held[handler.source] = held.get(handler.source, 0) + 1
    candidates = [h for h in holders if h.idle_for(now) > 0
                  and (h.idle_for(now) >= idle_after_s or held[h.source] > held[newcomer])]
    if not candidates:
        return None
    return max(candidates, key=lambda h: (held[h.source], h.state.in_handshake, h.idle_for(now)))


class _Handler:
    """Serves the requests of one connection, in order.

    A connection says hello first. A client is then served while the node is
    active. A peer (the main server) must also prove it knows the shared
    secret before its replication requests are answered.
    """

    CLIENT_REQUESTS = (protocol.GetChunk, protocol.ListFiles, protocol.GetManifest, protocol.CountFiles,
                       protocol.ReportDownloaded, protocol.Announce, protocol.GetPeers, protocol.GetFiles,
                       protocol.ReportDownloadedMany, protocol.GetBatch, protocol.ReportDownloadedBatch)

    def __init__(self, server: RequestServer, connection: Connection) -> None:
        self.server = server
        self.connection = connection
        self.source = _source_host(connection)  # the address slots are shared by
        self.state = ConnectionState.NEW
        self.peer_nonce = ""  # our challenge to a peer, until it answers
        self._handshake_deadline = time.monotonic() + server.handshake_timeout_s
        self._idle_since: float | None = time.monotonic()  # None while a request is being answered
        self._open_file: tuple[str, BinaryIO] | None = None
        self._counted_sent = 0
        self._counted_received = 0
        self._bound = server_identity(connection.sock)  # our identity, which the peer's proofs must cover
        self.client_nonce = ""  # our challenge to a client, until it proves its identity
        self.client_identity = ""  # the identity the client proved ("" if none)
        self.kept: dict[str, object] = {}  # what a client handler keeps between requests (a pairing)

    def idle_for(self, now: float) -> float:
        """Seconds since the connection last finished a request (0 while it answers one).

        Read by the accepting thread without a lock: at worst a connection that
        just started a request is shed, and its client retries.
        """
        idle_since = self._idle_since
        return 0.0 if idle_since is None else now - idle_since

    def shed(self) -> None:
        """Give up the slot now (the server is full) and make the handler thread end. Under the server lock."""
        self.state = ConnectionState.CLOSING
        _shutdown(self.connection.sock)

    def handle(self) -> None:
        """Answer requests until the peer leaves, idles out, or breaks framing."""
        while self.state is not ConnectionState.CLOSING and self._within_handshake_deadline():
            try:
                # Only an authenticated peer may make us hold a large payload.
                authenticated = self.state is ConnectionState.AUTHENTICATED
                frame = self.connection.recv(max_payload=None if authenticated else protocol.MAX_CLIENT_PAYLOAD)
            except ConnectionClosed as closed:
                log.debug("%s", closed)
                return
            except ProtocolError as error:
                self._reply_error(error.code, str(error))
                if not error.recoverable:
                    log.warning("closing %s: %s", self.connection.peer, error)
                    return
                continue
            self._idle_since = None
            keep_open = self._answer(frame)
            self._idle_since = time.monotonic()
            if not keep_open:
                return

    def _within_handshake_deadline(self) -> bool:
        """In the handshake, each wait is cut to what is left of its deadline; False once it passed."""
        if not self.state.in_handshake:
            return True
        left = self._handshake_deadline - time.monotonic()
        if left <= 0:
            log.info("closing %s: handshake not done within %g s", self.connection.peer,
                     self.server.handshake_timeout_s)
            return False
        self.connection.idle_timeout_s = left
        return True

    def finish(self) -> None:
        """Release the connection's resources and settle its byte counters."""
        self.state = ConnectionState.CLOSING
        self.server.slot_freed()
        self._count_bytes()
        if self._open_file:
            self._open_file[1].close()
        self.connection.close_lingering()

    def _answer(self, frame: Frame) -> bool:
        """Answer one request; False means close the connection."""
        request = frame.message
        try:
            keep_open = self._dispatch(frame)
            self.server.metrics.request_done(ok=True)
            return keep_open
        except RequestFailed as failure:
            return self._reply_error(failure.code, str(failure))
        except ProtocolError as error:
            return self._reply_error(error.code, str(error))
        except ConnectionClosed as closed:
            log.info("%s: %s", self.connection.peer, closed)
            return False
        except Exception:  # one bad request must never take the server down
            log.exception("internal error answering %s", type(request).__name__)
            return self._reply_error(ErrorCode.INTERNAL, "internal server error")
        finally:
            self._count_bytes()

    def _reply_error(self, code: str, text: str) -> bool:
        self.server.metrics.request_done(ok=False)
        try:
            self.connection.send(ErrorReply(code, text[:1000]))  # the text may quote a peer's 64 KiB header
        except ConnectionClosed:
            return False
        return code not in (ErrorCode.VERSION_MISMATCH, ErrorCode.AUTH_FAILED, ErrorCode.BUSY)

    def _dispatch(self, frame: Frame) -> bool:
        request = frame.message
        if isinstance(request, protocol.Hello):
            return self._greet(request)
        if self.state is ConnectionState.NEW:
            raise RequestFailed(ErrorCode.HELLO_REQUIRED, "send hello first")
        if self.state is ConnectionState.CHALLENGED and not isinstance(request, protocol.Authenticate):
            raise RequestFailed(ErrorCode.AUTH_FAILED, f"{request.TYPE} needs an authenticated peer")
        if isinstance(request, protocol.GetStatus):
            self._send_status()
        elif isinstance(request, protocol.Authenticate):
            self._authenticate(request)
        elif isinstance(request, protocol.Identify):
            self._identify(request)
        elif type(request) in self.server.client_handlers:
            self.server.client_handlers[type(request)](self, frame)
        elif type(request) in self.server.peer_handlers:
            if self.state is not ConnectionState.AUTHENTICATED:
                raise RequestFailed(ErrorCode.AUTH_FAILED, f"{request.TYPE} needs an authenticated peer")
            self.server.peer_handlers[type(request)](self.connection, frame)
        elif isinstance(request, self.CLIENT_REQUESTS):
            if self.server.node and self.state is not ConnectionState.AUTHENTICATED:  # a peer may read a replica
                self.server.node.check_serving()
            if (self.server.access and self.state is not ConnectionState.AUTHENTICATED
                    and not self.server.access.allows(self.client_identity)):
                raise RequestFailed(ErrorCode.NOT_PAIRED, "not paired: ask the server's operator for a code, "
                                                          "then run: python client.py pair CODE")
            self._serve_client_request(frame)
        else:
            raise RequestFailed(ErrorCode.UNKNOWN_REQUEST, f"{request.TYPE} is not a request this server answers")
        return True

    def _serve_client_request(self, frame: Frame) -> None:
        request, source = frame.message, self.server.source
        if isinstance(request, protocol.GetChunk):
            self._send_chunk(request)
        elif isinstance(request, protocol.ListFiles):
            self._send_listing(request)
        elif isinstance(request, protocol.GetFiles):
            self._send_files(request.names, request.sha256s)
        elif isinstance(request, protocol.GetBatch):
            self._send_files(*protocol.decode_batch(frame.payload))
        elif isinstance(request, protocol.GetManifest):
            header, digests = source.manifest(request.name)
            self.connection.send(protocol.ManifestInfo(name=request.name, **header), digests)
        elif isinstance(request, protocol.CountFiles):
            files, total = source.count_files()
            self.connection.send(protocol.FileCount(files=files, bytes=total))
        elif isinstance(request, protocol.ReportDownloaded):
            self._count_downloads([request.name], [request.sha256])
        elif isinstance(request, protocol.ReportDownloadedMany):
            self._count_downloads(request.names, request.sha256s)
        elif isinstance(request, protocol.ReportDownloadedBatch):
            self._count_downloads(*protocol.decode_batch(frame.payload))
        else:
            self._serve_tracker_request(frame)

    def _serve_tracker_request(self, frame: Frame) -> None:
        tracker, request = self.server.tracker, frame.message
        if tracker is None:
            raise RequestFailed(ErrorCode.UNKNOWN_REQUEST, f"this {self.server.name} keeps no tracker")
        host = self.connection.sock.getpeername()[0]  # never an address the peer claims
        if isinstance(request, protocol.Announce):
            if self.server.tls and not self.client_identity:
                raise RequestFailed(ErrorCode.BAD_REQUEST, "announce needs a client that proved its identity")
            tracker.announce(host, request.port, protocol.decode_holdings(frame.payload), self.client_identity)
            self.connection.send(protocol.Ok())
        else:
            peers = tracker.peers_for(request.sha256, (host, request.port))
            listed = [{"host": h, "port": p, "have": protocol.encode_bitmap(have), "id": tracker.identity_of(h, p)}
                      for h, p, have in peers]
            self.connection.send(protocol.PeerList(listed))

    def _greet(self, hello: protocol.Hello) -> bool:
        if hello.version != protocol.PROTOCOL_VERSION:
            raise RequestFailed(
                ErrorCode.VERSION_MISMATCH,
                f"protocol version {hello.version} is not supported (this server speaks {protocol.PROTOCOL_VERSION})",
            )
        if hello.role == "main":
            return self._greet_peer(hello)
        if not self.server.take_client_slot(self):
            raise RequestFailed(ErrorCode.BUSY, f"server busy: {self.server.max_connections} clients connected, "
                                                "retry later")
        self.connection.idle_timeout_s = self.server.idle_timeout_s  # handshake done: it may idle now
        self.server.observe_relayed_epoch(hello, self.connection.peer)
        self.client_nonce = auth.new_nonce() if self.server.tls else ""  # over TLS a client may prove who it is
        self.connection.send(self.server.welcome(self.client_nonce))
        return True

    def _identify(self, request: protocol.Identify) -> None:
        if not self.client_nonce:
            raise RequestFailed(ErrorCode.BAD_REQUEST, "identify once, after hello, over TLS")
        try:
            self.client_identity = verify_identify(request.certificate, request.signature, self._bound,
                                                   self.client_nonce)
        except ValueError as error:
            raise RequestFailed(ErrorCode.AUTH_FAILED, str(error)) from None
        finally:
            self.client_nonce = ""
        self.connection.send(protocol.Ok())

    def _greet_peer(self, hello: protocol.Hello) -> bool:
        if not self.server.secret:
            log.warning("refused peer %s: server.secret is not set here", self.connection.peer)
            raise RequestFailed(ErrorCode.AUTH_FAILED, "peer connections need server.secret set on both servers")
        if self.state is ConnectionState.NEW:
            self.state = ConnectionState.CHALLENGED  # the handshake deadline still runs: it must prove itself
        self.peer_nonce = auth.new_nonce()
        # Bound to our TLS identity: a machine in the middle with its own certificate cannot relay it.
        proof = auth.prove(self.server.secret, auth.SERVER_PURPOSE, f"{hello.nonce}{self._bound}")
        self.connection.send(self.server.welcome(self.peer_nonce, proof))
        return True

    def _authenticate(self, request: protocol.Authenticate) -> None:
        if not self.peer_nonce or not auth.proof_ok(self.server.secret, auth.PEER_PURPOSE,
                                                        f"{self.peer_nonce}{self._bound}", request.proof):
            log.warning("peer %s failed authentication: %s", self.connection.peer, self.server.secret_hint)
            raise RequestFailed(ErrorCode.AUTH_FAILED, f"authentication failed: {self.server.secret_hint}")
        proven = self._proven_peer_identity(request)
        self.peer_nonce = ""
        if not self.server.take_peer_slot(self):
            raise RequestFailed(ErrorCode.BUSY, f"all {PEER_SLOTS} peer slots are taken")
        self.connection.idle_timeout_s = self.server.idle_timeout_s
        log.info("peer %s authenticated%s", self.connection.peer, f" as {proven}" if proven else "")
        self.connection.send(protocol.Ok())

    def _proven_peer_identity(self, request: protocol.Authenticate) -> str:
        """The identity the peer signed our challenge with ("" if none); refused unless it is the pinned one."""
        proven = ""
        if request.certificate:
            try:
                proven = verify_identify(request.certificate, request.signature, self._bound, self.peer_nonce)
            except ValueError as error:
                raise RequestFailed(ErrorCode.AUTH_FAILED, str(error)) from None
        pinned = self.server.peer_identity
        if pinned and proven != pinned:
            log.warning("peer %s refused: it proved identity %s, not %s pinned here; if that server was "
                        "reinstalled, set its new identity in this server's config", self.connection.peer,
                        proven or "(none)", pinned)
            raise RequestFailed(ErrorCode.AUTH_FAILED, f"identity {proven or '(none)'} is not the peer identity "
                                                       f"{pinned} pinned on this server")
        return proven

    def _send_listing(self, request: protocol.ListFiles) -> None:
        if request.limit:
            self.connection.send(*cursor_page(self.server.source, request))
            return
        entries, total = self.server.source.list_files(request.search, request.offset, protocol.MAX_LIST_ENTRIES)
        page = protocol.fit_list_page(entries)
        self.connection.send(protocol.FileList(files=page, total=total, offset=request.offset))

    def _send_chunk(self, request: protocol.GetChunk) -> None:
        where = self.server.source.locate_chunk(request.name, request.sha256, request.index)
        reply = protocol.ChunkData(name=request.name, index=request.index)
        self.send_stored_bytes(reply, where, request.name)

    def _count_downloads(self, names: list[str], sha256s: list[str]) -> None:
        """Finished downloads reported (one, or a batch), counted in one commit, then ``Ok``: each once per
        identified client and file where the server keeps an access list (``access``; without one, each report).

        Only versions shared are counted, and only they are asked of the
        access list (``ClientAccess.first_reports``) and given to the
        metrics: a client cannot grow either with names it makes up.
        """
        source, access = self.server.source, self.server.access
        pairs = source.shared_versions(list(zip(names, sha256s)))
        if access is not None and pairs:
            pairs = access.first_reports(self.client_identity, pairs)
        self.server.metrics.downloads_finished(source.record_downloads(pairs) if pairs else [])
        self.connection.send(protocol.Ok())

    def _send_files(self, names: list[str], sha256s: list[str]) -> None:
        """Several one-chunk files in one frame; one that cannot be served gets size -1 and its error code."""
        sizes, errors, parts = [], [], []
        room = protocol.MAX_CHUNK_BYTES
        for name, where in zip(names, self.server.source.locate_files(names, sha256s)):
            try:
                data = self._read_whole(where, name, room)
            except RequestFailed as error:
                sizes.append(-1)
                errors.append(error.code)
                continue
            room -= len(data)
            sizes.append(len(data))
            errors.append("")
            parts.append(data)
        payload = b"".join(parts)
        self.server.upload_limit.consume(len(payload))
        self.connection.send(protocol.FilesData(sizes=sizes, errors=errors), payload)

    def _read_whole(self, where: ChunkLocation | RequestFailed, label: str, room: int) -> bytes:
        """The bytes at ``where`` (read, not sent by sendfile: they go out with their neighbours in one frame).

        ``RequestFailed`` if ``where`` is one (the file is not served) or the bytes cannot be read.
        """
        if isinstance(where, RequestFailed):
            raise where
        if where.length > room:
            raise RequestFailed(ErrorCode.OUT_OF_RANGE, f"{label} does not fit in this reply; ask for it alone")
        try:  # a bare descriptor, not ``_file``'s buffered object: each small file is opened once, for one read
            fd = os.open(where.path, os.O_RDONLY)
        except OSError as error:
            raise RequestFailed(ErrorCode.STORAGE_ERROR, f"cannot read the server's copy: {error.strerror}") from error
        try:
            data = os.pread(fd, where.length, where.offset)
        finally:
            os.close(fd)
        if len(data) != where.length:
            raise RequestFailed(ErrorCode.STORAGE_ERROR, f"the server's copy of {label} is truncated")
        return data

    def send_stored_bytes(self, reply: Message, where: ChunkLocation, label: str) -> None:
        """Send ``reply`` with the bytes at ``where`` as payload, by ``sendfile``."""
        file = self._file(where.path)
        if _file_size(file) < where.offset + where.length:
            raise RequestFailed(ErrorCode.STORAGE_ERROR, f"the server's copy of {label} is truncated")
        self.server.upload_limit.consume(where.length)
        self.connection.send_file_payload(reply, file, where.offset, where.length)

    def _send_status(self) -> None:
        server = self.server
        snapshot = server.metrics.snapshot(top_files=protocol.MAX_STATUS_FILES)
        welcome = server.welcome()
        snapshot.update(server=server.name, role=welcome.role, epoch=welcome.epoch, server_id=server.server_id,
                        primary=welcome.primary, identity=server.tls.id if server.tls else "")
        if server.status_extra:
            snapshot.update(server.status_extra())
        self.connection.send(protocol.StatusInfo(metrics=snapshot))

    def _file(self, path: str) -> BinaryIO:
        """The open file for ``path``; one stays open per connection across chunk requests."""
        if self._open_file and self._open_file[0] == path:
            return self._open_file[1]
        if self._open_file:
            self._open_file[1].close()
        try:
            file = open(path, "rb")
        except OSError as error:
            raise RequestFailed(ErrorCode.STORAGE_ERROR, f"cannot read the server's copy: {error.strerror}") from error
        self._open_file = (path, file)
        return file

    def _count_bytes(self) -> None:
        sent = self.connection.bytes_sent - self._counted_sent
        received = self.connection.bytes_received - self._counted_received
        if sent:
            self.server.metrics.add_sent(sent)
        if received:
            self.server.metrics.add_received(received)
        self._counted_sent += sent
        self._counted_received += received


def _file_size(file: BinaryIO) -> int:
    return os.fstat(file.fileno()).st_size


def _source_host(connection: Connection) -> str:
    """The address a connection comes from (its host, without the port)."""
    try:
        return connection.sock.getpeername()[0]
    except OSError:
        return "(disconnected)"


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def cursor_page(source: FileSource, request: protocol.ListFiles) -> tuple[protocol.FileList, bytes]:
    """The reply to a ``list`` with a ``limit``: a cursor page, and its entries as payload.

    Matches are counted once per listing, on its first page; later pages
    take the total from their cursor. Keyset paging: a page starts after the
    cursor's name, so its cost does not grow with the pages before it.
    """
    total, after = protocol.parse_cursor(request.cursor)
    if not after:
        total = min(source.count_matching(request.search, request.under), protocol.MAX_LIST_TOTAL)
    limit = min(request.limit, protocol.MAX_LIST_PAGE_ENTRIES)
    page = source.list_page(request.search, after, limit, total, request.under, request.layout, request.counts)
    following = protocol.make_cursor(total, page.last_name) if page.count == limit and page.more else ""
    if page.layout:
        return protocol.FileList(files=[], total=total, next=following, layout=page.layout,
                                 entries=page.count), page.entries
    return protocol.FileList(files=[], total=total, next=following), page.entries
