"""Range and If-Range decisions as a table, without sockets."""
from __future__ import annotations

import pytest

from minitorrent.web.ranges import ByteRange, Unsatisfiable, parse_range, range_applies


class TestParseRange:
    @pytest.mark.parametrize("header, size, expected", [
        (None, 100, None),
        ("bytes=0-9", 100, ByteRange(0, 9)),
        ("bytes=90-", 100, ByteRange(90, 99)),
        ("bytes=-5", 100, ByteRange(95, 99)),
        ("bytes=-500", 100, ByteRange(0, 99)),
        ("bytes=99-99", 100, ByteRange(99, 99)),
        ("bytes=50-5000", 100, ByteRange(50, 99)),
        ("bytes=9-3", 100, None),  # invalid: ignored
        ("bytes=0-1,5-6", 100, None),  # several ranges: the whole file
        ("items=0-1", 100, None),
        ("bytes=-", 100, None),
    ])
    def test_header_gives_range(self, header, size, expected):
        """Each Range header gives the bytes it names, or None for the whole file."""
        assert expected == parse_range(header, size)

    @pytest.mark.parametrize("header, size", [("bytes=100-", 100), ("bytes=200-300", 100), ("bytes=-0", 100),
                                              ("bytes=0-", 0), ("bytes=-1", 0)])
    def test_range_outside_the_file_is_unsatisfiable(self, header, size):
        """A range with no byte inside the file raises Unsatisfiable."""
        with pytest.raises(Unsatisfiable):
            parse_range(header, size)


    def test_a_number_of_thousands_of_digits_is_ignored(self):
        """A 5000-digit start (past int()'s 4300-digit limit) is a header to ignore: the whole file."""
        assert None is parse_range("bytes=" + "9" * 5000 + "-", 1000)


class TestRangeApplies:
    @pytest.mark.parametrize("if_range, expected", [
        (None, True), ('"abc"', True), ('"old"', False), ('W/"abc"', False),
        ("Mon, 30 Nov 2026 10:00:00 GMT", True), ("Sun, 29 Nov 2026 10:00:00 GMT", False),
    ])
    def test_if_range(self, if_range, expected):
        """A range applies only when If-Range is absent or names our strong ETag or Last-Modified."""
        assert expected == range_applies(if_range, '"abc"', "Mon, 30 Nov 2026 10:00:00 GMT")
