"""The active server's tracker: which seeding clients hold which chunks.

Clients announce themselves (their seed port and, per file, whether they hold
all of it or which chunks) when they start seeding, when they gain a batch of
chunks, and every ``announce_interval``. A peer that has not announced for
``ttl_s`` is forgotten. Tracker state lives in memory only: after a failover
the clients' periodic announcements rebuild it on the new active server.

The peer's host is the address its connection came from, never a value it
sends, so a client cannot point others at a third machine.
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


@dataclass
class _Peer:
    last_seen: float
    files: dict[str, bytes | None] = field(default_factory=dict)  # sha256 -> chunk bitmap, None = complete
    identity: str = ""  # the TLS identity it announced, which downloaders pin


class Tracker:
    """Peers and their holdings, expired after ``ttl_s`` without an announcement. Thread-safe."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._peers: dict[tuple[str, int], _Peer] = {}

    def announce(self, host: str, port: int, files: dict[str, bytes | None], identity: str = "") -> None:
        """Record what the peer at ``host:port`` holds now (replacing what it said before).

        One host keeps at most ``MAX_PEERS_PER_HOST`` entries (the oldest
        goes), so a client announcing from many ports cannot fill our memory.
        """
        with self._lock:
            same_host = [a for a in self._peers if a[0] == host and a != (host, port)]
            if len(same_host) >= MAX_PEERS_PER_HOST:
                del self._peers[min(same_host, key=lambda a: self._peers[a].last_seen)]
            self._peers[(host, port)] = _Peer(self._clock(), dict(files), identity)

    def identity_of(self, host: str, port: int) -> str:
        """The identity the peer at ``host:port`` announced ("" if none or unknown)."""
        with self._lock:
            peer = self._peers.get((host, port))
            return peer.identity if peer else ""

    def forget(self, host: str, port: int) -> None:
        """Drop a peer (it said goodbye)."""
        with self._lock:
            self._peers.pop((host, port), None)

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

    def _expire(self) -> None:
        deadline = self._clock() - self.ttl_s
        for address in [a for a, peer in self._peers.items() if peer.last_seen < deadline]:
            del self._peers[address]
