"""Tests for metrics.py: counters, snapshots and sliding-window rates, with an injected clock."""
from __future__ import annotations

import json
import math
import threading

import pytest

from metrics import RATE_WINDOW_S, Metrics, RateMeter

LONG_TIMEOUT = 30.0  # seconds; thread joins that should take milliseconds
SNAPSHOT_KEYS = {
    "uptime_s", "bytes_sent", "bytes_received", "active_connections", "connections_total",
    "requests_total", "requests_failed", "success_rate", "average_upload_bps",
    "average_download_bps", "upload_bps", "download_bps", "downloads_per_file",
}


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def metrics(clock):
    return Metrics(clock=clock)


class TestRateMeter:
    def test_empty_rate_is_zero(self, clock):
        """A meter with no samples reports 0 bytes per second."""
        assert 0.0 == RateMeter(window_s=5.0, clock=clock).rate()

    def test_rate_is_bytes_in_window_over_window(self, clock):
        """The rate is the bytes recorded within the window divided by its length."""
        meter = RateMeter(window_s=5.0, clock=clock)
        clock.advance(5.0)  # started a whole window ago
        meter.add(100)
        clock.advance(1.0)
        meter.add(200)
        assert 60.0 == meter.rate()

    def test_samples_expire_after_window(self, clock):
        """A sample counts until it is older than the window, then drops out."""
        meter = RateMeter(window_s=5.0, clock=clock)
        meter.add(100)  # t = 0, the start
        clock.advance(1.0)
        meter.add(200)  # t = 1
        clock.advance(4.0)  # t = 5: the first sample is exactly window_s old
        assert 60.0 == meter.rate()
        clock.advance(0.5)  # t = 5.5: the first sample has expired
        assert 40.0 == meter.rate()
        clock.advance(1.0)  # t = 6.5: both have expired
        assert 0.0 == meter.rate()

    def test_adding_expires_old_samples(self, clock):
        """Adding a sample also drops the ones that left the window."""
        meter = RateMeter(window_s=2.0, clock=clock)
        meter.add(1000)
        clock.advance(10.0)
        meter.add(10)
        assert 5.0 == meter.rate()

    def test_default_window(self, clock):
        """The default window is RATE_WINDOW_S."""
        meter = RateMeter(clock=clock)
        clock.advance(RATE_WINDOW_S)
        meter.add(int(RATE_WINDOW_S * 100))
        assert 100.0 == meter.rate()


    def test_young_meter_divides_by_its_age(self, clock):
        """Within its first window a meter divides by the time since its start: a new transfer reads its true speed."""
        meter = RateMeter(window_s=5.0, clock=clock)
        clock.advance(1.0)
        meter.add(300)
        assert 300.0 == meter.rate()

    def test_running_totals(self):
        """Running totals (a transfer's bytes so far) give the bytes received over the last window, per second."""
        meter = RateMeter(window_s=2.0)
        meter.reset(0.0)
        for second in range(1, 6):
            meter.add_total(second * 1000, at=second - 0.5)
        assert 1000.0 == meter.rate(5.0)

    def test_speed_decays_when_nothing_arrives(self):
        """A stalled transfer slows down as its samples leave the window and reads 0 after a whole window."""
        meter = RateMeter(window_s=2.0)
        meter.reset(0.0)
        meter.add_total(1000, at=1.0)
        meter.add_total(2000, at=2.0)
        assert (1000.0, 500.0, 0.0) == (meter.rate(2.0), meter.rate(3.5), meter.rate(4.5))


class TestMetricsCounters:
    def test_snapshot_keys(self, metrics):
        """A snapshot holds every documented counter."""
        assert SNAPSHOT_KEYS == set(metrics.snapshot())

    def test_fresh_snapshot(self, metrics):
        """A fresh Metrics counts nothing and has a success rate of 1.0."""
        snapshot = metrics.snapshot()
        assert 0 == snapshot["bytes_sent"]
        assert 0 == snapshot["bytes_received"]
        assert 0 == snapshot["active_connections"]
        assert 0 == snapshot["requests_total"]
        assert 1.0 == snapshot["success_rate"]
        assert {} == snapshot["downloads_per_file"]

    def test_bytes_counters(self, metrics):
        """add_sent and add_received add up."""
        metrics.add_sent(100)
        metrics.add_sent(23)
        metrics.add_received(7)
        snapshot = metrics.snapshot()
        assert (123, 7) == (snapshot["bytes_sent"], snapshot["bytes_received"])

    def test_connections(self, metrics):
        """Opened minus closed connections are active; every opened one counts in the total."""
        metrics.connection_opened()
        metrics.connection_opened()
        metrics.connection_opened()
        metrics.connection_closed()
        snapshot = metrics.snapshot()
        assert 2 == metrics.active_connections
        assert (2, 3) == (snapshot["active_connections"], snapshot["connections_total"])

    def test_success_rate(self, metrics):
        """The success rate is successful requests over all requests."""
        for ok in (True, True, True, False):
            metrics.request_done(ok)
        snapshot = metrics.snapshot()
        assert (4, 1, 0.75) == (snapshot["requests_total"], snapshot["requests_failed"], snapshot["success_rate"])

    def test_success_rate_all_failed(self, metrics):
        """With only failed requests the success rate is 0.0."""
        metrics.request_done(False)
        assert 0.0 == metrics.snapshot()["success_rate"]

    def test_downloads_per_file(self, metrics):
        """set_downloads loads the counts; download_finished adds to them; keys come sorted."""
        metrics.set_downloads({"b.txt": 2, "a.txt": 1})
        metrics.download_finished("c.txt")
        metrics.download_finished("a.txt")
        per_file = metrics.snapshot()["downloads_per_file"]
        assert {"a.txt": 2, "b.txt": 2, "c.txt": 1} == per_file
        assert ["a.txt", "b.txt", "c.txt"] == list(per_file)

    def test_a_batch_of_downloads_counts_each_name(self, metrics):
        """downloads_finished counts each name of a batch, a name twice in it twice, as download_finished would."""
        metrics.set_downloads({"a.txt": 1})
        metrics.downloads_finished(["a.txt", "dir/b.txt", "dir/b.txt"])
        assert {"a.txt": 2, "dir/b.txt": 2} == metrics.snapshot()["downloads_per_file"]

    def test_set_downloads_replaces(self, metrics):
        """set_downloads replaces earlier counts instead of adding to them."""
        metrics.download_finished("old.txt")
        metrics.set_downloads({"new.txt": 5})
        assert {"new.txt": 5} == metrics.snapshot()["downloads_per_file"]

    def test_snapshot_is_json_serialisable(self, metrics):
        """A snapshot survives a JSON round trip unchanged."""
        metrics.add_sent(10)
        metrics.request_done(True)
        metrics.set_downloads({"café 🎉.txt": 3})
        snapshot = metrics.snapshot()
        assert snapshot == json.loads(json.dumps(snapshot))

    def test_concurrent_add_sent_is_exact(self):
        """8 threads each adding 10,000 times lose no update."""
        metrics = Metrics()
        start = threading.Barrier(8)

        def work() -> None:
            start.wait()
            for _ in range(10_000):
                metrics.add_sent(1)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LONG_TIMEOUT)
        assert [] == [thread for thread in threads if thread.is_alive()]
        assert 80_000 == metrics.snapshot()["bytes_sent"]


class TestMetricsSpeeds:
    def test_uptime(self, metrics, clock):
        """uptime_s is the clock time since the Metrics was made."""
        clock.advance(12.5)
        assert 12.5 == metrics.snapshot()["uptime_s"]

    def test_average_speeds(self, metrics, clock):
        """Average speeds are the bytes moved over the uptime."""
        metrics.add_sent(1000)
        metrics.add_received(500)
        clock.advance(10.0)
        snapshot = metrics.snapshot()
        assert (100.0, 50.0) == (snapshot["average_upload_bps"], snapshot["average_download_bps"])

    def test_recent_speeds(self, metrics, clock):
        """Recent speeds count only the last RATE_WINDOW_S seconds."""
        metrics.add_sent(1000)
        clock.advance(RATE_WINDOW_S + 1)
        metrics.add_sent(500)
        metrics.add_received(250)
        snapshot = metrics.snapshot()
        assert 500 / RATE_WINDOW_S == snapshot["upload_bps"]
        assert 250 / RATE_WINDOW_S == snapshot["download_bps"]
        clock.advance(RATE_WINDOW_S + 1)
        snapshot = metrics.snapshot()
        assert (0.0, 0.0) == (snapshot["upload_bps"], snapshot["download_bps"])
        assert 1500 == snapshot["bytes_sent"]

    def test_zero_uptime_does_not_divide_by_zero(self, metrics):
        """A snapshot taken at the start instant still gives finite averages."""
        metrics.add_sent(1)
        snapshot = metrics.snapshot()
        assert 0.0 == snapshot["uptime_s"]
        assert True is math.isfinite(snapshot["average_upload_bps"])
