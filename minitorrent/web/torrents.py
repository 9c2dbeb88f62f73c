"""Hybrid .torrent files (BEP 3 v1 + BEP 52 v2) for shared files, with a web seed (BEP 19).

The hashes a torrent needs beyond the manifest (SHA-1 per piece for v1; for
v2, a SHA-256 merkle tree over 16 KiB blocks: the root of each piece, the
"piece layer", and the file's "pieces root") cost a read of the whole file.
They are computed once per content by ``hash_pieces`` in the indexer's
thread (see indexer.py) and stored in the catalog; building a .torrent on
request only bencodes what is stored.

The piece length is the file's chunk size when BEP 52 allows it (a power of
two, at least 16 KiB); otherwise the largest power of two below it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from database import TorrentPieces
from minitorrent.web.bencode import bencode

BLOCK_BYTES = 16 * 1024  # BEP 52's merkle leaves
ZERO_HASH = bytes(32)  # the leaf hash of a block past the end of the file


def piece_length_for(chunk_size: int) -> int:
    """The piece length of a file chunked by ``chunk_size``: that size if BEP 52 allows it, else a power of two below."""
    length = 1 << (chunk_size.bit_length() - 1)
    return max(BLOCK_BYTES, length)


def merkle_root(leaves: list[bytes], pad: bytes = ZERO_HASH) -> bytes:
    """The root of a binary SHA-256 tree over ``leaves``, padded with ``pad`` to a power of two."""
    layer = list(leaves) or [pad]
    while len(layer) & (len(layer) - 1):
        layer.append(pad)
    while len(layer) > 1:
        layer = [hashlib.sha256(layer[i] + layer[i + 1]).digest() for i in range(0, len(layer), 2)]
    return layer[0]


def _zero_piece_root(piece_length: int) -> bytes:
    """The root of a piece's subtree made only of padding leaves (pads the piece layer)."""
    return merkle_root([ZERO_HASH] * (piece_length // BLOCK_BYTES))


def hash_pieces(path: Path, size: int, piece_length: int) -> TorrentPieces:
    """Read the file once: v1 piece SHA-1s, v2 piece layer and pieces root. ``OSError`` if unreadable."""
    v1, layer, blocks_per_piece = bytearray(), [], piece_length // BLOCK_BYTES
    single_piece_leaves: list[bytes] = []
    with open(path, "rb") as file:
        for _ in range((size + piece_length - 1) // piece_length):
            piece = file.read(piece_length)
            v1 += hashlib.sha1(piece).digest()
            leaves = [hashlib.sha256(piece[i:i + BLOCK_BYTES]).digest() for i in range(0, len(piece), BLOCK_BYTES)]
            single_piece_leaves = leaves
            layer.append(merkle_root(leaves + [ZERO_HASH] * (blocks_per_piece - len(leaves))))
    if len(layer) <= 1:  # one piece: the tree spans only the file's blocks, and there is no piece layer
        return TorrentPieces(piece_length, merkle_root(single_piece_leaves) if size else b"", bytes(v1), b"")
    root = merkle_root(layer, pad=_zero_piece_root(piece_length))
    return TorrentPieces(piece_length, root, bytes(v1), b"".join(layer))


def info_dict(name: str, size: int, pieces: TorrentPieces) -> dict:
    """The hybrid info dictionary: v1 single-file keys beside the v2 file tree."""
    return {"name": name, "piece length": pieces.piece_length, "length": size, "pieces": pieces.v1_pieces,
            "meta version": 2, "file tree": {name: {"": {"length": size, "pieces root": pieces.pieces_root}}}}


@dataclass(frozen=True)
class InfoHashes:
    """A torrent's identities: SHA-1 (v1) and SHA-256 (v2) of its bencoded info dictionary."""

    v1: bytes
    v2: bytes

    @property
    def v2_short(self) -> bytes:
        """The v2 hash as trackers see it: its first 20 bytes (BEP 52)."""
        return self.v2[:20]


def info_hashes(name: str, size: int, pieces: TorrentPieces) -> InfoHashes:
    """The info hashes of the torrent of ``name``."""
    encoded = bencode(info_dict(name, size, pieces))
    return InfoHashes(hashlib.sha1(encoded).digest(), hashlib.sha256(encoded).digest())


def metainfo(name: str, size: int, pieces: TorrentPieces, web_seed: str, announce: str) -> bytes:
    """The bencoded .torrent: info, piece layers, the file's HTTP address as web seed, our tracker."""
    torrent = {"announce": announce, "info": info_dict(name, size, pieces), "url-list": [web_seed],
               "created by": "MiniTorrent"}
    if pieces.piece_layer:
        torrent["piece layers"] = {pieces.pieces_root: pieces.piece_layer}
    return bencode(torrent)
