"""The chunk board's scheduling, without sockets: rarest first, the server's share, strikes, endgame."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from minitorrent.client.chunkboard import (
    ENDGAME_CHUNKS,
    MAX_STRIKES,
    SERVER_DEPTH_WITH_PEERS,
    ChunkBoard,
    ChunkSet,
    Source,
    SourceStatus,
)
from minitorrent.wire.protocol import chunks_to_bitmap


def board_of(count: int, seed: int = 0, done: set[int] | None = None) -> ChunkBoard:
    """A board with a seeded shuffle, so a failing case repeats."""
    return ChunkBoard(count, done=set(done or ()), rng=random.Random(seed))


def server() -> Source:
    return Source("server", is_server=True)


def peer(name: str, have: set[int] | None = None) -> Source:
    return Source(f"peer {name}", have=have)


def deliver(board: ChunkBoard, source: Source, indexes: list[int], nbytes: int = 100) -> None:
    for index in indexes:
        assert board.arrived(index, source, nbytes)


class TestRarestFirst:
    def test_peer_gets_the_chunks_fewest_peers_hold(self):
        """A peer holding everything is asked first for the chunks no other peer holds."""
        board = board_of(10)
        everything, half_a, half_b = peer("a"), peer("b", set(range(5))), peer("c", set(range(5)))
        for source in (everything, half_a, half_b):
            board.add_peer(source)
        assert {5, 6, 7, 8, 9} == set(board.take(everything, 5))

    def test_rarest_order_follows_availability(self):
        """Chunks come in order of how many peers hold them: 1 holder, then 2, then 3."""
        board = board_of(6)
        asking = peer("a", {0, 1, 2, 3, 4, 5})
        for source in (asking, peer("b", {0, 1, 2, 3}), peer("c", {0, 1})):
            board.add_peer(source)
        assert [{4, 5}, {2, 3}, {0, 1}] == [set(board.take(asking, 2)) for _ in range(3)]

    def test_peer_only_gets_chunks_it_holds(self):
        """A peer is never asked for a chunk it did not announce."""
        board = board_of(10)
        partial = peer("a", {2, 4, 6})
        board.add_peer(partial)
        assert {2, 4, 6} == set(board.take(partial, 8))
        assert [] == board.take(partial, 8)

    def test_update_have_changes_what_a_peer_is_asked_for(self):
        """New holdings from the tracker (or a refused chunk) change what the peer is asked for."""
        board = board_of(10)
        partial = peer("a", {1})
        board.add_peer(partial)
        board.update_have(partial, {7, 8})
        assert {7, 8} == set(board.take(partial, 8))

    def test_dropped_peer_no_longer_counts_toward_availability(self):
        """After a drop, the chunks only that peer held are the rarest again."""
        board = board_of(4)
        liar, other, asking = peer("liar", {0, 1}), peer("other", {0, 1, 2, 3}), peer("asking")
        for source in (liar, other, asking):
            board.add_peer(source)
        board.drop(liar, "test")
        # Counting the liar, 2 and 3 would be the rarest; without it all are equal (ties by index).
        assert [0, 1] == board.take(asking, 2)


    def test_chunks_a_leaving_peer_alone_held_go_to_a_seed(self):
        """When the only partial holder of chunks leaves, a whole-file peer whose walk passed them takes them."""
        board = board_of(6)
        seed, partial = peer("seed"), peer("partial", {0, 1})
        board.add_peer(seed)
        board.add_peer(partial)
        assert [2, 3, 4, 5] == board.take(seed, 4)  # 0 and 1 are held by the partial peer: less rare
        board.drop(partial, "left")
        assert {0, 1} == set(board.take(seed, 4))

    def test_lacks_uncounts_one_chunk(self):
        """A peer refusing a chunk it announced no longer holds it, nor counts toward its availability."""
        board = board_of(4)
        partial, seed = peer("partial", {0, 1}), peer("seed")
        board.add_peer(partial)
        board.add_peer(seed)
        assert board.lacks(partial, 0)
        assert {1} == partial.have
        assert not board.lacks(seed, 0)  # a whole-file peer refusing a chunk is at fault
        assert [0, 2] == board.take(seed, 2)


class TestChunkSet:
    def test_set_operations(self):
        """A ChunkSet adds, counts, tests and iterates (ascending) like a set of ints."""
        chunks = ChunkSet(10, [7, 3])
        assert (True, False) == (chunks.add(5), chunks.add(5))
        assert ([3, 5, 7], 3) == (list(chunks), len(chunks))
        assert (True, False, False, False) == (7 in chunks, 4 in chunks, 10 in chunks, -1 in chunks)

    def test_one_bit_per_chunk(self):
        """Four million chunks cost about half a megabyte, not a Python object each."""
        import tracemalloc
        tracemalloc.start()
        try:
            chunks = ChunkSet(4 << 20, range(0, 4 << 20, 3))
            used, _peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert (True, (4 << 20) // 3 + 1) == (used < (4 << 20) // 8 + (1 << 16), len(chunks))

    def test_bitmap_is_the_protocols(self):
        """bitmap() is what protocol.chunks_to_bitmap makes of the same indexes."""
        indexes = {0, 3, 8, 9, 21}
        assert chunks_to_bitmap(indexes, 22) == ChunkSet(22, indexes).bitmap()
        assert indexes == set(ChunkSet(22, indexes))


class TestSourceStatus:
    def test_status_is_a_snapshot(self):
        """status() reads a source's strikes, drop, bytes and reason together, under the board's lock."""
        board = board_of(4)
        liar = peer("liar")
        board.add_peer(liar)
        assert board.take(liar, 1) == [0]
        board.arrived(0, liar, 10)
        board.strike(liar, "bad")
        assert SourceStatus(1, False, 10, "") == board.status(liar)
        board.drop(liar, "gone")
        assert (True, SourceStatus(1, True, 10, "gone")) == (board.is_dropped(liar), board.status(liar))


class TestServerShare:
    def test_server_order_is_random_per_board(self):
        """Alone, the server hands out every chunk, each client in its own random order."""
        first, second = board_of(64, seed=1), board_of(64, seed=2)
        order_1, order_2 = first.take(server(), 64), second.take(server(), 64)
        assert list(range(64)) == sorted(order_1)
        assert list(range(64)) != order_1
        assert order_1 != order_2

    def test_server_prefers_chunks_no_peer_holds(self):
        """While peers help, the server is asked for what no peer holds first."""
        board = board_of(20)
        board.add_peer(peer("a", set(range(16))))
        taken = board.take(server(), 8)
        assert SERVER_DEPTH_WITH_PEERS == len(taken)
        assert set(taken) <= {16, 17, 18, 19}

    def test_server_still_serves_what_peers_hold(self):
        """The server is a fallback: once nothing else is open it takes chunks peers hold too."""
        board = board_of(6)
        board.add_peer(peer("a", {0, 1, 2, 3}))
        main = server()
        first = board.take(main, 8)
        deliver(board, main, first)
        assert {4, 5} <= set(first)
        assert 4 == len(first)
        assert 2 == len(board.take(main, 8))

    def test_server_in_flight_cap_with_peers(self):
        """With peers, the server's streams together keep at most SERVER_DEPTH_WITH_PEERS chunks in flight."""
        board = board_of(40)
        board.add_peer(peer("a", set()))
        main = server()
        first = board.take(main, 8)
        assert SERVER_DEPTH_WITH_PEERS == len(first)
        assert [] == board.take(main, 8)  # the second stream finds the pipeline full
        deliver(board, main, first[:1])
        assert 1 == len(board.take(main, 8))

    def test_no_cap_without_peers(self):
        """Without peers the server gets the full pipeline depth asked for."""
        board = board_of(40)
        assert 16 == len(board.take(server(), 16))

    def test_server_never_dropped(self):
        """Strikes against the server never drop it (it is the fallback)."""
        board = board_of(10)
        main = server()
        for _ in range(MAX_STRIKES * 2):
            assert not board.strike(main, "bad")
        assert not main.dropped
        assert board.take(main, 1)


class TestStrikes:
    def test_peer_dropped_at_max_strikes(self):
        """A peer survives MAX_STRIKES - 1 bad chunks and is dropped at the next; then it gets nothing."""
        board = board_of(10)
        liar = peer("liar")
        board.add_peer(liar)
        outcomes = [board.strike(liar, f"chunk {i}") for i in range(MAX_STRIKES)]
        assert [False] * (MAX_STRIKES - 1) + [True] == outcomes
        assert liar.dropped
        assert "failed verification" in liar.reason
        assert [] == board.take(liar, 8)

    def test_drop_keeps_the_first_reason(self):
        """Dropping twice keeps the first reason."""
        board = board_of(4)
        gone = peer("gone")
        board.add_peer(gone)
        board.drop(gone, "connection reset")
        board.drop(gone, "later")
        assert "connection reset" == gone.reason

    def test_chunks_of_a_dropped_peer_go_elsewhere(self):
        """What a dropped peer had in flight, once released, is taken by another source."""
        board = board_of(10)
        liar, main = peer("liar"), server()
        board.add_peer(liar)
        held = board.take(liar, 8)
        assert set(range(10)) - set(held) == set(board.take(main, 8))
        board.drop(liar, "stalled")
        board.release(held, liar)
        assert set(held) == set(board.take(main, 8))  # no peer left: no pipeline cap either


class TestRelease:
    def test_release_returns_chunks(self):
        """Released chunks can be taken again, by the same or another source."""
        board = board_of(8)
        a, b = peer("a"), peer("b")
        board.add_peer(a)
        board.add_peer(b)
        taken = board.take(a, 8)
        assert [] == board.take(b, 8)
        board.release(taken[:3], a)
        assert set(taken[:3]) == set(board.take(b, 8))

    def test_release_of_one_holder_keeps_the_other(self):
        """In the endgame, one holder giving a chunk back leaves it in flight with the other."""
        board = board_of(2)
        a, b = peer("a"), peer("b")
        board.add_peer(a)
        board.add_peer(b)
        taken = board.take(a, 2)
        assert set(taken) == set(board.take(b, 2))  # 2 <= ENDGAME_CHUNKS: duplicates
        board.release(taken, a)
        assert {index: {b} for index in taken} == board._in_flight
        assert all(board.arrived(index, b, 1) for index in taken)


class TestEndgame:
    def test_no_duplicates_while_more_than_endgame_chunks_remain(self):
        """With more than ENDGAME_CHUNKS left, an idle source gets nothing already in flight."""
        count = ENDGAME_CHUNKS + 1
        board = board_of(count)
        a, b = peer("a"), peer("b")
        board.add_peer(a)
        board.add_peer(b)
        assert count == len(board.take(a, count))
        assert [] == board.take(b, count)

    def test_duplicates_once_endgame_chunks_remain(self):
        """At ENDGAME_CHUNKS left, all in flight, an idle source is handed copies of them."""
        count = ENDGAME_CHUNKS + 1
        board = board_of(count)
        a, b = peer("a"), peer("b")
        board.add_peer(a)
        board.add_peer(b)
        taken = board.take(a, count)
        deliver(board, a, taken[:1])
        assert set(taken[1:]) == set(board.take(b, count))

    def test_endgame_duplicate_only_of_chunks_the_source_holds(self):
        """An endgame copy is only asked of a source that holds the chunk."""
        board = board_of(3)
        a, b = peer("a"), peer("b", {0})
        board.add_peer(a)
        board.add_peer(b)
        board.take(a, 3)
        assert [0] == board.take(b, 3)

    def test_duplicate_arrival_returns_false(self):
        """The first verified copy wins; the second arrival is reported as a duplicate."""
        board = board_of(1)
        a, main = peer("a"), server()
        board.add_peer(a)
        assert [0] == board.take(a, 1)
        assert [0] == board.take(main, 1)
        assert board.arrived(0, main, 100)
        assert not board.arrived(0, a, 100)
        assert (100, 0) == (main.bytes, a.bytes)
        assert board.finished

    def test_no_source_gets_the_same_chunk_twice(self):
        """Endgame never hands a source a chunk it already has in flight."""
        board = board_of(2)
        main = server()
        assert 2 == len(board.take(main, 4))
        assert [] == board.take(main, 4)


class TestDoneChunks:
    def test_resumed_chunks_are_never_handed_out(self):
        """Chunks done before the start (resumed) are never requested."""
        board = board_of(10, done={0, 1, 2, 3, 4, 5, 6, 7})
        assert {8, 9} == set(board.take(server(), 10))
        assert 2 == board.remaining()

    def test_closed_board_gives_no_work(self):
        """After close, nobody gets work and waiters wake."""
        board = board_of(4)
        board.close()
        assert [] == board.take(server(), 4)
        assert board.wait_until_finished(0.01)


OPS = st.lists(
    st.tuples(st.sampled_from(["take", "arrive", "release", "strike", "drop", "have", "lacks"]),
              st.integers(0, 3), st.integers(0, 29)),
    max_size=160,
)


class TestInvariants:
    @settings(max_examples=150, deadline=None)
    @given(ops=OPS, count=st.integers(1, 30), seed=st.integers(0, 1000))
    def test_random_sequences_keep_invariants(self, ops, count, seed):
        """Random take/arrived/release/strike/drop sequences keep the board's promises, then it finishes."""
        board = board_of(count, seed)
        rng = random.Random(seed)
        sources = [server(), peer("a"), peer("b", set(range(0, count, 2))), peer("c", set())]
        for source in sources[1:]:
            board.add_peer(source)
        pending: dict[int, list[int]] = {i: [] for i in range(len(sources))}
        for op, who, arg in ops:
            source = sources[who]
            if op == "take":
                check_take(board, sources, pending, who, arg)
            elif op == "arrive" and pending[who]:
                index = pending[who].pop(rng.randrange(len(pending[who])))
                assert (index not in board.done) == board.arrived(index, source, 1)
            elif op == "release" and pending[who]:
                board.release(pending[who][: arg + 1], source)
                del pending[who][: arg + 1]
            elif op == "strike":
                dropped = board.strike(source, "fuzz")
                assert (not source.is_server and source.strikes >= MAX_STRIKES) <= dropped
                assert not (source.is_server and dropped)
            elif op == "drop" and not source.is_server:
                board.drop(source, "fuzz")
            elif op == "have" and who >= 2 and not source.dropped:
                board.update_have(source, set(range(arg % count, count, 1 + arg % 3)))
            elif op == "lacks" and who >= 2 and not source.dropped:
                assert board.lacks(source, arg % count)
                assert not source.holds(arg % count)
            assert in_flight_of(board, sources, pending) == board._in_flight
        # Drain: every source delivers what it has in flight, the server fetches the rest.
        for who, indexes in pending.items():
            for index in indexes:
                board.arrived(index, sources[who], 1)
        main = sources[0]
        for _ in range(count + 1):
            for index in board.take(main, SERVER_DEPTH_WITH_PEERS):
                assert board.arrived(index, main, 1)
        assert board.finished
        assert count == sum(source.bytes for source in sources)  # each chunk counted once, to one source


def check_take(board: ChunkBoard, sources: list[Source], pending: dict[int, list[int]], who: int, limit: int) -> None:
    """One ``take``, checked against everything the board promises about it."""
    source = sources[who]
    remaining_before = board.remaining()
    open_before = {i for i in range(board.count)
                   if i not in board.done and not any(i in p for p in pending.values())}
    taken = board.take(source, limit)
    assert len(taken) <= limit
    assert len(set(taken)) == len(taken)
    assert not (source.dropped and taken), "a dropped source got work"
    for index in taken:
        assert index not in board.done, "handed out a done chunk"
        assert index not in pending[who], "handed a source a chunk it already has in flight"
        assert source.holds(index), "asked a peer for a chunk it does not hold"
        if any(index in p for w, p in pending.items() if w != who):
            assert remaining_before <= ENDGAME_CHUNKS, "duplicate request outside the endgame"
    if set(taken) <= open_before:
        check_preference(sources, source, set(taken), open_before)
    pending[who].extend(taken)
    if source.is_server and board._peers:
        assert len([i for i in pending[who] if i not in board.done]) <= SERVER_DEPTH_WITH_PEERS


def check_preference(sources: list[Source], source: Source, taken: set[int], open_before: set[int]) -> None:
    """Fresh picks follow the rules: a peer takes its rarest open chunks; the server what no peer holds first."""
    def availability(index: int) -> int:  # the reference: count the live peers, every time
        return sum(1 for peer in sources[1:] if not peer.dropped and peer.holds(index))

    left = {i for i in open_before - taken if source.holds(i)}
    if not source.is_server:
        assert max(map(availability, taken), default=0) <= min(map(availability, left), default=1 << 30)
    elif not any(peer.have is None and not peer.dropped for peer in sources[1:]):
        if any(availability(i) for i in taken):
            assert [] == [i for i in left if availability(i) == 0], "server took a held chunk before an unheld one"


def in_flight_of(board: ChunkBoard, sources: list[Source], pending: dict[int, list[int]]) -> dict[int, set[Source]]:
    """What the board's in-flight table must be: every undelivered request of a chunk not done yet."""
    expected: dict[int, set[Source]] = {}
    for who, indexes in pending.items():
        for index in indexes:
            if index not in board.done:
                expected.setdefault(index, set()).add(sources[who])
    return expected


class TestBigFiles:
    def test_four_million_chunk_bookkeeping_stays_small(self):
        """A 4 Mi-chunk manifest (4 TiB at 1 MiB chunks) costs its digests plus a few MiB of bookkeeping, not a Python
        object per chunk: the manifest checked against its root, the board, what is verified, 20,000 chunks moved."""
        import tracemalloc

        from integrity import Manifest, hash_list_root

        count, chunk_size = 4 << 20, 1 << 20
        size = count * chunk_size
        digests = bytes(32 * count)  # what the wire brings; the bound is about everything else
        header = {"size": size, "chunk_size": chunk_size, "sha256": "0" * 64, "chunks": count,
                  "root": hash_list_root(size, chunk_size, digests)}
        tracemalloc.start()
        try:
            manifest = Manifest.from_header(header, digests)
            board, verified, main = ChunkBoard(count, rng=random.Random(1)), ChunkSet(count), server()
            for _ in range(2500):
                for index in board.take(main, 8):
                    board.arrived(index, main, chunk_size)
                    verified.add(index)
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert (count, 20_000, True) == (manifest.chunk_count, len(verified), peak < 4 << 20)
