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

Cost (as libtorrent's piece picker): availability is kept incrementally, a
count per chunk with chunks bucketed by count, updated when a peer says what
it has or leaves; a pick walks a cursor or a bucket and stops when it has
enough, so it costs the same for a file of ten chunks or of four million.
Memory per chunk is a bit (``ChunkSet``) plus, once partial peers appear,
a counter; nothing per chunk is a Python object.
"""
from __future__ import annotations

import math
import random
import re
import threading
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

MAX_STRIKES = 3  # bad chunks a peer may send before it is dropped for the rest of the download
ENDGAME_CHUNKS = 4  # duplicate requests are allowed once this few chunks remain
SERVER_DEPTH_WITH_PEERS = 4  # chunks in flight from the server, all its streams together, while peers help


class ChunkSet:
    """A set of chunk indexes ``0 <= i < count`` kept as one bit per chunk.

    The bits are laid out as the protocol's chunk bitmaps (bit ``i % 8`` of
    byte ``i // 8``), so ``bitmap()`` is a copy, not a loop. Four million
    chunks take 512 KiB, against hundreds of MiB for a ``set`` of ints.
    Reading (``in``, ``len``, iterating) from another thread while one thread
    adds is safe: a byte is written whole, under the GIL.
    """

    __slots__ = ("count", "_bits", "_size")

    def __init__(self, count: int, indexes: Iterable[int] = ()) -> None:
        self.count = count
        self._bits = bytearray((count + 7) // 8)
        self._size = 0
        self.update(indexes)

    def add(self, index: int) -> bool:
        """Add ``index``; True if it was not there. ``IndexError`` if out of range."""
        if not 0 <= index < self.count:
            raise IndexError(f"chunk index {index} out of range (0..{self.count - 1})")
        byte, bit = index >> 3, 1 << (index & 7)
        if self._bits[byte] & bit:
            return False
        self._bits[byte] |= bit
        self._size += 1
        return True

    def update(self, indexes: Iterable[int]) -> None:
        """Add every index of ``indexes``."""
        for index in indexes:
            self.add(index)

    def bitmap(self) -> bytes:
        """The protocol's chunk bitmap of this set (a copy)."""
        return bytes(self._bits)

    def __contains__(self, index: object) -> bool:
        return (isinstance(index, int) and 0 <= index < self.count
                and bool(self._bits[index >> 3] >> (index & 7) & 1))

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[int]:
        """The indexes in ascending order; runs of empty bytes are skipped at C speed."""
        for match in _NONZERO_BYTE.finditer(self._bits):
            byte = match.start()
            value = self._bits[byte]
            for bit in range(8):
                if value >> bit & 1:
                    yield byte * 8 + bit

    def __repr__(self) -> str:
        return f"ChunkSet({len(self)} of {self.count})"


_NONZERO_BYTE = re.compile(rb"[^\x00]")


@dataclass(eq=False)
class Source:
    """One place chunks come from: the servers (failover-aware) or one peer.

    The board writes ``have``, ``strikes``, ``dropped``, ``bytes`` and
    ``reason`` under its lock; other threads read them through
    ``ChunkBoard.status`` (or ``ChunkBoard.is_dropped``), which takes it too.
    """

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


@dataclass(frozen=True)
class SourceStatus:
    """A consistent snapshot of a ``Source``'s mutable fields."""

    strikes: int
    dropped: bool
    bytes: int
    reason: str


class _Availability:
    """How many partial peers hold each chunk, chunks bucketed by that count.

    Peers holding the whole file are counted apart (``seeds``): they add the
    same to every chunk, so they change no order and cost nothing per chunk.
    A bucket is a queue with lazy deletion: a chunk is appended when its
    count changes (or it is given back) and an entry is only valid while the
    chunk's count is still the bucket's and the chunk is open. Whoever scans
    a bucket pops the stale entries it meets, so every entry is paid for
    once; a Python set would not do, as iterating one from the start walks
    over every slot its removed entries left. The per-chunk array is made
    when the first partial peer appears.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.seeds = 0
        self._counts: array | None = None
        self.buckets: list[deque[int]] = [deque()]  # buckets[c]: chunks held by c partial peers (maybe stale)

    def of(self, index: int) -> int:
        """Partial peers holding ``index`` (seeds not counted)."""
        return 0 if self._counts is None else self._counts[index]

    def add(self, have: set[int] | None, done: ChunkSet) -> None:
        if have is None:
            self.seeds += 1
            return
        counts = self._array()
        for index in have:
            counts[index] += 1
            self.requeue(index, done)

    def remove(self, have: set[int] | None, done: ChunkSet) -> list[int]:
        """Uncount ``have``; returns the chunks still wanted that no partial peer holds any more."""
        if have is None:
            self.seeds -= 1
            return []
        counts, orphaned = self._array(), []
        for index in have:
            counts[index] -= 1
            if counts[index]:
                self.requeue(index, done)
            elif index not in done:
                orphaned.append(index)
        return orphaned

    def requeue(self, index: int, done: ChunkSet) -> None:
        """Offer ``index`` again in the bucket of its count (its count changed, or it was given back)."""
        count = self.of(index)
        if count and index not in done:
            while len(self.buckets) <= count:
                self.buckets.append(deque())
            self.buckets[count].append(index)

    def _array(self) -> array:
        if self._counts is None:
            self._counts = array("I", bytes(4 * self.count))
        return self._counts


class _Permutation:
    """A random order of ``0..count-1`` in O(1) memory: ``i -> (a*i + b) mod count``, ``a`` coprime to it.

    Each board draws its own ``a`` and ``b``, so two clients' first picks
    overlap no more than random ones would; a shuffled list of four million
    ints would cost 150 MiB and a second of CPU.
    """

    def __init__(self, count: int, rng: random.Random) -> None:
        self.count = count
        self.position = 0
        self._b = rng.randrange(count) if count else 0
        self._a = 1
        while count > 2:
            self._a = rng.randrange(1, count)
            if math.gcd(self._a, count) == 1:
                break

    def next(self) -> int | None:
        """The next index, or None when every one was given."""
        if self.position >= self.count:
            return None
        index = (self._a * self.position + self._b) % self.count
        self.position += 1
        return index


class ChunkBoard:
    """The chunks of one download: needed, in flight (and where), done. Thread-safe.

    ``done`` (a ``ChunkSet``) is written under the board's lock; ``count`` and
    ``closed`` are plain values any thread may read.
    """

    def __init__(self, count: int, done: Iterable[int] = (), rng: random.Random | None = None) -> None:
        self.count = count
        self.done = ChunkSet(count, done)
        self.closed = False
        self._cond = threading.Condition()
        self._idle_waiters = 0  # threads in wait_for_change: nobody else needs a wake-up per chunk
        self._ended = threading.Event()  # every chunk done, or closed
        self._in_flight: dict[int, set[Source]] = {}
        self._server_flights = 0  # chunks in flight with a server among their holders
        self._returned: set[int] = set()  # chunks given back (open again, maybe stale): looked at first
        self._orphans: deque[int] = deque()  # chunks the last partial peer holding them let go (maybe stale)
        self._server_walk = _Permutation(count, rng or random.Random())
        self._deferred: deque[int] = deque()  # passed by the server's walk because a peer held them
        self._availability = _Availability(count)
        self._seed_cursors: dict[Source, int] = {}  # a whole-file peer's ascending walk
        self._peers: list[Source] = []
        self._check_ended()

    @property
    def finished(self) -> bool:
        """Every chunk is done."""
        with self._cond:
            return len(self.done) == self.count

    def remaining(self) -> int:
        """Chunks not done yet."""
        with self._cond:
            return self.count - len(self.done)

    def mark_done(self, indexes: Iterable[int]) -> None:
        """Chunks verified before the download started (resumed): never handed out."""
        with self._cond:
            self.done.update(indexes)
            self._check_ended()

    def add_peer(self, source: Source) -> None:
        """Count a peer's chunks toward availability (for rarest first)."""
        with self._cond:
            self._peers.append(source)
            self._availability.add(source.have, self.done)
            self._changed()

    def update_have(self, source: Source, have: set[int] | None) -> None:
        """A peer's holdings changed (from the tracker); availability moves by the difference."""
        with self._cond:
            old, source.have = source.have, have
            if source in self._peers:
                if old is None or have is None:
                    self._orphans.extend(self._availability.remove(old, self.done))
                    self._availability.add(have, self.done)
                else:
                    self._orphans.extend(self._availability.remove(old - have, self.done))
                    self._availability.add(have - old, self.done)
                self._seed_cursors.pop(source, None)
            self._changed()

    def lacks(self, source: Source, index: int) -> bool:
        """``source`` refused chunk ``index``; True if it had named its chunks and now no longer counts this one.

        False for a source that claims the whole file: refusing a chunk is then a fault, not news.
        """
        with self._cond:
            if source.have is None:
                return False
            if index in source.have:
                source.have.discard(index)
                if source in self._peers:
                    self._orphans.extend(self._availability.remove({index}, self.done))
            return True

    def take(self, source: Source, limit: int) -> list[int]:
        """Up to ``limit`` chunks for ``source`` to request now (may be empty).

        The server gets a shorter pipeline while peers are around, so that it
        does not tie up chunks the peers could bring faster.
        """
        with self._cond:
            if source.dropped or self.closed:
                return []
            if source.is_server and self._peers:
                limit = min(limit, SERVER_DEPTH_WITH_PEERS - self._server_flights)
            if limit <= 0:
                return []
            wanted = self._fresh_chunks(source, limit)
            if not wanted and self.count - len(self.done) <= ENDGAME_CHUNKS:
                wanted = self._endgame_chunks(source, limit)
            for index in wanted:
                self._add_holder(index, source)
            return wanted

    def arrived(self, index: int, source: Source, nbytes: int) -> bool:
        """A verified chunk arrived; True if it was new (False: an endgame duplicate)."""
        with self._cond:
            for holder in self._in_flight.pop(index, ()):
                if holder.is_server:
                    self._server_flights -= 1
                    break
            if not self.done.add(index):
                return False
            source.bytes += nbytes
            if self._idle_waiters:
                self._cond.notify_all()
            self._check_ended()
            return True

    def release(self, indexes: list[int], source: Source) -> None:
        """Give back chunks ``source`` will not deliver (failure, not held); others may take them."""
        with self._cond:
            for index in indexes:
                holders = self._in_flight.get(index)
                if holders is None or source not in holders:
                    continue
                self._remove_holder(index, holders, source)
            self._changed()

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

    def is_dropped(self, source: Source) -> bool:
        """Whether ``source`` was dropped (any thread)."""
        with self._cond:
            return source.dropped

    def status(self, source: Source) -> SourceStatus:
        """A snapshot of ``source``'s strikes, drop and bytes, read under the board's lock (any thread)."""
        with self._cond:
            return SourceStatus(source.strikes, source.dropped, source.bytes, source.reason)

    def wait_for_change(self, timeout_s: float) -> None:
        """Block until something changes on the board (or the timeout)."""
        with self._cond:
            self._idle_waiters += 1
            try:
                self._cond.wait(timeout_s)
            finally:
                self._idle_waiters -= 1

    def wait_until_finished(self, timeout_s: float) -> bool:
        """Block until every chunk is done or the board is closed (or the timeout); True if so."""
        return self._ended.wait(timeout_s)

    def close(self) -> None:
        """The download ended: give no more work to anyone, wake every waiter."""
        with self._cond:
            self.closed = True
            self._ended.set()
            self._cond.notify_all()

    # Under the lock ------------------------------------------------------------------

    def _changed(self) -> None:
        if self._idle_waiters:
            self._cond.notify_all()

    def _check_ended(self) -> None:
        if len(self.done) == self.count:
            self._ended.set()

    def _add_holder(self, index: int, source: Source) -> None:
        holders = self._in_flight.setdefault(index, set())
        if source.is_server and not any(h.is_server for h in holders):
            self._server_flights += 1
        holders.add(source)

    def _remove_holder(self, index: int, holders: set[Source], source: Source) -> None:
        holders.discard(source)
        if source.is_server and not any(h.is_server for h in holders):
            self._server_flights -= 1
        if not holders:
            del self._in_flight[index]
            if index not in self.done:
                self._returned.add(index)
                self._availability.requeue(index, self.done)  # its bucket entry was popped when it was taken

    def _drop(self, source: Source, reason: str) -> None:
        if source.dropped:
            return
        source.dropped, source.reason = True, reason
        if source in self._peers:
            self._peers.remove(source)
            self._orphans.extend(self._availability.remove(source.have, self.done))
            self._seed_cursors.pop(source, None)
        self._cond.notify_all()

    def _is_open(self, index: int) -> bool:
        return index not in self.done and index not in self._in_flight

    def _fresh_chunks(self, source: Source, limit: int) -> list[int]:
        if source.is_server:
            return self._server_chunks(source, limit)
        if source.have is None:
            return self._seed_chunks(source, limit)
        return self._partial_peer_chunks(source, limit)

    def _from_returned(self, limit: int, wanted: list[int], unheld_only: bool) -> None:
        """Take chunks given back, dropping stale entries (done, or in flight again) on the way.

        With ``unheld_only``, only those no peer holds: the rest sit in the
        availability buckets too, and wait there for their turn.
        """
        for index in list(self._returned):
            if len(wanted) >= limit:
                return
            if not self._is_open(index):
                self._returned.discard(index)
            elif index not in wanted and not (unheld_only and self._held_by_peers(index)):
                self._returned.discard(index)
                wanted.append(index)

    def _from_orphans(self, limit: int, wanted: list[int]) -> None:
        """Take chunks no partial peer holds any more (walks may have passed them while one did)."""
        while len(wanted) < limit and self._orphans:
            index = self._orphans.popleft()
            if self._is_open(index) and not self._availability.of(index) and index not in wanted:
                wanted.append(index)

    def _held_by_peers(self, index: int) -> bool:
        return self._availability.of(index) > 0

    def _server_chunks(self, source: Source, limit: int) -> list[int]:
        """What no peer holds comes from the server first, in its random order; what peers hold is left to them."""
        wanted: list[int] = []
        unheld_first = not self._availability.seeds  # with a whole-file peer about, every chunk is held alike
        self._from_returned(limit, wanted, unheld_only=unheld_first)
        self._from_orphans(limit, wanted)
        while len(wanted) < limit:
            index = self._server_walk.next()
            if index is None:
                break
            if not self._is_open(index) or index in wanted:
                continue  # done for good, or in flight: back through _returned if it is given back
            if unheld_first and self._availability.of(index):
                self._deferred.append(index)
            else:
                wanted.append(index)
        self._from_returned(limit, wanted, unheld_only=False)
        while len(wanted) < limit and self._deferred:
            index = self._deferred.popleft()
            if self._is_open(index) and index not in wanted:
                wanted.append(index)
        return wanted

    def _seed_chunks(self, source: Source, limit: int) -> list[int]:
        """A whole-file peer: first what no partial peer holds (ascending), then the rarest buckets."""
        wanted: list[int] = []
        for index in list(self._returned):  # given back and held by no partial peer: the rarest there are
            if len(wanted) < limit and self._is_open(index) and not self._availability.of(index):
                self._returned.discard(index)
                wanted.append(index)
        self._from_orphans(limit, wanted)
        cursor = self._seed_cursors.get(source, 0)
        while len(wanted) < limit and cursor < self.count:
            if self._is_open(cursor) and not self._availability.of(cursor) and cursor not in wanted:
                wanted.append(cursor)
            cursor += 1
        self._seed_cursors[source] = cursor
        for count in range(1, len(self._availability.buckets)):
            if len(wanted) >= limit:
                break
            self._take_from_bucket(count, source, limit, wanted)
        return wanted

    def _partial_peer_chunks(self, source: Source, limit: int) -> list[int]:
        """A peer that named its chunks: those it holds, rarest bucket first."""
        wanted: list[int] = []  # what it holds sits in a bucket (given back or not)
        for count in range(1, len(self._availability.buckets)):
            if len(wanted) >= limit:
                break
            self._take_from_bucket(count, source, limit, wanted)
        return wanted

    def _take_from_bucket(self, count: int, source: Source, limit: int, wanted: list[int]) -> None:
        """Take open chunks ``source`` holds from bucket ``count``, popping stale entries on the way.

        Entries taken or stale (count changed, done, in flight: a release
        queues it again) leave for good; entries of chunks ``source`` lacks go
        back to the front, for the peers that hold them.
        """
        bucket, others = self._availability.buckets[count], []
        while bucket and len(wanted) < limit:
            index = bucket.popleft()
            if self._availability.of(index) != count or not self._is_open(index) or index in wanted:
                continue
            if source.holds(index):
                wanted.append(index)
            else:
                others.append(index)
        bucket.extendleft(reversed(others))

    def _endgame_chunks(self, source: Source, limit: int) -> list[int]:
        return [i for i, holders in self._in_flight.items()
                if source not in holders and source.holds(i) and i not in self.done][:limit]
