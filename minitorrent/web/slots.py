"""The web face's connection slots: shared fairly per address, and never held idle past a deadline.

As in the TCP server (net/serving.py), a connection that is not answering a
request (still in its TLS handshake, reading a request head, or kept alive
between requests) is *idle*. When every slot is taken, a newcomer does not
get turned away while an idle connection may give its slot up: the TCP
server's ``choose_idle_victim`` picks it (one idle for a second, or one from
an address holding more slots than the newcomer's would), so a stranger's
dozens of silent connections never keep another machine out. And an idle
connection is closed ``idle_limit_s`` after it became idle, however it
trickles bytes (slowloris): a socket timeout alone restarts with each byte.
"""
from __future__ import annotations

import socket
import threading
import time

from minitorrent.net.serving import ConnectionState, choose_idle_victim


class HttpSlot:
    """One connection's slot: where it comes from and since when it is idle (None while answering)."""

    def __init__(self, sock: socket.socket, source: str, now: float) -> None:
        self.sock = sock
        self.source = source
        self.state = ConnectionState.NEW  # NEW until its first request: shed before a kept-alive one
        self.idle_since: float | None = now

    def idle_for(self, now: float) -> float:
        """Seconds since the connection last finished an answer (or connected); 0 while it answers one."""
        idle_since = self.idle_since
        return 0.0 if idle_since is None else now - idle_since

    def close_now(self) -> None:
        """Make the connection's thread end: its next read or write fails."""
        try:  # the socket's own shutdown: a TLS socket's would also drop its TLS state under the reading thread
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass


class HttpSlots:
    """At most ``capacity`` connections at once. Thread-safe."""

    def __init__(self, capacity: int, idle_limit_s: float) -> None:
        self.capacity = capacity
        self.idle_limit_s = idle_limit_s
        self._held: set[HttpSlot] = set()
        self._lock = threading.Lock()

    def take(self, sock: socket.socket, source: str) -> HttpSlot | None:
        """A slot for a new connection from ``source``, shedding an idle one if all are taken; None if none may go."""
        now = time.monotonic()
        with self._lock:
            if len(self._held) >= self.capacity:
                victim = choose_idle_victim(list(self._held), source, now)
                if victim is None:
                    return None
                self._held.discard(victim)
                victim.close_now()
            slot = HttpSlot(sock, source, now)
            self._held.add(slot)
            return slot

    def release(self, slot: HttpSlot) -> None:
        """The connection ended (or was shed: then its slot is already free)."""
        with self._lock:
            self._held.discard(slot)

    def rebind(self, slot: HttpSlot, sock: socket.socket) -> bool:
        """``sock`` (the TLS socket over the connection) is what shedding closes now; False if already shed."""
        with self._lock:
            slot.sock = sock
            return slot in self._held

    @staticmethod
    def answering(slot: HttpSlot) -> None:
        """The connection's request head is in: it is busy (never shed) until ``answered``."""
        slot.idle_since = None

    @staticmethod
    def answered(slot: HttpSlot) -> None:
        """The answer went out: the connection is idle, waiting for its next request."""
        slot.state = ConnectionState.GREETED
        slot.idle_since = time.monotonic()

    def close_overdue(self) -> None:
        """Close every connection idle for ``idle_limit_s`` or more (called every half second or so)."""
        now = time.monotonic()
        with self._lock:
            overdue = [slot for slot in self._held if slot.idle_for(now) >= self.idle_limit_s]
            for slot in overdue:
                self._held.discard(slot)
        for slot in overdue:
            slot.close_now()
