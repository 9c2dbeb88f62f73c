"""Tests for progress.py: human units, status lines, and the terminal progress display."""
from __future__ import annotations

import io
import math
import re
import types

import pytest

from minitorrent.client import progress as progress_module
from minitorrent.client.progress import (
    BAR_WIDTH,
    REDRAW_INTERVAL_S,
    Progress,
    TerminalProgress,
    format_line,
)
from minitorrent.common.units import human_duration, human_size, percent

GIB = 1024**3
REDRAW = "\r\x1b[K"  # carriage return, then erase to the end of the line
PERCENT = re.compile(r"(\d+\.\d)%")


def make_progress(done: int, total: int, name: str = "movie.mkv", fetched: int | None = None) -> Progress:
    """A Progress of ``done`` out of ``total`` bytes (everything fetched in this run unless told)."""
    return Progress(name, total, done, done if fetched is None else fetched, 0, 0)


class FakeClock:
    """Stands in for the ``time`` module inside progress.py; moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    """Replace the clock TerminalProgress reads with a FakeClock (only inside progress.py)."""
    fake = FakeClock()
    monkeypatch.setattr(progress_module, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    return fake


class TestHumanSize:
    @pytest.mark.parametrize("nbytes, expected", [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024**2, "1.0 MiB"),
        (5 * GIB, "5.0 GiB"),
        (1024**5, "1.0 PiB"),
        (1024**6, "1024.0 PiB"),  # the largest unit is kept rather than running out of units
        (512.7, "512 B"),  # a fractional speed below 1 KiB is shown whole
    ])
    def test_human_size(self, nbytes, expected):
        """Sizes use binary units with one decimal; bytes below 1 KiB are whole."""
        assert expected == human_size(nbytes)


class TestHumanDuration:
    @pytest.mark.parametrize("seconds, expected", [
        (None, "--:--"),
        (0, "0:00"),
        (9, "0:09"),
        (59.6, "1:00"),  # rounded to the nearest second
        (75, "1:15"),
        (3599, "59:59"),
        (3600, "1:00:00"),
        (3725, "1:02:05"),
        (math.inf, "--:--"),
        (math.nan, "--:--"),
    ])
    def test_human_duration(self, seconds, expected):
        """Durations are m:ss below an hour, h:mm:ss above; unknown ones are --:--."""
        assert expected == human_duration(seconds)


class TestPercent:
    @pytest.mark.parametrize("done, total, expected", [
        (0, 200, 0.0),
        (50, 200, 25.0),
        (200, 200, 100.0),
        (0, 0, 100.0),  # an empty file is complete
    ])
    def test_percent(self, done, total, expected):
        """Percent is done over total; an empty file is 100 % done."""
        assert expected == percent(done, total)


class TestFormatLine:
    def test_plain_line(self):
        """A plain line shows name, percent, sizes, speed and ETA, two spaces apart."""
        line = format_line(make_progress(1024, 2048, "a.txt"), 512, bar=False)
        assert "a.txt   50.0%  1.0 KiB/2.0 KiB  512 B/s  ETA 0:02" == line

    def test_line_with_bar(self):
        """With bar=True a bar of BAR_WIDTH cells, filled in proportion, follows the name."""
        line = format_line(make_progress(1024, 2048, "a.txt"), 512, bar=True)
        half = BAR_WIDTH // 2
        assert f"a.txt  [{'#' * half}{'-' * half}]   50.0%  1.0 KiB/2.0 KiB  512 B/s  ETA 0:02" == line

    def test_finished_bar_is_full(self):
        """At 100 % the bar is full and the ETA is zero even with no speed."""
        line = format_line(make_progress(10, 10, "a.txt"), 0.0, bar=True)
        assert f"a.txt  [{'#' * BAR_WIDTH}]  100.0%  10 B/10 B  0 B/s  ETA 0:00" == line

    def test_unknown_eta_without_speed(self):
        """With no speed yet and bytes remaining, the ETA is unknown."""
        line = format_line(make_progress(0, 5 * GIB, "big.iso"), 0.0, bar=False)
        assert "big.iso    0.0%  0 B/5.0 GiB  0 B/s  ETA --:--" == line

    def test_empty_file_line(self):
        """An empty file shows as complete."""
        line = format_line(make_progress(0, 0, "empty"), 0.0, bar=False)
        assert "empty  100.0%  0 B/0 B  0 B/s  ETA 0:00" == line

    def test_unusual_name(self):
        """Names with spaces, accents and emoji are shown as they are."""
        line = format_line(make_progress(0, 1, "café 🎉 | a:b.txt"), 0.0, bar=False)
        assert True is line.startswith("café 🎉 | a:b.txt  ")


class TestTerminalProgressPlain:
    def test_one_line_per_ten_percent(self):
        """Without a terminal, one plain line is printed per 10 % step, no carriage returns."""
        out = io.StringIO()
        show = TerminalProgress(out, interactive=False)
        for done in range(0, 1001):
            show(make_progress(done, 1000))
        text = out.getvalue()
        lines = text.splitlines()
        assert "\r" not in text
        assert True is text.endswith("\n")
        assert [f"{step * 10:.1f}" for step in range(11)] == [PERCENT.search(line).group(1) for line in lines]
        assert True is all(line.startswith("movie.mkv  ") for line in lines)

    def test_repeated_progress_prints_once(self):
        """The same step reported again prints nothing more."""
        out = io.StringIO()
        show = TerminalProgress(out, interactive=False)
        for _ in range(5):
            show(make_progress(150, 1000))
        assert 1 == len(out.getvalue().splitlines())

    def test_files_are_tracked_separately(self):
        """Two downloads reported in turn each get their own steps."""
        out = io.StringIO()
        show = TerminalProgress(out, interactive=False)
        for done in (0, 50, 100):
            show(make_progress(done, 100, "a.bin"))
            show(make_progress(done, 100, "b.bin"))
        names = [line.split("  ")[0] for line in out.getvalue().splitlines()]
        assert ["a.bin", "b.bin"] * 3 == names

    def test_not_a_terminal_by_default(self):
        """With interactive unset, an output that is not a tty gets plain lines."""
        out = io.StringIO()
        show = TerminalProgress(out)
        assert False is show.interactive
        show(make_progress(5, 10))
        assert "\r" not in out.getvalue()


class TestTerminalProgressInteractive:
    def test_redraws_and_ends_with_newline(self, clock):
        """On a terminal each drawing starts with a carriage return; 100 % ends the line."""
        out = io.StringIO()
        show = TerminalProgress(out, interactive=True)
        for done in (0, 250, 500, 750, 1000):
            show(make_progress(done, 1000))
            clock.now += REDRAW_INTERVAL_S
        text = out.getvalue()
        assert True is text.startswith(REDRAW)
        assert True is text.endswith("\n")
        assert 1 == text.count("\n")
        drawings = text.rstrip("\n").split(REDRAW)[1:]
        assert ["0.0", "25.0", "50.0", "75.0", "100.0"] == [PERCENT.search(d).group(1) for d in drawings]
        assert True is all("[" in drawing and "]" in drawing for drawing in drawings)

    def test_redraws_are_throttled_but_finish_is_not(self, clock):
        """Updates closer together than REDRAW_INTERVAL_S are skipped, except the final one."""
        out = io.StringIO()
        show = TerminalProgress(out, interactive=True)
        show(make_progress(0, 1000))
        clock.now += REDRAW_INTERVAL_S / 10
        show(make_progress(400, 1000))  # too soon: skipped
        clock.now += REDRAW_INTERVAL_S
        show(make_progress(600, 1000))
        clock.now += REDRAW_INTERVAL_S / 10
        show(make_progress(1000, 1000))  # too soon, but finished: drawn
        drawings = out.getvalue().rstrip("\n").split(REDRAW)[1:]
        assert ["0.0", "60.0", "100.0"] == [PERCENT.search(d).group(1) for d in drawings]
        assert True is out.getvalue().endswith("\n")

    def test_speed_from_bytes_fetched_this_run(self, clock):
        """Speed counts the bytes fetched since the first report, over the clock time elapsed."""
        out = io.StringIO()
        show = TerminalProgress(out, interactive=True)
        show(make_progress(4096, 8192, fetched=0))  # resumed: 4 KiB were already there
        clock.now += 2.0
        show(make_progress(6144, 8192, fetched=2048))
        last = out.getvalue().split(REDRAW)[-1]
        assert True is ("1.0 KiB/s" in last)
        assert True is ("ETA 0:02" in last)
