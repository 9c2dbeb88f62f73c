"""Which chunk to ask which source for: the scheduling of a multi-source download.

No I/O here: the download's stream threads ask the board for work, tell it
what arrived and what failed, and the board decides.

* **Rarest first.** A peer is asked for the chunks it holds that the fewest
  known peers hold, so rare chunks spread before their only holder leaves.
* **Random first, from the server.** The server holds everything; each
  client asks it for chunks in its own random order, so the clients of a
  crowd get *different* chunks from the server and can trade them.
* **Strikes.** A source that sends a chunk failing verification gets a
  strike; after ``MAX_STRIKES`` it is dropped and its chunks go elsewhere.
* **Endgame.** When only a few chunks are left and all are in flight, an
  idle source may ask for one already requested elsewhere; the first copy
  that verifies wins and the other is discarded on arrival.
"""
from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass, field

MAX_STRIKES = 3  # bad chunks a peer may send before it is dropped for the rest of the download
ENDGAME_CHUNKS = 4  # duplicate requests are allowed once this few chunks remain
SERVER_DEPTH_WITH_PEERS = 4  # chunks in flight from the server, all its streams together, while peers help


@dataclass(eq=False)
class Source:
    """One place chunks come from: the servers (failover-aware) or one peer."""

    label: str
    is_server: bool = False
    have: set[int] | None = None  # None: every chunk
    strikes: int = 0
    dropped: bool = False
    bytes: int = 0
    reason: str = ""

    def holds(self, index: int) -> bool:
        """True if this source (says it) holds chunk ``index``."""
        return self.have is None or index in self.have


@dataclass
class ChunkBoard:
    """The chunks of one download: needed, in flight (and where), done. Thread-safe."""

    count: int
    done: set[int] = field(default_factory=set)
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._in_flight: dict[int, set[Source]] = {}
        order = [i for i in range(self.count) if i not in self.done]
        self.rng.shuffle(order)
        self._server_order = deque(order)
        self._availability: dict[int, int] = {}
        self._peers: list[Source] = []
        self.closed = False

    @property
    def finished(self) -> bool:
        """Every chunk is done."""
        with self._cond:
            return len(self.done) == self.count

    def remaining(self) -> int:
        """Chunks not done yet."""
        with self._cond:
            return self.count - len(self.done)

    def add_peer(self, source: Source) -> None:
        """Count a peer's chunks toward availability (for rarest first)."""
        with self._cond:
            self._peers.append(source)
            self._recount()
            self._cond.notify_all()

    def update_have(self, source: Source, have: set[int] | None) -> None:
        """A peer's holdings changed (from the tracker, or a chunk it turned out not to hold)."""
        with self._cond:
            source.have = have
            self._recount()
            self._cond.notify_all()

    def take(self, source: Source, limit: int) -> list[int]:
        """Up to ``limit`` chunks for ``source`` to request now (may be empty).

        The server gets a shorter pipeline while peers are around, so that it
        does not tie up chunks the peers could bring faster.
        """
        with self._cond:
            if source.dropped or self.closed:
                return []
            if source.is_server and self._peers:
                limit = min(limit, SERVER_DEPTH_WITH_PEERS - self._server_in_flight())
            if limit <= 0:
                return []
            wanted = self._fresh_chunks(source, limit)
            if not wanted and self.count - len(self.done) <= ENDGAME_CHUNKS:
                wanted = self._endgame_chunks(source, limit)
            for index in wanted:
                self._in_flight.setdefault(index, set()).add(source)
            return wanted

    def arrived(self, index: int, source: Source, nbytes: int) -> bool:
        """A verified chunk arrived; True if it was new (False: an endgame duplicate)."""
        with self._cond:
            self._in_flight.pop(index, None)
            if index in self.done:
                return False
            self.done.add(index)
            source.bytes += nbytes
            self._cond.notify_all()
            return True

    def release(self, indexes: list[int], source: Source) -> None:
        """Give back chunks ``source`` will not deliver (failure, not held); others may take them."""
        with self._cond:
            for index in indexes:
                holders = self._in_flight.get(index)
                if holders is not None:
                    holders.discard(source)
                    if not holders:
                        del self._in_flight[index]
            self._cond.notify_all()

    def strike(self, source: Source, reason: str) -> bool:
        """Count a bad chunk against ``source``; True if it is now dropped."""
        with self._cond:
            source.strikes += 1
            if source.strikes >= MAX_STRIKES and not source.is_server:
                self._drop(source, f"{source.strikes} chunks failed verification ({reason})")
            return source.dropped

    def drop(self, source: Source, reason: str) -> None:
        """Stop using ``source`` for the rest of the download."""
        with self._cond:
            self._drop(source, reason)

    def wait_for_change(self, timeout_s: float) -> None:
        """Block until something changes on the board (or the timeout)."""
        with self._cond:
            self._cond.wait(timeout_s)

    def wait_until_finished(self, timeout_s: float) -> bool:
        """Block until every chunk is done or the board is closed (or the timeout); True if so."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.done) == self.count or self.closed, timeout_s)

    def close(self) -> None:
        """The download ended: give no more work to anyone, wake every waiter."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def _drop(self, source: Source, reason: str) -> None:
        if source.dropped:
            return
        source.dropped, source.reason = True, reason
        if source in self._peers:
            self._peers.remove(source)
            self._recount()
        self._cond.notify_all()

    def _fresh_chunks(self, source: Source, limit: int) -> list[int]:
        if source.is_server:
            while self._server_order and self._server_order[0] in self.done:
                self._server_order.popleft()  # keeps the scan short: only in-flight chunks stay ahead
            # What no peer holds comes from the server first; what peers hold is left to them.
            open_chunks = [i for i in self._server_order if self._is_open(i)]
            candidates = iter(sorted(open_chunks, key=lambda i: self._availability.get(i, 0) > 0))
        else:
            held = range(self.count) if source.have is None else source.have
            candidates = iter(sorted((i for i in held if self._is_open(i)),
                                     key=lambda i: self._availability.get(i, 0)))
        wanted = []
        for index in candidates:
            wanted.append(index)
            if len(wanted) == limit:
                break
        return wanted

    def _endgame_chunks(self, source: Source, limit: int) -> list[int]:
        return [i for i, holders in self._in_flight.items()
                if source not in holders and source.holds(i) and i not in self.done][:limit]

    def _server_in_flight(self) -> int:
        return sum(1 for holders in self._in_flight.values() if any(h.is_server for h in holders))

    def _is_open(self, index: int) -> bool:
        return index not in self.done and index not in self._in_flight

    def _recount(self) -> None:
        counts: dict[int, int] = {}
        for peer in self._peers:
            for index in range(self.count) if peer.have is None else peer.have:
                counts[index] = counts.get(index, 0) + 1
        self._availability = counts
