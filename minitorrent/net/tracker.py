"""The active server's tracker: which seeding clients hold which chunks.

Clients announce themselves (their seed port and, per file, whether they hold
all of it or which chunks) when they start seeding, when they gain a batch of
chunks, and every ``announce_interval``. A peer that has not announced for
``ttl_s`` is forgotten. Tracker state lives in memory only: after a failover
the clients' periodic announcements rebuild it on the new active server.

The peer's host is the address its connection came from, never a value it
sends, so a client cannot point others at a third machine.

Memory is bounded in total, not only per host: every entry is charged an
estimate of what it holds (``entry_cost``), and when the sum passes
``max_bytes`` the oldest entry of the host holding the most goes first, so
a few addresses announcing huge holdings evict their own entries, not
everyone else's.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

MAX_PEERS_PER_REPLY = 30  # enough sources for any download; keeps the reply small
MAX_PEERS_PER_HOST = 64  # seeding clients on one machine (tests run dozens on 127.0.0.1)
PEER_TTL_INTERVALS = 3  # a peer is forgotten after missing this many announcements
MAX_TRACKER_BYTES = 64 * 1024 * 1024  # all announcements held at once (about 64 fully-loaded peers' worth)
ENTRY_BYTES = 256  # what one peer entry costs beyond its files (objects, dict slots)
FILE_ENTRY_BYTES = 160  # what one file of an entry costs beyond its bitmap (the hex digest, a dict slot)


def entry_cost(files: dict[str, bytes | None]) -> int:
    """Estimated bytes one announcement holds in memory."""
    return ENTRY_BYTES + sum(FILE_ENTRY_BYTES + (len(have) if have else 0) for have in files.values())


@dataclass
class _Peer:
    last_seen: float
    files: dict[str, bytes | None] = field(default_factory=dict)  # sha256 -> chunk bitmap, None = complete
    cost: int = 0  # entry_cost(files)


class Tracker:
    """Peers and their holdings, expired after ``ttl_s`` without an announcement. Thread-safe."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, max_bytes: int = MAX_TRACKER_BYTES) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._peers: dict[tuple[str, int], _Peer] = {}
        self._bytes_by_host: dict[str, int] = {}

    @property
    def held_bytes(self) -> int:
        """The estimated bytes all entries hold now (at most ``max_bytes``)."""
        with self._lock:
            return sum(self._bytes_by_host.values())

    def announce(self, host: str, port: int, files: dict[str, bytes | None]) -> None:
        """Record what the peer at ``host:port`` holds now (replacing what it said before).

        One host keeps at most ``MAX_PEERS_PER_HOST`` entries (the oldest
        goes), so a client announcing from many ports cannot fill our memory;
        all hosts together hold at most ``max_bytes`` (the biggest holder's
        oldest entries go first). An entry alone over ``max_bytes`` is not kept.
        """
        peer = _Peer(self._clock(), dict(files), entry_cost(files))
        with self._lock:
            self._drop((host, port))
            same_host = [a for a in self._peers if a[0] == host]
            if len(same_host) >= MAX_PEERS_PER_HOST:
                self._drop(min(same_host, key=lambda a: self._peers[a].last_seen))
            if peer.cost > self.max_bytes:
                return
            self._peers[(host, port)] = peer
            self._bytes_by_host[host] = self._bytes_by_host.get(host, 0) + peer.cost
            self._evict_over_budget()

    def forget(self, host: str, port: int) -> None:
        """Drop a peer (it said goodbye)."""
        with self._lock:
            self._drop((host, port))

    def _evict_over_budget(self) -> None:
        """While over ``max_bytes``, drop the oldest entry of the host holding the most. Under the lock."""
        while sum(self._bytes_by_host.values()) > self.max_bytes:
            biggest = max(self._bytes_by_host, key=self._bytes_by_host.__getitem__)
            self._drop(min((a for a in self._peers if a[0] == biggest), key=lambda a: self._peers[a].last_seen))

    def _drop(self, address: tuple[str, int]) -> None:
        """Forget one entry and its cost. Under the lock."""
        peer = self._peers.pop(address, None)
        if peer is None:
            return
        left = self._bytes_by_host[address[0]] - peer.cost
        if left:
            self._bytes_by_host[address[0]] = left
        else:
            del self._bytes_by_host[address[0]]

    def peers_for(self, sha256: str, asker: tuple[str, int] | None,
                  limit: int = MAX_PEERS_PER_REPLY) -> list[tuple[str, int, bytes | None]]:
        """Up to ``limit`` peers holding any of ``sha256``, shuffled, never the asker.

        Each is ``(host, port, bitmap)``; a ``None`` bitmap means the whole file.
        """
        with self._lock:
            self._expire()
            found = [(host, port, peer.files[sha256]) for (host, port), peer in self._peers.items()
                     if sha256 in peer.files and (host, port) != asker]
        self._rng.shuffle(found)
        return found[:limit]

    def peer_count(self) -> int:
        """How many peers are known (after expiry)."""
        with self._lock:
            self._expire()
            return len(self._peers)

    def peers(self) -> list[tuple[str, int, int, float]]:
        """Every known peer as ``(host, port, files announced, seconds since its last announcement)``."""
        with self._lock:
            self._expire()
            now = self._clock()
            return sorted((host, port, len(peer.files), now - peer.last_seen)
                          for (host, port), peer in self._peers.items())

    def _expire(self) -> None:
        deadline = self._clock() - self.ttl_s
        for address in [a for a, peer in self._peers.items() if peer.last_seen < deadline]:
            self._drop(address)
