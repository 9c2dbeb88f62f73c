"""Tests for remote.py: choosing the active server, failing over, relaying proven epochs, bounded listings.

The servers here are tiny inline fakes over real sockets on 127.0.0.1 that
answer as told (active or standby, any epoch, lying listings) or not at all
(a frozen server: the kernel accepts the connection, nobody reads it).
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pytest
from conftest import SHORT_TIMEOUT

from error_handler import ConnectionFailed, NotActive
from minitorrent.net import remote
from minitorrent.net.remote import ConnectionPool, EpochClaim, ServerClient, ask_servers
from minitorrent.wire import protocol
from minitorrent.wire.protocol import RemoteProtocolError
from minitorrent.wire.transport import Connection, ConnectionClosed

IO_TIMEOUT_S = 5.0  # long, so that waiting it out shows
TIMING_SLACK_S = 1.5  # how late a quick answer may come on a loaded machine


@dataclass
class FakeServer:
    """Answers hellos as ``role`` at ``epoch``; ``pages`` answers each ListFiles (offset -> FileList)."""

    role: str
    epoch: int
    name: str = "fake"
    proof: str = ""
    pages: Callable[[int], protocol.FileList] | None = None
    hellos: list[protocol.Hello] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self._connections: list[Connection] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            connection = Connection(sock, io_timeout_s=SHORT_TIMEOUT)
            self._connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: Connection) -> None:
        try:
            while True:
                self._answer(connection, connection.recv().message)
        except (ConnectionClosed, OSError):
            connection.close()

    def _answer(self, connection: Connection, request: protocol.Message) -> None:
        if isinstance(request, protocol.Hello):
            self.hellos.append(request)
            connection.send(protocol.Welcome(protocol.PROTOCOL_VERSION, self.role, self.epoch, f"id-{self.name}",
                                             self.name, epoch_proof=self.proof))
        elif isinstance(request, protocol.ListFiles) and self.pages:
            connection.send(self.pages(request.offset))
        elif self.role != "active":
            connection.send(protocol.ErrorReply(protocol.ErrorCode.STANDBY, "on standby"))
        else:
            connection.send(protocol.StatusInfo({"server": self.name, "epoch": self.epoch}))

    def close(self) -> None:
        self.listener.close()
        for connection in self._connections:
            connection.close()


class FrozenServer:
    """Listens (the kernel completes connections) but never reads or answers: a SIGSTOPped process."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.address = self.listener.getsockname()[:2]

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def servers() -> Iterator[Callable[..., FakeServer]]:
    started: list = []

    def start(role: str = "active", epoch: int = 1, **options) -> FakeServer:
        server = FakeServer(role, epoch, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def frozen() -> Iterator[FrozenServer]:
    server = FrozenServer()
    yield server
    server.close()


def pools_for(*servers) -> list[ConnectionPool]:
    return [ConnectionPool(*s.address, io_timeout_s=IO_TIMEOUT_S, max_idle=2) for s in servers]


def chosen(*servers, accept_standby: bool = False) -> str:
    """The name of the server ``ask_servers`` picks among ``servers``."""
    pool, session = ask_servers(pools_for(*servers), accept_standby=accept_standby)
    session.close()
    return session.welcome.server


def client_for(*servers, retry_deadline_s: float = 3.0) -> ServerClient:
    return ServerClient([s.address for s in servers], io_timeout_s=IO_TIMEOUT_S, pool_size=2,
                        retry_deadline_s=retry_deadline_s)


class TestAskServers:
    def test_takes_the_active_server_with_the_highest_epoch(self, servers):
        """Of several servers, the active one with the highest epoch is chosen; a standby's higher epoch does not count."""
        assert "b" == chosen(servers("active", 3, name="a"), servers("active", 5, name="b"),
                             servers("standby", 9, name="c"))

    def test_a_standby_is_taken_only_when_asked(self, servers):
        """With accept_standby (the main reading a replica) the highest epoch wins whatever its role."""
        assert "c" == chosen(servers("active", 3, name="a"), servers("standby", 9, name="c"), accept_standby=True)

    def test_none_active_is_not_active_with_every_reason(self, servers):
        """No active server raises NotActive naming each server's answer, an unreachable one included."""
        with socket.create_server(("127.0.0.1", 0)) as probe:
            closed_port = probe.getsockname()[1]
        standby = servers("standby", 2, name="s")
        pools = [*pools_for(standby), ConnectionPool("127.0.0.1", closed_port, io_timeout_s=IO_TIMEOUT_S, max_idle=1)]
        with pytest.raises(NotActive) as caught:
            ask_servers(pools)
        assert (True, True) == ("s on standby" in str(caught.value), f"127.0.0.1:{closed_port}" in str(caught.value))

    def test_a_frozen_server_costs_a_grace_not_an_io_timeout(self, servers, frozen):
        """With one server frozen and the other active, the choice comes within the grace, not after io_timeout."""
        started = time.monotonic()
        assert "a" == chosen(frozen, servers("active", 1, name="a"))
        elapsed = time.monotonic() - started
        assert elapsed <= remote.HIGHER_EPOCH_GRACE_S + TIMING_SLACK_S, f"chose after {elapsed:.2f} s"

    def test_a_standby_promoting_while_another_is_frozen_is_found(self, servers, frozen):
        """A standby asked again while the other server is silent is taken once it turns active."""
        backup = servers("standby", 1, name="backup")
        threading.Timer(1.0, lambda: setattr(backup, "role", "active")).start()
        started = time.monotonic()
        assert "backup" == chosen(frozen, backup)
        elapsed = time.monotonic() - started
        assert elapsed <= 1.0 + remote.STANDBY_RECHECK_S + TIMING_SLACK_S, f"chose after {elapsed:.2f} s"


class TestFailover:
    def test_a_failed_server_is_forgotten_and_the_next_call_asks_again(self, servers):
        """When the chosen server dies, the next call goes to the other active one."""
        main = servers("active", 1, name="main")
        backup = servers("standby", 1, name="backup")
        client = client_for(main, backup)
        try:
            assert "main" == client.status()["server"]
            main.close()
            backup.role, backup.epoch = "active", 2
            assert "backup" == client.status()["server"]
        finally:
            client.close()

    def test_attempt_forgets_the_server_on_failure(self, servers):
        """attempt() raises the failure and drops the active server, so the next attempt chooses again."""
        main = servers("active", 1, name="main")
        client = client_for(main)
        try:
            first = client.active_pool()

            def fail(session: remote.ServerSession) -> None:
                raise ConnectionFailed("broken on purpose")

            with pytest.raises(ConnectionFailed):
                client.attempt(fail)
            assert (True, "main") == (client.active_pool() is first, client.status(once=True)["server"])
        finally:
            client.close()


class TestEpochRelay:
    def test_the_highest_proven_epoch_is_relayed_in_every_hello(self, servers):
        """After a server proves epoch 4, the client's hellos to every server carry 4 and that proof."""
        proving = servers("active", 4, name="a", proof="cafe" * 16)
        other = servers("standby", 2, name="b")
        client = client_for(proving, other)
        try:
            client.status()
            client.pools[1].open_session().close()
            assert EpochClaim(4, "id-a", "cafe" * 16) == EpochClaim(other.hellos[-1].epoch,
                                                                   other.hellos[-1].epoch_server,
                                                                   other.hellos[-1].epoch_proof)
        finally:
            client.close()

    def test_an_unproven_epoch_is_not_relayed(self, servers):
        """A welcome without a proof adds nothing to what the client relays."""
        unproven = servers("active", 7, name="a")
        client = client_for(unproven)
        try:
            client.status()
            assert (remote.NO_CLAIM, 7) == (client.claim, client.current.epoch)
        finally:
            client.close()


class TestBoundedListing:
    def test_a_growing_total_does_not_extend_the_listing(self, servers):
        """The first page's total bounds the listing, however the server raises it later."""
        def page(offset: int) -> protocol.FileList:
            return protocol.FileList([{"name": f"f{offset}"}], total=offset + 2, offset=offset)

        client = client_for(servers(pages=page))
        try:
            assert ["f0", "f1"] == [entry["name"] for entry in client.list_files()]
        finally:
            client.close()

    def test_a_page_out_of_place_is_refused(self, servers):
        """A server answering every page with the first one (a loop for ever) is refused at the second page."""
        def page(offset: int) -> protocol.FileList:
            return protocol.FileList([{"name": "again"}], total=protocol.MAX_LIST_TOTAL, offset=0)

        client = client_for(servers(pages=page))
        try:
            with pytest.raises(RemoteProtocolError, match="from 1, got a page from 0"):
                client.list_files()
        finally:
            client.close()

    def test_a_total_past_the_limit_is_refused_by_the_protocol(self):
        """A listing claiming more than MAX_LIST_TOTAL matches is not a valid message."""
        with pytest.raises(RemoteProtocolError):
            protocol.FileList([], total=protocol.MAX_LIST_TOTAL + 1)


class TestStatusOf:
    def test_asks_that_server_directly(self, servers):
        """status_of answers for the named server, and None for one that does not answer."""
        named = servers("active", 3, name="s")
        with socket.create_server(("127.0.0.1", 0)) as probe:
            closed = probe.getsockname()[:2]
        assert ({"server": "s", "epoch": 3}, None) == (remote.status_of(named.address, SHORT_TIMEOUT),
                                                       remote.status_of(closed, 1.0))
