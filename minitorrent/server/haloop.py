"""One decision loop per server: gather the view, ``ha.decide``, apply the action.

The loop is the only code that changes a server's role on purpose (the
fencing rule in ``NodeState`` aside). Threads that talk to the network
record what they heard and ``wake`` the loop; a request that needs the
loop's answer (an operator's promotion, the main asking for the role back)
is a ``Pending`` the asking thread waits on.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from minitorrent.server.ha import Action, Decision, Observation, decide

log = logging.getLogger(__name__)

TICK_S = 0.1  # the longest a server waits between two looks at its situation


class Pending:
    """A request answered once by the decision loop; the asking thread ``wait``s for the answer."""

    def __init__(self) -> None:
        self._answered = threading.Event()
        self._answer: Any = None

    def answer(self, value: Any) -> None:
        """Give the answer (loop thread); later answers are ignored."""
        if not self._answered.is_set():
            self._answer = value
            self._answered.set()

    def wait(self, timeout_s: float) -> Any:
        """The answer; ``TimeoutError`` if the loop gave none within ``timeout_s``."""
        if not self._answered.wait(timeout_s):
            raise TimeoutError("the server's decision loop did not answer in time")
        return self._answer


class DecisionLoop:
    """Calls ``observe`` -> ``decide`` -> ``apply`` every ``TICK_S`` and whenever woken.

    ``last`` is the latest decision other than a plain STAY with the same
    reason, and when it was taken, for status replies.
    """

    def __init__(self, name: str, observe: Callable[[], Observation], apply: Callable[[Decision], None],
                 stop: threading.Event) -> None:
        self.name = name
        self._observe = observe
        self._apply = apply
        self._stop = stop
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._last: tuple[Decision, float] | None = None
        self.thread = threading.Thread(target=self._run, name=f"{name}-ha", daemon=True)

    def start(self) -> None:
        """Take one decision now (in the caller's thread), then keep deciding in the background."""
        self.step()
        self.thread.start()

    def wake(self, *_: Any) -> None:
        """Decide again now instead of at the next tick (any thread; usable as a listener)."""
        self._wake.set()

    def last(self) -> dict:
        """The latest decision: action, reason, age in seconds (any thread)."""
        with self._lock:
            if self._last is None:
                return {}
            decision, at = self._last
        return {"action": decision.action.value, "reason": decision.reason, "age_s": round(time.monotonic() - at, 3)}

    def step(self) -> Decision:
        """Gather, decide, apply once; returns the decision."""
        decision = decide(self._observe())
        with self._lock:
            changed = self._last is None or (decision.action, decision.reason) != (
                self._last[0].action, self._last[0].reason)
            if changed:
                self._last = (decision, time.monotonic())
        if changed and decision.action is Action.STAY:
            log.debug("%s: %s", self.name, decision.reason)
        self._apply(decision)
        return decision

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(TICK_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.step()
            except Exception:  # a local fault (disk, database) must not end the loop: decide again next tick
                log.exception("%s: decision round failed", self.name)
                self._stop.wait(TICK_S)
