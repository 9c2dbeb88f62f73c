"""Talking to the servers: greeted sessions, connection pools, and failover.

A ``ServerSession`` is a connection that has said hello (and, for the main
server's peer links, proved it knows the shared secret). A ``ConnectionPool``
keeps a few idle sessions per server so that a listing, a manifest and the
chunk streams of several downloads reuse connections instead of paying a TCP
and hello round trip each.

``ServerClient`` (given the main server's ``secret``, it speaks as the main's
peer, which may also read a standby's replica) knows every configured server
(the main and the backup). ``ask_servers`` is the one place that chooses
among them: it greets them all *in parallel* and takes the active one with
the highest epoch, so a frozen server (connected, silent) costs a short
grace, not a full I/O timeout, once another answers active. When the chosen
server fails (refused, reset, timed out, or now on standby) the client
forgets it and asks again, with backoff, until ``retry_deadline_s``.

The highest epoch a server *proved* (``Welcome.epoch_proof``, an HMAC only a
server holding the cluster secret can make) is relayed in every hello, so a
server that was active before a failover learns at once that it no longer
is; an epoch without a proof changes nothing on the server.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import operator
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

from error_handler import (
    AuthenticationFailed,
    ConnectionFailed,
    MiniTorrentError,
    NotActive,
    RemoteError,
    ServerBusy,
    retry,
)
from integrity import Manifest
from minitorrent.wire import auth, protocol
from minitorrent.wire.identity import Identity
from minitorrent.wire.protocol import ErrorCode, ErrorReply, Frame, Message
from minitorrent.wire.tls import Secure, server_identity
from minitorrent.wire.transport import Connection

log = logging.getLogger(__name__)

AGENT = "minitorrent/1"
MAX_RECONNECT_DELAY_S = 0.5  # failover must be seen within about a second of the backup taking over
HIGHER_EPOCH_GRACE_S = 0.2  # once one server answers active, how long the others get to beat its epoch
STANDBY_RECHECK_S = 0.5  # while a server is silent, how often one on standby is asked again (it may promote)
T = TypeVar("T")


@dataclass(frozen=True)
class EpochClaim:
    """An epoch with the proof of the server that took it, as a client relays it in its hellos."""

    epoch: int = 0
    server_id: str = ""
    proof: str = ""

    @classmethod
    def of(cls, welcome: protocol.Welcome) -> EpochClaim:
        """What ``welcome`` proves (an unproven epoch claims nothing)."""
        return cls(welcome.epoch, welcome.server_id, welcome.epoch_proof) if welcome.epoch_proof else cls()


NO_CLAIM = EpochClaim()


class ServerSession:
    """A greeted connection to a server. One thread at a time."""

    def __init__(self, connection: Connection, welcome: protocol.Welcome) -> None:
        self.connection = connection
        self.welcome = welcome
        self.reusable = True  # False once replies may still be on their way (requests left in flight)

    @classmethod
    def open(cls, host: str, port: int, *, io_timeout_s: float, epoch: int = 0,
             secret: str | None = None, claim: EpochClaim = NO_CLAIM, secure: Secure | None = None) -> ServerSession:
        """Connect (over TLS with ``secure``) and say hello; with ``secret``, as the main's authenticated peer link.

        A client's hello relays ``claim`` (a proven epoch); a peer's carries
        ``epoch``. Raises ``ConnectionFailed`` (``ServerBusy`` if full),
        ``RemoteError``, or ``AuthenticationFailed`` if the other side cannot
        prove the secret.
        """
        connection = Connection.dial(host, port, io_timeout_s=io_timeout_s, secure=secure)
        try:
            if secret is None:
                connection.send(protocol.Hello(protocol.PROTOCOL_VERSION, "client", AGENT, claim.epoch,
                                               epoch_server=claim.server_id, epoch_proof=claim.proof))
                welcome = expect_reply(connection.recv(), protocol.Welcome)
                _identify(connection, getattr(secure, "identity", None), welcome)
            else:
                welcome = _authenticate(connection, secret, epoch, f"{host}:{port}", getattr(secure, "identity", None))
        except BaseException:
            connection.close()
            raise
        return cls(connection, welcome)

    def call(self, request: Message, reply_type: type[Message], payload: bytes = b"",
             payload_buffer: bytearray | None = None) -> Frame:
        """Send ``request`` and return its reply frame, checked to be ``reply_type``."""
        self.connection.send(request, payload)
        return self.receive(reply_type, payload_buffer)

    def receive(self, reply_type: type[Message], payload_buffer: bytearray | None = None) -> Frame:
        """Receive the next reply, checked to be ``reply_type`` (pipelining)."""
        frame = self.connection.recv(payload_buffer)
        expect_reply(frame, reply_type)
        return frame

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()


def status_of(address: tuple[str, int], io_timeout_s: float, secure: Secure | None = None) -> dict | None:
    """One server's own status (role, epoch, ...), asked directly, once; None if it does not answer.

    Unlike ``ServerClient.status`` this asks *that* server, active or not:
    what a test or a benchmark watching a failover needs.
    """
    try:
        session = ServerSession.open(*address, io_timeout_s=io_timeout_s, secure=secure)
    except MiniTorrentError:
        return None
    try:
        return session.call(protocol.GetStatus(), protocol.StatusInfo).message.metrics
    except MiniTorrentError:
        return None
    finally:
        session.close()


def _authenticate(connection: Connection, secret: str, epoch: int, where: str,
                  identity: Identity | None) -> protocol.Welcome:
    """The peer handshake: both sides answer the other's fresh challenge.

    Each proof also covers the server's TLS identity as we saw it: a machine in
    the middle presenting its own certificate gets proofs it cannot pass on.
    With our ``identity`` we also sign the challenge as a client's ``Identify``
    does, so the other server knows which server dialled it and may pin it.
    """
    nonce = auth.new_nonce()
    bound = server_identity(connection.sock)
    connection.send(protocol.Hello(protocol.PROTOCOL_VERSION, "main", AGENT, epoch, nonce))
    welcome = expect_reply(connection.recv(), protocol.Welcome)
    if not auth.proof_ok(secret, auth.SERVER_PURPOSE, f"{nonce}{bound}", welcome.proof):
        _tell_refused(connection)
        raise AuthenticationFailed(f"{where} could not prove it knows the cluster key; not replicating to it")
    certificate, signature = identity.identify(bound, welcome.nonce) if identity else ("", "")
    connection.send(protocol.Authenticate(auth.prove(secret, auth.PEER_PURPOSE, f"{welcome.nonce}{bound}"),
                                          certificate, signature))
    try:
        expect_reply(connection.recv(), protocol.Ok)
    except RemoteError as error:
        if error.code == ErrorCode.AUTH_FAILED:
            raise AuthenticationFailed(f"{where} refused our proof: {error.message}") from error
        raise
    return welcome


def _identify(connection: Connection, identity: Identity | None, welcome: protocol.Welcome) -> None:
    """Prove our identity to a server that asked (its nonce, over TLS): what pairing and counts rest on."""
    if identity is None or not welcome.nonce:
        return
    certificate, signature = identity.identify(server_identity(connection.sock), welcome.nonce)
    connection.send(protocol.Identify(certificate, signature))
    expect_reply(connection.recv(), protocol.Ok)


def _tell_refused(connection: Connection) -> None:
    """Let a server whose proof failed log the refusal too: an empty proof fails its check and reveals nothing.

    (Our real proof is never sent to a server that could not prove itself:
    it could use it to pass as us elsewhere.)
    """
    try:
        connection.send(protocol.Authenticate(""))
    except ConnectionFailed:
        pass


def expect_reply(frame: Frame, reply_type: type[Message]) -> Message:
    """Return the frame's message if it is a ``reply_type``; raise otherwise.

    An ``ErrorReply`` becomes ``RemoteError``, except BUSY (``ServerBusy``)
    and STANDBY (``NotActive``), which are worth retrying elsewhere or later.
    Any other message is a ``RemoteProtocolError``.
    """
    message = frame.message
    if isinstance(message, reply_type):
        return message
    if isinstance(message, ErrorReply):
        if message.code == ErrorCode.BUSY:
            raise ServerBusy(message.message)
        if message.code == ErrorCode.STANDBY:
            raise NotActive(message.message)
        raise RemoteError(message.code, message.message)
    raise protocol.RemoteProtocolError(f"expected {reply_type.TYPE}, got {message.TYPE}")


class ConnectionPool:
    """Up to ``max_idle`` idle sessions to one server, reused across calls. Thread-safe."""

    def __init__(self, host: str, port: int, *, io_timeout_s: float, max_idle: int,
                 claim: Callable[[], EpochClaim] = lambda: NO_CLAIM, secret: str | None = None,
                 secure: Secure | None = None) -> None:
        self.host = host
        self.port = port
        self.secret = secret
        self.secure = secure
        self.io_timeout_s = io_timeout_s
        self.max_idle = max_idle
        self._claim = claim
        self._idle: list[ServerSession] = []
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        """``host:port`` of the server."""
        return f"{self.host}:{self.port}"

    def open_session(self) -> ServerSession:
        """A new greeted session (not from the pool)."""
        claim = self._claim()
        return ServerSession.open(self.host, self.port, io_timeout_s=self.io_timeout_s, epoch=claim.epoch,
                                  secret=self.secret, claim=claim, secure=self.secure)

    @contextlib.contextmanager
    def session(self) -> Iterator[ServerSession]:
        """Lend a session; it returns to the pool unless the body raised."""
        session = self._take_idle() or self.open_session()
        try:
            yield session
        except BaseException:
            session.close()  # its stream may be out of step: never reuse it
            raise
        self.give_back(session)

    def give_back(self, session: ServerSession) -> None:
        """Keep ``session`` for reuse, or close it if the pool is full or its stream is not clean."""
        with self._lock:
            if session.reusable and len(self._idle) < self.max_idle:
                self._idle.append(session)
                return
        session.close()

    def close(self) -> None:
        """Close every idle session."""
        with self._lock:
            idle, self._idle = self._idle, []
        for session in idle:
            session.close()

    def _take_idle(self) -> ServerSession | None:
        with self._lock:
            return self._idle.pop() if self._idle else None


@dataclass
class _Answer:
    """What one server said to ``ask_servers``: a greeted session, or why not."""

    pool: ConnectionPool
    session: ServerSession | None = None
    error: str = ""
    refusal: AuthenticationFailed | None = None  # the server is not who it must be: never retried


def ask_servers(pools: list[ConnectionPool], *, accept_standby: bool = False,
                stop: threading.Event | None = None) -> tuple[ConnectionPool, ServerSession]:
    """Greet every server in parallel; the active one with the highest epoch, and a session to it.

    Waits for every answer, except that once one server is active the others
    get ``HIGHER_EPOCH_GRACE_S`` more, and a server on standby is asked again
    every ``STANDBY_RECHECK_S`` while another is silent (it may be promoting
    because that one froze). ``accept_standby`` takes a standby server too
    (the main fetching a replica). Raises ``NotActive`` if none is active,
    or the ``AuthenticationFailed`` of a server that is not who it must be
    (a changed identity) when no other server is active.
    """
    answers: queue.Queue[_Answer] = queue.Queue()
    round_over = threading.Event()
    refusals: list[AuthenticationFailed] = []
    for pool in pools:
        _greet_in_background(pool, answers, round_over)
    try:
        best, reasons = _collect_answers(pools, answers, accept_standby, round_over, stop, refusals)
    finally:
        round_over.set()
    _close_unclaimed(answers)
    if best is None and refusals:
        raise refusals[0]
    if best is None:
        raise NotActive("no active server: " + "; ".join(reasons.values()))
    return best.pool, best.session


def _collect_answers(pools: list[ConnectionPool], answers: queue.Queue[_Answer], accept_standby: bool,
                     round_over: threading.Event, stop: threading.Event | None,
                     refusals: list[AuthenticationFailed]) -> tuple[_Answer | None, dict]:
    best: _Answer | None = None
    reasons: dict[str, str] = {}
    waiting = {pool.address for pool in pools}
    position = {pool.address: index for index, pool in enumerate(pools)}
    deadline = time.monotonic() + max(pool.io_timeout_s for pool in pools) + 1
    while waiting and not (stop and stop.is_set()):
        wait_s = deadline - time.monotonic()
        if wait_s <= 0:
            reasons.update({address: f"{address}: no answer in time" for address in waiting})
            break
        try:
            answer = answers.get(timeout=min(wait_s, STANDBY_RECHECK_S))
        except queue.Empty:
            continue
        waiting.discard(answer.pool.address)
        if answer.session is None:
            reasons[answer.pool.address] = answer.error
            if answer.refusal is not None:
                refusals.append(answer.refusal)
        elif answer.session.welcome.role == "active" or accept_standby:
            best = _better(best, answer, position)
            deadline = min(deadline, time.monotonic() + HIGHER_EPOCH_GRACE_S)
        else:
            reasons[answer.pool.address] = f"{answer.pool.address}: {answer.session.welcome.server or 'server'} on standby"
            answer.session.close()
            if waiting and best is None:  # someone is silent: this one may be promoting meanwhile
                waiting.add(answer.pool.address)
                _greet_in_background(answer.pool, answers, round_over, delay_s=STANDBY_RECHECK_S)
    return best, reasons


def _better(best: _Answer | None, answer: _Answer, position: dict[str, int]) -> _Answer:
    """The answer with the higher epoch, on a tie the server configured first; the other's session is closed.

    The tie rule keeps a client on the main when both claim the same epoch
    (servers with no cluster, or a main serving alone), whichever answered first.
    """
    def rank(each: _Answer) -> tuple[int, int]:
        return each.session.welcome.epoch, -position[each.pool.address]

    if best is None or rank(answer) > rank(best):
        if best:
            best.session.close()
        return answer
    answer.session.close()
    return best


def _greet_in_background(pool: ConnectionPool, answers: queue.Queue[_Answer], round_over: threading.Event,
                         delay_s: float = 0.0) -> None:
    def greet() -> None:
        if delay_s and round_over.wait(delay_s):
            return
        try:
            answer = _Answer(pool, session=pool.open_session())
        except AuthenticationFailed as error:
            answer = _Answer(pool, error=f"{pool.address}: {error}", refusal=error)
        except (ConnectionFailed, RemoteError) as error:
            answer = _Answer(pool, error=f"{pool.address}: {error}")
        answers.put(answer)
        if round_over.is_set():  # nobody will read it now
            _close_unclaimed(answers)

    threading.Thread(target=greet, name=f"ask-{pool.address}", daemon=True).start()


def _close_unclaimed(answers: queue.Queue[_Answer]) -> None:
    """Close the sessions of answers that came too late to be chosen."""
    while True:
        try:
            answer = answers.get_nowait()
        except queue.Empty:
            return
        if answer.session is not None:
            answer.session.close()


class ServerClient:
    """Request/reply calls to whichever configured server is active. Thread-safe."""

    def __init__(
        self,
        addresses: list[tuple[str, int]],
        *,
        io_timeout_s: float,
        pool_size: int,
        retry_deadline_s: float,
        stop: threading.Event | None = None,
        secret: str | None = None,
        secure: Secure | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("at least one server address is needed")
        self._pool_options = {"io_timeout_s": io_timeout_s, "max_idle": pool_size, "secret": secret, "secure": secure}
        self.pools = [self._pool(host, port) for host, port in addresses]
        self.secure = secure  # how every connection is secured (TLS), for callers dialling others (peers)
        self.io_timeout_s = io_timeout_s
        self.as_peer = secret is not None  # the main fetching from the backup may read a standby's replica
        self.retry_deadline_s = retry_deadline_s
        self.stop = stop or threading.Event()
        self.claim = NO_CLAIM  # the highest proven epoch seen, relayed in every hello
        self.current: protocol.Welcome | None = None
        self._active: ConnectionPool | None = None
        self._lock = threading.Lock()

    def _pool(self, host: str, port: int) -> ConnectionPool:
        return ConnectionPool(host, port, claim=lambda: self.claim, **self._pool_options)

    def add_server(self, host: str, port: int) -> None:
        """Also ask ``host:port`` from now on (a server the user chose); no-op if it is asked already.

        The active server is chosen afresh on the next call, among all of them.
        """
        with self._lock:
            if any((pool.host, pool.port) == (host, port) for pool in self.pools):
                return
            self.pools = [*self.pools, self._pool(host, port)]  # a new list: a running ask_servers keeps its own
            self._active = None

    def close(self) -> None:
        """Close pooled connections."""
        for pool in self.pools:
            pool.close()

    def active_pool(self) -> ConnectionPool:
        """The pool of the active server with the highest epoch, asking them all if unknown.

        Raises ``NotActive`` (a ``ConnectionFailed``) if none is active now.
        """
        with self._lock:
            if self._active is not None:
                return self._active
        pool, session = ask_servers(self.pools, accept_standby=self.as_peer, stop=self.stop)
        welcome = session.welcome
        pool.give_back(session)
        with self._lock:
            self._active, self.current = pool, welcome
            if welcome.epoch_proof and welcome.epoch > self.claim.epoch:
                self.claim = EpochClaim.of(welcome)
        log.info("talking to the %s server at %s (epoch %d)", welcome.server, pool.address, welcome.epoch)
        return pool

    def forget(self, pool: ConnectionPool) -> None:
        """``pool``'s server failed us: drop its sessions and choose again next time."""
        with self._lock:
            if self._active is pool:
                self._active = None
        pool.close()

    def attempt(self, operation: Callable[[ServerSession], T]) -> T:
        """One try of ``operation`` on a session of the active server; on ``ConnectionFailed`` it is forgotten.

        The single place where a failed server is dropped so that the next
        attempt asks them all again (``call`` retries it; a download stream
        and a status probe use it directly).
        """
        pool = self.active_pool()
        try:
            with pool.session() as session:
                return operation(session)
        except ConnectionFailed:
            self.forget(pool)
            raise

    def call(self, operation: Callable[[ServerSession], T]) -> T:
        """Run ``operation`` on a session of the active server, failing over and retrying."""

        def note(error: BaseException, delay_s: float) -> None:
            log.info("%s; retrying in %.1f s", error, delay_s)

        return retry(lambda: self.attempt(operation), deadline_s=self.retry_deadline_s,
                     retry_on=(ConnectionFailed,), max_delay_s=MAX_RECONNECT_DELAY_S, stop=self.stop, on_retry=note)

    def try_call(self, operation: Callable[[ServerSession], T]) -> T | None:
        """One attempt at ``operation`` on the active server; None if no server answers now."""
        try:
            return self.attempt(operation)
        except ConnectionFailed as error:
            log.debug("no answer now: %s", error)
            return None

    def list_files(self, search: str = "", under: str = "", counts: bool = True) -> list[dict]:
        """Every catalog entry matching ``search``, by name, fetched in cursor pages (see ``Listing``).

        ``under`` (a folder ending in ``/``) asks for that folder's names only;
        a server older than it may also send others (see ``protocol.ListFiles``).
        ``counts`` false: the entries' ``downloads`` may be 0 (not read).
        """
        listing = Listing(search, under, counts)
        self.call(listing.fetch)
        return listing.entries

    def manifest(self, name: str) -> Manifest:
        """The manifest of ``name``. Raises ``RemoteError`` (NOT_FOUND) if unknown."""
        frame = self.call(lambda s: s.call(protocol.GetManifest(name), protocol.ManifestInfo))
        info = frame.message
        try:
            return Manifest.from_header(info.to_header(), frame.payload)  # a read-only view: kept, not copied
        except ValueError as error:
            raise protocol.RemoteProtocolError(f"server sent a bad manifest for {name}: {error}") from error

    def count(self) -> tuple[int, int]:
        """(number of files, total bytes) in the catalog."""
        reply = self.call(lambda s: s.call(protocol.CountFiles(), protocol.FileCount)).message
        return reply.files, reply.bytes

    def status(self, *, once: bool = False) -> dict:
        """The active server's metrics snapshot, with its address, role and epoch.

        ``once``: a single try, no retries (a window's indicator); raises
        ``ConnectionFailed`` when no server answers now (``NotActive`` when
        they answer but none is active).
        """
        def ask(session: ServerSession) -> dict:
            return session.call(protocol.GetStatus(), protocol.StatusInfo).message.metrics

        snapshot = self.attempt(ask) if once else self.call(ask)
        with self._lock:
            snapshot["address"] = self._active.address if self._active else ""
        return snapshot

    def report_downloaded(self, name: str, sha256: str) -> None:
        """Tell the server a download finished (it counts downloads per file)."""
        self.call(lambda s: s.call(protocol.ReportDownloaded(name, sha256), protocol.Ok))


class Listing:
    """A listing fetched in cursor pages; after a failure, ``fetch`` goes on from the last page taken.

    Nothing the server sends can make it loop or grow without end: every
    page must go on, in strictly increasing name order, from the entries
    before it, and a listing holds at most ``protocol.MAX_LIST_TOTAL`` entries.
    """

    def __init__(self, search: str, under: str = "", counts: bool = True) -> None:
        self.search = search
        self.under = under
        self.counts = counts
        self.entries: list[dict] = []
        self.cursor = ""  # where the next page starts: the last page's ``next``

    def fetch(self, session: ServerSession) -> None:
        """Fetch the remaining pages over ``session`` (one thread at a time).

        Each page is asked for as soon as the one before it arrives, before
        that one is decoded, so the server reads a page while we decode the last.
        """
        session.connection.send(self._request(self.cursor))
        while True:
            frame = session.receive(protocol.FileList)
            page = frame.message
            if not frame.payload and not page.layout:  # a server that pages by offset (protocol 1's paging)
                self._fetch_offset_pages(session, page)
                return
            session.reusable = not page.next  # not while the next page's reply is on its way
            if page.next:
                session.connection.send(self._request(page.next))
            self._take(protocol.decode_list_page(frame.payload, page.layout, page.entries), page.next)
            if not page.next:
                return

    def _request(self, cursor: str) -> protocol.ListFiles:
        return protocol.ListFiles(self.search, cursor=cursor, limit=protocol.MAX_LIST_PAGE_ENTRIES, under=self.under,
                                  layout=protocol.LIST_LAYOUT_PACKED, counts=self.counts)

    def _take(self, entries: list[dict], following: str) -> None:
        """Add a page's entries, checked to go on in order; then move the cursor on."""
        names = list(map(operator.itemgetter("name"), entries))  # C loops: a page is 5,000 entries
        before = [self.entries[-1]["name"] if self.entries else ""] + names
        if not all(map(operator.lt, before, names)):
            raise protocol.RemoteProtocolError("listing page repeats or goes back: names must only increase")
        if following and not entries:
            raise protocol.RemoteProtocolError("listing page is empty but says more follow")
        self._check_size(len(self.entries) + len(entries))
        self.entries += entries
        self.cursor = following

    def _fetch_offset_pages(self, session: ServerSession, page: protocol.FileList) -> None:
        """The whole listing from an older server, by offset; taken all at once, so a retry starts over.

        The server's numbers do not drive the loop: each page must start where
        asked, and the first page's ``total`` only ever shrinks.
        """
        entries: list[dict] = []
        total = page.total
        while True:
            if page.offset != len(entries):
                raise protocol.RemoteProtocolError(f"asked for entries from {len(entries)}, "
                                                   f"got a page from {page.offset}")
            total = min(total, page.total)
            entries += page.files[: max(total - len(entries), 0)]
            self._check_size(len(entries))
            if not page.files or len(entries) >= total:
                self.entries = entries
                return
            page = session.call(protocol.ListFiles(self.search, len(entries)), protocol.FileList).message

    @staticmethod
    def _check_size(count: int) -> None:
        if count > protocol.MAX_LIST_TOTAL:
            raise protocol.RemoteProtocolError(f"listing has over {protocol.MAX_LIST_TOTAL} entries")
