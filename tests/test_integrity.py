"""Tests for integrity.py: chunk maths, streaming SHA-256, manifests."""
from __future__ import annotations

import hashlib
import io
import os
import tracemalloc
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import integrity
from error_handler import IntegrityError
from integrity import (
    DIGEST_BYTES,
    Manifest,
    bad_chunks,
    build_manifest,
    chunk_count,
    chunk_span,
    hash_list_root,
    manifest_of_file,
    sha256_file,
    sha256_hex,
)

MiB = 1024 * 1024
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def reference_digests(data: bytes, chunk_size: int) -> bytes:
    """Per-chunk digests computed the obvious way, to compare against."""
    return b"".join(
        hashlib.sha256(data[offset : offset + chunk_size]).digest()
        for offset in range(0, len(data), chunk_size)
    )


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def sample() -> bytes:
    return os.urandom(10_000)


class TestChunkMaths:
    def test_empty_file_has_no_chunks(self):
        """An empty file has zero chunks."""
        assert 0 == chunk_count(0, 1024)

    def test_exactly_one_chunk(self):
        """A file of exactly chunk_size bytes is one chunk."""
        assert 1 == chunk_count(1024, 1024)

    def test_one_chunk_plus_one_byte(self):
        """One byte over a chunk starts a second, one-byte chunk."""
        assert 2 == chunk_count(1025, 1024)
        assert (1024, 1) == chunk_span(1, 1025, 1024)

    def test_spans_tile_the_file(self):
        """Spans are contiguous and only the last one is short."""
        spans = [chunk_span(i, 2500, 1000) for i in range(3)]
        assert [(0, 1000), (1000, 1000), (2000, 500)] == spans

    @pytest.mark.parametrize("index", [-1, 3, 100])
    def test_span_out_of_range_is_value_error(self, index):
        """An index outside [0, count) raises ValueError, not IndexError."""
        with pytest.raises(ValueError, match="out of range"):
            chunk_span(index, 2500, 1000)

    def test_bad_arguments_rejected(self):
        """A negative size or a non-positive chunk size raises ValueError."""
        with pytest.raises(ValueError):
            chunk_count(-1, 10)
        with pytest.raises(ValueError):
            chunk_count(10, 0)


class TestSha256:
    def test_hex_of_bytes(self):
        """sha256_hex matches hashlib for bytes and memoryviews."""
        assert hashlib.sha256(b"abc").hexdigest() == sha256_hex(memoryview(b"abc"))

    def test_file_matches_hashlib(self, tmp_path):
        """sha256_file of a multi-block file equals hashlib on its bytes."""
        data = os.urandom(3 * MiB + 17)
        path = write_file(tmp_path / "f.bin", data)
        assert hashlib.sha256(data).hexdigest() == sha256_file(path)

    def test_file_reports_progress(self, tmp_path):
        """on_progress is told every byte, in blocks of at most 1 MiB."""
        path = write_file(tmp_path / "f.bin", os.urandom(2 * MiB + 5))
        seen: list[int] = []
        sha256_file(path, on_progress=seen.append)
        assert 2 * MiB + 5 == sum(seen)
        assert max(seen) <= MiB

    def test_empty_file(self, tmp_path):
        """The empty file hashes to the SHA-256 of b''."""
        assert EMPTY_SHA256 == sha256_file(write_file(tmp_path / "e", b""))


class TestBuildManifest:
    def test_empty_file(self, tmp_path):
        """An empty file: size 0, no chunks, no digests, sha of b''."""
        manifest = manifest_of_file(write_file(tmp_path / "e", b""), 1024)
        assert Manifest(0, 1024, EMPTY_SHA256, b"") == manifest
        assert 0 == manifest.chunk_count

    def test_exactly_one_chunk(self):
        """A file of exactly chunk_size bytes has one digest of all of it."""
        data = os.urandom(4096)
        manifest = build_manifest(io.BytesIO(data), 4096)
        assert hashlib.sha256(data).digest() == manifest.chunk_digests

    def test_one_chunk_plus_one_byte(self):
        """The extra byte becomes a one-byte second chunk."""
        data = os.urandom(4097)
        manifest = build_manifest(io.BytesIO(data), 4096)
        assert 2 == manifest.chunk_count
        assert hashlib.sha256(data[-1:]).digest() == manifest.chunk_digest(1)

    def test_matches_hashlib_across_blocks(self, tmp_path):
        """Whole and per-chunk digests match hashlib when chunks straddle blocks."""
        data = os.urandom(3 * MiB + 12345)
        chunk_size = 700_001  # deliberately not a divisor of the read block
        manifest = manifest_of_file(write_file(tmp_path / "f", data), chunk_size)
        assert hashlib.sha256(data).hexdigest() == manifest.sha256
        assert reference_digests(data, chunk_size) == manifest.chunk_digests
        assert len(data) == manifest.size

    def test_chunks_larger_than_a_block(self):
        """A chunk size above the read block still gives per-chunk digests."""
        data = os.urandom(5 * MiB + 3)
        manifest = build_manifest(io.BytesIO(data), 2 * MiB)
        assert reference_digests(data, 2 * MiB) == manifest.chunk_digests

    def test_copy_to_produces_identical_copy(self, tmp_path):
        """With copy_to every byte is copied while hashing, in one read."""
        data = os.urandom(2 * MiB + 999)
        source = write_file(tmp_path / "src", data)
        with open(tmp_path / "copy", "wb") as target:
            manifest = manifest_of_file(source, 65536, copy_to=target)
        assert data == (tmp_path / "copy").read_bytes()
        assert manifest_of_file(tmp_path / "copy", 65536) == manifest

    def test_copy_to_unbuffered_target(self, tmp_path):
        """A raw (unbuffered) copy target gets every byte too."""
        data = os.urandom(MiB + 1)
        with open(tmp_path / "copy", "wb", buffering=0) as target:
            build_manifest(io.BytesIO(data), 4096, copy_to=target)
        assert data == (tmp_path / "copy").read_bytes()

    def test_progress_adds_up_to_size(self):
        """on_progress is told every byte processed."""
        seen: list[int] = []
        build_manifest(io.BytesIO(os.urandom(MiB + 10)), 1000, on_progress=seen.append)
        assert MiB + 10 == sum(seen)

    def test_bad_chunk_size_rejected(self):
        """A chunk size of zero raises ValueError before reading."""
        with pytest.raises(ValueError):
            build_manifest(io.BytesIO(b"x"), 0)

    @settings(max_examples=150, deadline=None)
    @given(
        data=st.binary(max_size=5000),
        chunk_size=st.integers(min_value=1, max_value=1500),
        block=st.integers(min_value=1, max_value=2048),
    )
    def test_property_chunks_rejoin_and_verify(self, data, chunk_size, block):
        """For any bytes, chunk size and read block, chunks verify and rejoin."""
        with mock.patch.object(integrity, "READ_BLOCK_BYTES", block), \
                mock.patch.object(integrity, "PARALLEL_MIN_BYTES", 1):
            manifest = build_manifest(io.BytesIO(data), chunk_size)
        pieces = []
        for index in range(manifest.chunk_count):
            offset, length = manifest.chunk_span(index)
            piece = data[offset : offset + length]
            assert manifest.verify_chunk(index, piece)
            pieces.append(piece)
        assert data == b"".join(pieces)
        assert hashlib.sha256(data).hexdigest() == manifest.sha256


class TestMemory:
    def test_hashing_64_mib_keeps_memory_flat(self, tmp_path):
        """Hashing and manifesting a 64 MiB file peaks under 4 MiB of Python memory."""
        path = tmp_path / "big.bin"
        block = os.urandom(MiB)
        with open(path, "wb") as target:
            for _ in range(64):
                target.write(block)
        del block
        tracemalloc.start()
        try:
            manifest_of_file(path, MiB)
            sha256_file(path)
            bad_chunks(path, manifest_of_file(path, 256 * 1024))
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * MiB, f"peak {peak} bytes"


@pytest.fixture
def manifest_and_data(sample) -> tuple[Manifest, bytes]:
    return build_manifest(io.BytesIO(sample), 1000), sample


class TestVerifyChunk:
    def test_good_chunk_passes(self, manifest_and_data):
        """Every chunk as cut from the data verifies, and check_chunk is silent."""
        manifest, data = manifest_and_data
        for index in range(manifest.chunk_count):
            offset, length = manifest.chunk_span(index)
            assert manifest.verify_chunk(index, data[offset : offset + length])
            manifest.check_chunk(index, memoryview(data)[offset : offset + length])

    def test_flipped_byte_rejected(self, manifest_and_data):
        """A chunk with one flipped bit fails, and the message names file and index."""
        manifest, data = manifest_and_data
        piece = bytearray(data[3000:4000])
        piece[500] ^= 0x01
        assert not manifest.verify_chunk(3, piece)
        with pytest.raises(IntegrityError) as caught:
            manifest.check_chunk(3, piece, label="report.pdf")
        assert "report.pdf: chunk 3 failed SHA-256 verification" == str(caught.value)

    def test_wrong_length_rejected(self, manifest_and_data):
        """A chunk one byte short fails with its index in the message."""
        manifest, data = manifest_and_data
        assert not manifest.verify_chunk(2, data[2000:2999])
        with pytest.raises(IntegrityError, match=r"^chunk 2 has 999 bytes, expected 1000$"):
            manifest.check_chunk(2, data[2000:2999])

    def test_right_digest_wrong_index_rejected(self, manifest_and_data):
        """Chunk 1's bytes do not pass as chunk 2."""
        manifest, data = manifest_and_data
        assert not manifest.verify_chunk(2, data[1000:2000])

    def test_out_of_range_index_is_value_error(self, manifest_and_data):
        """Asking about a chunk that does not exist is a ValueError."""
        manifest, _data = manifest_and_data
        with pytest.raises(ValueError):
            manifest.verify_chunk(manifest.chunk_count, b"")


class TestBadChunks:
    def test_intact_file_has_none(self, tmp_path, sample):
        """A file that matches its manifest has no bad chunks."""
        path = write_file(tmp_path / "f", sample)
        assert [] == bad_chunks(path, manifest_of_file(path, 1000))

    def test_modified_chunk_found(self, tmp_path, sample):
        """A byte changed in chunk 4 makes exactly chunk 4 bad."""
        manifest = build_manifest(io.BytesIO(sample), 1000)
        changed = bytearray(sample)
        changed[4321] ^= 0xFF
        assert [4] == bad_chunks(write_file(tmp_path / "f", bytes(changed)), manifest)

    def test_truncated_tail_found(self, tmp_path, sample):
        """A file cut inside chunk 7 has chunk 7 short and 8, 9 missing."""
        manifest = build_manifest(io.BytesIO(sample), 1000)
        assert [7, 8, 9] == bad_chunks(write_file(tmp_path / "f", sample[:7500]), manifest)

    def test_missing_file_all_bad(self, tmp_path, sample):
        """A file that does not exist has every chunk bad."""
        manifest = build_manifest(io.BytesIO(sample), 1000)
        assert list(range(10)) == bad_chunks(tmp_path / "absent", manifest)

    def test_bytes_past_size_ignored(self, tmp_path, sample):
        """Trailing bytes beyond the manifest's size do not spoil the last chunk."""
        data = sample[:9500]
        manifest = build_manifest(io.BytesIO(data), 1000)
        assert [] == bad_chunks(write_file(tmp_path / "f", data + b"junk"), manifest)


class TestManifestChecks:
    def test_header_round_trip(self, manifest_and_data):
        """to_header and from_header with the digests rebuild an equal manifest."""
        manifest, _data = manifest_and_data
        header = manifest.to_header()
        assert {"size": 10_000, "chunk_size": 1000, "sha256": manifest.sha256,
                "chunks": 10, "root": hash_list_root(10_000, 1000, manifest.chunk_digests)} == header
        assert manifest == Manifest.from_header(header, manifest.chunk_digests)

    def test_given_root_must_match(self, manifest_and_data):
        """A manifest built with a root (read back from a catalog) refuses one its digests do not give."""
        manifest, _data = manifest_and_data
        assert manifest == Manifest(manifest.size, manifest.chunk_size, manifest.sha256, manifest.chunk_digests,
                                    manifest.root)
        with pytest.raises(ValueError, match="root does not match"):
            Manifest(manifest.size, manifest.chunk_size, manifest.sha256, manifest.chunk_digests, "0" * 64)

    def test_root_is_a_hash_list_of_layout_and_digests(self, manifest_and_data):
        """The root is the SHA-256 of a fixed prefix, size and chunk size (8 bytes each), then the digests."""
        manifest, _data = manifest_and_data
        expected = hashlib.sha256(b"MiniTorrent hash list v1\0" + (10_000).to_bytes(8, "big")
                                  + (1000).to_bytes(8, "big") + manifest.chunk_digests).hexdigest()
        assert expected == manifest.root

    @pytest.mark.parametrize("tamper", ["swapped digests", "other root", "no root", "other size"])
    def test_from_header_refuses_digests_its_root_does_not_bind(self, manifest_and_data, tamper):
        """A digest list that is not the one the root names (swapped, or root changed or missing) is refused."""
        manifest, _data = manifest_and_data
        header, digests = manifest.to_header(), manifest.chunk_digests
        if tamper == "swapped digests":
            digests = digests[32:64] + digests[:32] + digests[64:]
        elif tamper == "other root":
            header["root"] = "0" * 64
        elif tamper == "no root":
            del header["root"]
        else:  # same chunk count, another layout: the last chunk's length differs
            header["size"] = 9_999
        with pytest.raises(ValueError, match="root does not match"):
            Manifest.from_header(header, digests)

    @pytest.mark.parametrize(
        "key, value, message",
        [
            ("size", "10000", "size must be an integer"),
            ("size", True, "size must be an integer"),
            ("size", -1, "size must be >= 0"),
            ("chunk_size", 1000.0, "chunk_size must be an integer"),
            ("chunk_size", 0, "chunk_size must be >= 1"),
            ("sha256", 123, "sha256 must be 64 lowercase hex"),
            ("sha256", "AB" * 32, "sha256 must be 64 lowercase hex"),
            ("chunks", False, "chunks must be an integer"),
            ("chunks", 11, "header says 11 chunks"),
        ],
    )
    def test_from_header_rejects_bad_field(self, manifest_and_data, key, value, message):
        """A wrong type or value in any header field is a readable ValueError."""
        manifest, _data = manifest_and_data
        header = {**manifest.to_header(), key: value}
        with pytest.raises(ValueError, match=message):
            Manifest.from_header(header, manifest.chunk_digests)

    def test_from_header_rejects_missing_field(self, manifest_and_data):
        """A header without 'chunks' names what is missing."""
        manifest, _data = manifest_and_data
        header = manifest.to_header()
        del header["chunks"]
        with pytest.raises(ValueError, match="lacks chunks"):
            Manifest.from_header(header, manifest.chunk_digests)

    def test_from_header_rejects_inconsistent_digests(self, manifest_and_data):
        """Digest bytes that are not 32 per chunk are refused."""
        manifest, _data = manifest_and_data
        with pytest.raises(ValueError, match="expected 320"):
            Manifest.from_header(manifest.to_header(), manifest.chunk_digests[:-1])

    def test_from_header_rejects_non_mapping(self):
        """A header that is not a mapping is refused."""
        with pytest.raises(ValueError, match="mapping"):
            Manifest.from_header(["size"], b"")

    def test_digests_stored_as_bytes(self):
        """A bytearray of digests is kept as immutable bytes."""
        digests = bytearray(hashlib.sha256(b"x").digest())
        manifest = Manifest(1, 10, sha256_hex(b"x"), digests)
        digests[0] ^= 1
        assert hashlib.sha256(b"x").digest() == manifest.chunk_digests
        assert DIGEST_BYTES == len(manifest.chunk_digest(0))
