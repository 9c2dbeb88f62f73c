"""Tests for error_handler.py: the exception hierarchy, full-jitter backoff and retry."""
from __future__ import annotations

import itertools
import random
import threading
import time

import pytest

import error_handler
from error_handler import (
    CatalogError,
    ConfigError,
    ConnectionFailed,
    DownloadError,
    IntegrityError,
    MiniTorrentError,
    RemoteError,
    RetryGaveUp,
    ServerBusy,
    backoff_delays,
    retry,
)

SHORT_TIMEOUT = 10.0  # seconds; an upper bound for something that should be immediate (slow CI)
TINY_DELAY_S = 0.001  # retry pauses in tests that do not measure time


class Flaky:
    """An operation that raises each of ``errors`` in turn, then returns ``result``."""

    def __init__(self, errors: list[BaseException], result: object = "done") -> None:
        self.errors = list(errors)
        self.result = result
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


class AlwaysFails:
    """An operation that always raises a new ``ConnectionFailed``, remembering the last one."""

    def __init__(self) -> None:
        self.calls = 0
        self.last: BaseException | None = None

    def __call__(self) -> None:
        self.calls += 1
        self.last = ConnectionFailed(f"attempt {self.calls} refused")
        raise self.last


def fixed_delays(*delays: float):
    """A stand-in for ``backoff_delays`` that yields ``delays`` and then repeats the last one."""
    def make(base_s: float = 0.1, cap_s: float = 5.0, rng: random.Random | None = None):
        return itertools.chain(delays, itertools.repeat(delays[-1]))

    return make


class TestExceptions:
    @pytest.mark.parametrize("error_type", [
        ConfigError, IntegrityError, CatalogError, ConnectionFailed,
        ServerBusy, RemoteError, DownloadError, RetryGaveUp,
    ])
    def test_all_are_minitorrent_errors(self, error_type):
        """Every expected failure is a MiniTorrentError."""
        assert True is issubclass(error_type, MiniTorrentError)

    def test_server_busy_is_connection_failed(self):
        """ServerBusy is a ConnectionFailed, so it is retried like one."""
        assert True is issubclass(ServerBusy, ConnectionFailed)

    def test_retry_gave_up_is_connection_failed(self):
        """RetryGaveUp is a ConnectionFailed, so callers catch both in one place."""
        assert True is issubclass(RetryGaveUp, ConnectionFailed)

    def test_remote_error_is_not_retryable(self):
        """RemoteError is not a ConnectionFailed: the server answered, retrying will not help."""
        assert False is issubclass(RemoteError, ConnectionFailed)

    def test_remote_error_keeps_code_and_message(self):
        """RemoteError keeps its code and message and shows both on one line."""
        error = RemoteError("NOT_FOUND", "no file named 'x.txt'")
        assert "NOT_FOUND" == error.code
        assert "no file named 'x.txt'" == error.message
        assert "no file named 'x.txt' (NOT_FOUND)" == str(error)


class TestBackoffDelays:
    def test_delays_within_full_jitter_bounds(self):
        """Delay n lies in [0, min(cap, base * 2**n)]."""
        base_s, cap_s = 0.1, 5.0
        delays = list(itertools.islice(backoff_delays(base_s, cap_s, random.Random(1234)), 40))
        outside = [(n, delay) for n, delay in enumerate(delays)
                   if not 0 <= delay <= min(cap_s, base_s * 2**n)]
        assert [] == outside

    def test_delays_reach_the_cap_but_not_beyond(self):
        """Late delays use the whole [0, cap] range and never exceed it."""
        delays = list(itertools.islice(backoff_delays(0.1, 1.0, random.Random(7)), 500))[10:]
        assert True is (max(delays) <= 1.0)
        assert True is (max(delays) > 0.5)  # 490 uniform draws in [0, 1] all below 0.5: p = 2**-490

    def test_same_seed_same_delays(self):
        """A seeded generator makes the delays reproducible."""
        first = list(itertools.islice(backoff_delays(rng=random.Random(99)), 10))
        second = list(itertools.islice(backoff_delays(rng=random.Random(99)), 10))
        assert first == second

    def test_is_endless(self):
        """The generator never runs out."""
        assert 1000 == len(list(itertools.islice(backoff_delays(rng=random.Random(0)), 1000)))


class TestRetry:
    def test_returns_after_transient_failures(self):
        """Retryable failures are retried until the operation succeeds; its result comes back."""
        operation = Flaky([ConnectionFailed("refused"), ServerBusy("busy"), OSError("reset")])
        result = retry(operation, deadline_s=SHORT_TIMEOUT, base_delay_s=TINY_DELAY_S, max_delay_s=TINY_DELAY_S)
        assert "done" == result
        assert 4 == operation.calls

    def test_success_first_time(self):
        """An operation that succeeds is called once."""
        operation = Flaky([], result=42)
        assert 42 == retry(operation, deadline_s=SHORT_TIMEOUT)
        assert 1 == operation.calls

    def test_gives_up_at_deadline(self):
        """Failures past deadline_s raise RetryGaveUp from the last failure, soon after the deadline."""
        deadline_s = 0.2
        operation = AlwaysFails()
        started = time.monotonic()
        with pytest.raises(RetryGaveUp) as raised:
            retry(operation, deadline_s=deadline_s, base_delay_s=0.01, max_delay_s=0.02)
        elapsed = time.monotonic() - started
        assert True is (deadline_s <= elapsed < deadline_s + SHORT_TIMEOUT / 2)
        assert operation.last is raised.value.__cause__
        assert True is (operation.calls >= 2)
        assert str(raised.value).startswith("gave up after 0.2 s: attempt ")

    def test_last_wait_is_cut_to_the_deadline(self):
        """A backoff delay longer than the time left is shortened so retry stops at the deadline."""
        deadline_s = 0.1
        delays: list[float] = []
        started = time.monotonic()
        with pytest.raises(RetryGaveUp):
            retry(AlwaysFails(), deadline_s=deadline_s, base_delay_s=60.0, max_delay_s=60.0,
                  on_retry=lambda error, delay: delays.append(delay))
        assert True is (time.monotonic() - started < SHORT_TIMEOUT / 2)
        assert [] == [delay for delay in delays if delay > deadline_s]

    @pytest.mark.parametrize("error", [
        ValueError("a bug"),
        RemoteError("NOT_FOUND", "no such file"),
        IntegrityError("hash mismatch"),
    ])
    def test_non_retryable_propagates_at_once(self, error):
        """An exception outside retry_on propagates unchanged after one call."""
        operation = Flaky([error])
        with pytest.raises(type(error)) as raised:
            retry(operation, deadline_s=SHORT_TIMEOUT, base_delay_s=TINY_DELAY_S)
        assert error is raised.value
        assert 1 == operation.calls

    def test_retry_on_narrows_what_is_retried(self):
        """With retry_on=(ServerBusy,), a plain ConnectionFailed propagates at once."""
        operation = Flaky([ServerBusy("busy"), ConnectionFailed("refused")])
        with pytest.raises(ConnectionFailed) as raised:
            retry(operation, deadline_s=SHORT_TIMEOUT, retry_on=(ServerBusy,), base_delay_s=TINY_DELAY_S)
        assert "refused" == str(raised.value)
        assert 2 == operation.calls

    def test_on_retry_gets_each_error_and_delay(self, monkeypatch):
        """on_retry is told each failure and the delay about to be waited, in order."""
        monkeypatch.setattr(error_handler, "backoff_delays", fixed_delays(0.001, 0.002, 0.003))
        errors = [ConnectionFailed("one"), ServerBusy("two"), OSError("three")]
        seen: list[tuple[BaseException, float]] = []
        result = retry(Flaky(errors), deadline_s=SHORT_TIMEOUT,
                       on_retry=lambda error, delay: seen.append((error, delay)))
        assert "done" == result
        assert list(zip(errors, [0.001, 0.002, 0.003])) == seen

    def test_on_retry_delays_follow_backoff(self):
        """The real delays told to on_retry stay within the full-jitter bounds."""
        base_s, cap_s = 0.001, 0.004
        delays: list[float] = []
        retry(Flaky([ConnectionFailed("x")] * 6), deadline_s=SHORT_TIMEOUT, base_delay_s=base_s,
              max_delay_s=cap_s, on_retry=lambda error, delay: delays.append(delay))
        assert 6 == len(delays)
        assert [] == [(n, d) for n, d in enumerate(delays) if not 0 <= d <= min(cap_s, base_s * 2**n)]

    def test_stop_already_set_gives_up_without_waiting(self):
        """With stop already set, one failure raises RetryGaveUp at once."""
        stop = threading.Event()
        stop.set()
        operation = AlwaysFails()
        started = time.monotonic()
        with pytest.raises(RetryGaveUp) as raised:
            retry(operation, deadline_s=60.0, base_delay_s=30.0, max_delay_s=30.0, stop=stop)
        assert True is (time.monotonic() - started < SHORT_TIMEOUT / 2)
        assert 1 == operation.calls
        assert operation.last is raised.value.__cause__

    def test_stop_cuts_a_wait_short(self, monkeypatch):
        """Setting stop from another thread during a long wait makes retry give up promptly."""
        monkeypatch.setattr(error_handler, "backoff_delays", fixed_delays(60.0))
        stop = threading.Event()
        waiting = threading.Event()
        stopper = threading.Thread(target=lambda: waiting.wait(SHORT_TIMEOUT) and stop.set())
        stopper.start()
        operation = AlwaysFails()
        started = time.monotonic()
        with pytest.raises(RetryGaveUp) as raised:
            retry(operation, deadline_s=120.0, stop=stop, on_retry=lambda error, delay: waiting.set())
        elapsed = time.monotonic() - started
        stopper.join(SHORT_TIMEOUT)
        assert True is (elapsed < SHORT_TIMEOUT / 2)
        assert 1 == operation.calls
        assert operation.last is raised.value.__cause__
        assert str(raised.value).startswith("stopped while retrying: ")
