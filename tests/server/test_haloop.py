"""The decision loop's plumbing: requests answered once, one decision per step, woken at once."""
from __future__ import annotations

import threading

import pytest
from conftest import SHORT_TIMEOUT, wait_until

from minitorrent.server.ha import Action, Kind, Observation
from minitorrent.server.haloop import DecisionLoop, Pending
from minitorrent.server.roles import Role


class TestPending:
    def test_first_answer_wins(self):
        """A request is answered once: a later answer does not replace the first."""
        request = Pending()
        request.answer("refused")
        request.answer("")
        assert "refused" == request.wait(0)

    def test_no_answer_in_time_raises(self):
        """Waiting past the timeout for a loop that never answers raises TimeoutError."""
        with pytest.raises(TimeoutError):
            Pending().wait(0.01)


class TestDecisionLoop:
    def test_step_applies_the_decision_for_what_was_observed(self):
        """One step: the observation goes through decide and its decision to apply; last() reports it."""
        applied = []
        alone = Observation(Kind.MAIN, Role.STANDBY, 0, has_peer=False)
        loop = DecisionLoop("test", lambda: alone, applied.append, threading.Event())
        loop.step()
        assert ([Action.PROMOTE], "promote") == ([d.action for d in applied], loop.last()["action"])

    def test_loop_decides_on_what_its_last_action_changed(self):
        """Started, the loop decides in the caller's thread, then again in its own on the new situation."""
        stop = threading.Event()
        seen = {"role": Role.STANDBY}
        applied = []

        def apply(decision):
            applied.append(decision.action)
            if decision.action in (Action.PROMOTE, Action.RESUME):
                seen["role"] = Role.ACTIVE

        loop = DecisionLoop("test", lambda: Observation(Kind.MAIN, seen["role"], 1, has_peer=False), apply, stop)
        loop.start()
        try:
            wait_until(lambda: len(applied) >= 2, SHORT_TIMEOUT, "a second decision")
            assert [Action.RESUME, Action.STAY] == applied[:2]
        finally:
            stop.set()
            loop.thread.join(SHORT_TIMEOUT)

    def test_a_failing_round_does_not_end_the_loop(self):
        """An exception while observing is logged; the loop keeps deciding."""
        stop = threading.Event()
        calls = []

        def observe():
            calls.append(1)
            if len(calls) == 2:
                raise OSError("disk I/O error")
            return Observation(Kind.MAIN, Role.ACTIVE, 1, has_peer=False)

        loop = DecisionLoop("test", observe, lambda decision: None, stop)
        loop.start()
        try:
            wait_until(lambda: len(calls) >= 4, SHORT_TIMEOUT, "decisions after the failing one")
        finally:
            stop.set()
            loop.thread.join(SHORT_TIMEOUT)
        assert False is loop.thread.is_alive()
