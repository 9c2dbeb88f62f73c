"""Benchmark: the client's per-chunk bookkeeping for N and 8N chunks, and what a big manifest costs to hold.

    python bench/bookkeeping.py [--chunks 131072] [--repeat 3]

No sockets and no files: this is the part of a download that grows with the
number of chunks rather than with the bytes. For N and 8 N chunks it times,
in CPU seconds (``time.process_time``), what the downloader does per chunk
besides moving and hashing bytes:

* the manifest read from the wire (``Manifest.from_header``, root checked);
* the chunk board: two server streams taking chunks by half pipelines (8
  deep) while a partial peer and a whole-file peer take theirs, and every
  chunk arriving;
* the set of verified chunks, and the seeder's bitmap of it every 8 chunks
  (what an announcement sends).

It prints the cost per chunk at N and at 8 N and their ratio: about 1.0 means
linear (the target: bookkeeping linear or better in chunks). It then builds
the same structures for a manifest of 4 Mi chunks (4 TiB at 1 MiB chunks)
under ``tracemalloc`` and prints their peak beside the digests' own 128 MiB
(target: a 1 TiB manifest, 1 Mi chunks, under 100 MiB in all).

A third figure, for information: CPU per GiB of checking 1 MiB chunks with
one SHA-256 each against a BEP 52 merkle root of their 16 KiB blocks.
Exits 0 with PASS or MISS per target (bench/README.md).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import time
import tracemalloc

# common first: importing it puts the project root on sys.path.
from common import exit_status, install_interrupts, report_line, verdict

from integrity import Manifest, hash_list_root
from minitorrent.client.chunkboard import ChunkBoard, ChunkSet, Source

DEPTH = 8  # the default transfer.pipeline_depth
MARK_EVERY = 8  # the downloader's MARK_BATCH: the seeder's view is refreshed this often
LINEAR_TARGET = 1.5  # per-chunk cost at 8 N over that at N: noise allows some, quadratic gives about 8
ONE_TIB_MIB_TARGET = 100.0
BLOCK = 16 * 1024  # BEP 52's leaf size


def manifest_header(count: int, chunk_size: int, digests: bytes) -> dict:
    size = count * chunk_size
    return {"size": size, "chunk_size": chunk_size, "sha256": "0" * 64, "chunks": count,
            "root": hash_list_root(size, chunk_size, digests)}


def run_download(count: int, seed: int = 1) -> int:
    """Every chunk of a ``count``-chunk download through the board, as the streams would; returns chunks done."""
    digests = bytes(32 * count)
    Manifest.from_header(manifest_header(count, 1 << 20, digests), digests)
    board, verified = ChunkBoard(count, rng=random.Random(seed)), ChunkSet(count)
    rng = random.Random(seed)
    streams = [Source("server", is_server=True)] * 2
    partial = Source("peer a", have=set(rng.sample(range(count), count // 4)))
    seed_peer = Source("peer b")
    board.add_peer(partial)
    board.add_peer(seed_peer)
    pipelines: list[list[int]] = [[] for _ in range(4)]
    sources = [*streams, partial, seed_peer]
    while not board.finished:
        for source, pipeline in zip(sources, pipelines):
            if len(pipeline) <= DEPTH // 2:
                pipeline.extend(board.take(source, DEPTH - len(pipeline)))
            if pipeline:
                index = pipeline.pop(0)
                board.arrived(index, source, 1)
                verified.add(index)
                if len(verified) % MARK_EVERY == 0:
                    verified.bitmap()
    return len(verified)


def cpu_per_chunk(count: int) -> float:
    started = time.process_time()
    done = run_download(count)
    return (time.process_time() - started) / done


def manifest_memory_mib(count: int) -> tuple[float, float]:
    """(digests MiB, peak MiB of everything else) for a manifest of ``count`` chunks and its bookkeeping."""
    digests = bytes(32 * count)
    header = manifest_header(count, 1 << 20, digests)
    tracemalloc.start()
    try:
        manifest = Manifest.from_header(header, digests)
        board, verified = ChunkBoard(count, rng=random.Random(1)), ChunkSet(count)
        main = Source("server", is_server=True)
        for _ in range(1000):
            for index in board.take(main, DEPTH):
                board.arrived(index, main, 1)
                verified.add(index)
        verified.bitmap()
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del manifest
    return len(digests) / (1 << 20), peak / (1 << 20)


def hashing_cpu_per_gib(rounds: int = 5) -> tuple[float, float]:
    """(one SHA-256 per 1 MiB chunk, BEP 52 merkle root per chunk): CPU-s per GiB, medians, interleaved."""
    view = memoryview(os.urandom(1 << 20))

    def flat(chunk: memoryview) -> bytes:
        return hashlib.sha256(chunk).digest()

    def merkle(chunk: memoryview) -> bytes:
        layer = [hashlib.sha256(chunk[i:i + BLOCK]).digest() for i in range(0, len(chunk), BLOCK)]
        while len(layer) > 1:
            layer = [hashlib.sha256(layer[i] + layer[i + 1]).digest() for i in range(0, len(layer), 2)]
        return layer[0]

    times: dict = {flat: [], merkle: []}
    for round_ in range(rounds):
        for check in (flat, merkle) if round_ % 2 == 0 else (merkle, flat):
            started = time.process_time()
            for _ in range(256):
                check(view)
            times[check].append((time.process_time() - started) * 4)
    return statistics.median(times[flat]), statistics.median(times[merkle])


def bench(chunks: int, repeat: int) -> None:
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    small, large = [], []
    for round_ in range(repeat):
        for count, into in ((chunks, small), (8 * chunks, large)) if round_ % 2 == 0 else \
                ((8 * chunks, large), (chunks, small)):
            into.append(cpu_per_chunk(count))
            print(f"  round {round_ + 1}: {count:>9} chunks  {into[-1] * 1e6:6.2f} us/chunk", flush=True)
    per_small, per_large = statistics.median(small), statistics.median(large)
    digests_mib, other_mib = manifest_memory_mib(4 << 20)
    one_tib_mib = digests_mib / 4 + other_mib
    flat, merkle = hashing_cpu_per_gib()
    print()
    line(f"bookkeeping CPU, {chunks} chunks", f"{per_small * 1e6:7.2f} us/chunk")
    line(f"bookkeeping CPU, {8 * chunks} chunks", f"{per_large * 1e6:7.2f} us/chunk")
    line("4 Mi-chunk manifest: digests (info)", f"{digests_mib:7.1f} MiB")
    line("4 Mi-chunk manifest: everything else, peak", f"{other_mib:7.1f} MiB")
    line("SHA-256 per 1 MiB chunk (info)", f"{flat:7.2f} CPU-s/GiB")
    line("BEP 52 merkle per 1 MiB chunk (info)", f"{merkle:7.2f} CPU-s/GiB  ({merkle / flat:.2f}x)")
    ratio = per_large / per_small
    line(f"TARGET per-chunk cost 8N / N <= {LINEAR_TARGET}", f"{ratio:7.2f}       {verdict(ratio <= LINEAR_TARGET)}")
    line(f"TARGET 1 TiB manifest (1 Mi chunks) <= {ONE_TIB_MIB_TARGET:.0f} MiB",
         f"{one_tib_mib:7.1f} MiB   {verdict(one_tib_mib <= ONE_TIB_MIB_TARGET)}")
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


def line(label: str, value: str) -> None:
    report_line(label, value, width=50)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=128 * 1024, help="N (default 131072); 8 N is also run")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, alternated; medians reported (default 3)")
    args = parser.parse_args(argv)
    if args.chunks < 64 or args.repeat < 1:
        parser.error("--chunks must be at least 64 and --repeat at least 1")
    install_interrupts()
    return exit_status(lambda: bench(args.chunks, args.repeat))


if __name__ == "__main__":
    sys.exit(main())
