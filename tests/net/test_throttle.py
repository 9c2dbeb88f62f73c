"""The token bucket: its rate, its burst, its debt, changes while running, and the limits on real transfers."""
from __future__ import annotations

import threading
import time

import pytest
from conftest import LONG_TIMEOUT, SHORT_TIMEOUT, make_config, make_file, wait_until

from integrity import sha256_file
from minitorrent.client.engine import ClientEngine
from minitorrent.net.throttle import BURST_S, TokenBucket

MIB = 1024 * 1024
TOLERANCE = 0.10  # the promise: within 10 % over a few seconds


class FakeClock:
    """A clock that only moves when the bucket sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fake_bucket(rate_bps: int) -> tuple[TokenBucket, FakeClock]:
    clock = FakeClock()
    return TokenBucket(rate_bps, clock=clock, sleep=clock.sleep), clock


class TestFakeClock:
    def test_starts_empty_and_paces_to_the_rate(self):
        """1000 B/s: ten 500-byte pieces take 5 s (no free burst at the start)."""
        bucket, clock = fake_bucket(1000)
        started = clock.now
        for _ in range(10):
            bucket.consume(500)
        assert pytest.approx(5.0) == clock.now - started

    def test_unlimited_when_zero(self):
        """Rate 0: consume never sleeps, whatever the size."""
        bucket, clock = fake_bucket(0)
        for _ in range(100):
            bucket.consume(1 << 30)
        assert [] == clock.sleeps
        assert 0 == bucket.rate_bps

    def test_debt_for_a_request_larger_than_the_bucket(self):
        """A request far above the burst passes after a wait that keeps the average, and the debt is paid once."""
        bucket, clock = fake_bucket(1000)
        bucket.consume(5000)  # the bucket holds at most BURST_S * rate = 250 bytes
        assert [pytest.approx(5.0)] == clock.sleeps
        bucket.consume(1)
        assert pytest.approx(0.001) == clock.sleeps[-1]

    def test_idle_time_saves_at_most_the_burst(self):
        """After a long idle period only BURST_S seconds of tokens are saved up."""
        bucket, clock = fake_bucket(1000)
        clock.advance(100.0)
        bucket.consume(int(1000 * BURST_S))
        assert [] == clock.sleeps
        bucket.consume(1000)
        assert [pytest.approx(1.0)] == clock.sleeps

    def test_set_rate_takes_effect_for_the_next_consume(self):
        """Raising the rate shortens the next wait; setting 0 removes it."""
        bucket, clock = fake_bucket(1000)
        bucket.consume(1000)
        assert pytest.approx(1.0) == clock.sleeps[-1]
        bucket.set_rate(4000)
        bucket.consume(1000)
        assert pytest.approx(0.25) == clock.sleeps[-1]
        bucket.set_rate(0)
        bucket.consume(10 ** 9)
        assert 2 == len(clock.sleeps)
        assert 0 == bucket.rate_bps

    def test_lowering_the_rate_shrinks_saved_tokens(self):
        """Lowering the rate caps the saved tokens at the new, smaller burst."""
        bucket, clock = fake_bucket(100_000)
        clock.advance(10.0)  # 25,000 tokens saved
        bucket.set_rate(1000)  # burst now 250
        bucket.consume(1250)
        assert [pytest.approx(1.0)] == clock.sleeps

    def test_negative_rate_refused(self):
        """A negative limit is a programming error: ValueError."""
        with pytest.raises(ValueError):
            TokenBucket(-1)
        with pytest.raises(ValueError):
            TokenBucket(10).set_rate(-5)


def measure_rate(bucket: TokenBucket, piece: int, window_s: float, threads: int = 1) -> float:
    """Bytes per second that passed ``bucket`` in ``threads`` loops of ``piece``-byte consumes for ``window_s``."""
    moved = [0] * threads
    started = time.monotonic()
    deadline = started + window_s

    def loop(slot: int) -> None:
        while time.monotonic() < deadline:
            bucket.consume(piece)
            moved[slot] += piece

    workers = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(moved) / (time.monotonic() - started)


class TestRealTime:
    @pytest.mark.timeout(30)
    def test_holds_its_rate_within_ten_percent_over_three_seconds(self):
        """1 MiB pieces at a 2 MB/s limit for ~3 s: the measured rate is within 10 % of 2 MB/s."""
        rate = measure_rate(TokenBucket(2_000_000), MIB, 3.0)
        assert abs(rate - 2_000_000) <= TOLERANCE * 2_000_000, f"{rate:.0f} B/s"

    @pytest.mark.timeout(30)
    def test_shared_by_threads_holds_the_total_rate(self):
        """Three threads sharing one 4 MB/s bucket with 256 KiB pieces: together within 10 % of 4 MB/s."""
        rate = measure_rate(TokenBucket(4_000_000), 256 * 1024, 2.0, threads=3)
        assert abs(rate - 4_000_000) <= TOLERANCE * 4_000_000, f"{rate:.0f} B/s"


    @pytest.mark.timeout(30)
    def test_set_rate_from_another_thread_frees_a_running_consumer(self):
        """A thread moving 16 MiB at 500 kB/s (half a minute) finishes at once after set_rate(0) from another thread."""
        bucket = TokenBucket(500_000)
        moved = [0]

        def consume_all() -> None:
            for _ in range(256):
                bucket.consume(64 * 1024)
                moved[0] += 64 * 1024

        consumer = threading.Thread(target=consume_all)
        started = time.monotonic()
        consumer.start()
        wait_until(lambda: moved[0] >= 128 * 1024, what="the consumer to get going")
        bucket.set_rate(0)
        consumer.join(SHORT_TIMEOUT)
        assert 16 * MIB == moved[0]
        assert time.monotonic() - started < 3.0


class TestLimitsOnTransfers:
    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_server_upload_limit_paces_a_download(self, tmp_path, server_factory):
        """A main server limited to 4 MB/s sends a 12 MiB file at 4 MB/s, within 10 %."""
        source = make_file(tmp_path / "src" / "paced.bin", 12 * MIB, seed=3)
        server = server_factory({"transfer": {"upload_limit": 4_000_000, "chunk_size": 256 * 1024}})
        server.add_file(source)
        host, port = server.server.address
        engine = ClientEngine(make_config(tmp_path / "cli", {"server": {"main": {"host": host, "port": port}},
                                                              "client": {"seeding": False}}))
        try:
            result = engine.download("paced.bin", tmp_path / "out")
        finally:
            engine.close()
        assert sha256_file(source) == sha256_file(result.path)
        rate = result.size / result.seconds
        assert abs(rate - 4_000_000) <= TOLERANCE * 4_000_000, f"{rate:.0f} B/s"

    def test_set_limits_changes_the_running_engine_buckets(self, tmp_path):
        """ClientEngine.set_limits changes the seeder's upload and the downloads' limits at once."""
        engine = ClientEngine(make_config(tmp_path / "cli", {"server": {"main": {"port": 9}},  # never dialled
                                                             "client": {"seeding": True},
                                                             "transfer": {"upload_limit": 1000,
                                                                          "download_limit": 2000}}))
        try:
            assert (1000, 2000) == (engine.seeder.upload_limit.rate_bps, engine.download_limit.rate_bps)
            engine.set_limits(5_000_000, 0)
            assert (5_000_000, 0) == (engine.seeder.upload_limit.rate_bps, engine.download_limit.rate_bps)
        finally:
            engine.close()
