"""Human units for sizes, durations and percentages.

Plain functions with no terminal or window, so the command line, the windows
and the tests all format the same way.
"""
from __future__ import annotations

import math

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(nbytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; bytes below 1 KiB are shown whole."""
    value = float(nbytes)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float | None) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``; ``None`` (unknown) -> ``"--:--"``."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "--:--"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def percent(done: int, total: int) -> float:
    """Completion in percent, rounded down to 0.1 so that 100.0 means really done; empty is 100."""
    return 100.0 if total <= 0 else math.floor(1000.0 * done / total) / 10
