"""Bencoding (BEP 3), the encoding of .torrent files and tracker replies: encoder only.

Integers, byte strings (``str`` is encoded as UTF-8), lists and dicts whose
keys are byte or text strings; dict keys are written sorted by their raw
bytes, as BEP 3 requires, so one value always has one encoding (an info
hash depends on it).
"""
from __future__ import annotations

from typing import Union

Bencodable = Union[int, bytes, str, list, dict]


def bencode(value: Bencodable) -> bytes:
    """The bencoding of ``value``; ``TypeError`` for anything else (a float, None, a bool)."""
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def _encode(value: Bencodable, out: list[bytes]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, bytes, str, list, dict)):
        raise TypeError(f"cannot bencode {type(value).__name__}")
    if isinstance(value, int):
        out.append(b"i%de" % value)
    elif isinstance(value, (bytes, str)):
        raw = value.encode() if isinstance(value, str) else value
        out.append(b"%d:%s" % (len(raw), raw))
    elif isinstance(value, list):
        out.append(b"l")
        for item in value:
            _encode(item, out)
        out.append(b"e")
    else:
        out.append(b"d")
        for key, item in sorted(((k.encode() if isinstance(k, str) else k), v) for k, v in value.items()):
            _encode(key, out)
            _encode(item, out)
        out.append(b"e")
