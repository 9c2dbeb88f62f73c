"""A local demo of MiniTorrent on throwaway sample files.

    python demo.py [--keep]

Until the windows exist the demo runs headless: it makes a few sample files
(of different sizes, with spaces and accents in their names) in a temporary
folder, starts a real main server process sharing them on a free port of
127.0.0.1, lists and downloads them with the real client, checks every
SHA-256, shows the server's status, and stops the server. ``--keep`` leaves
the folder (config, logs, downloads) for a look afterwards.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from integrity import sha256_file
from launcher import ROOT, ServerProcess, write_config

SAMPLES = {  # name -> size in bytes
    "welcome.txt": 2_000,
    "holiday photos été.bin": 3 * 1024 * 1024 + 17,
    "lecture video.bin": 24 * 1024 * 1024,
}


def make_samples(folder: Path) -> list[Path]:
    """Write the sample files (reproducible pseudo-random bytes) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(2026)
    paths = []
    for name, size in SAMPLES.items():
        path = folder / name
        with open(path, "wb") as out:
            for start in range(0, size, 1 << 20):
                out.write(rng.randbytes(min(1 << 20, size - start)))
        paths.append(path)
    return paths


def run_client(config: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the real client, echoing what it prints."""
    print(f"\n$ python client.py {' '.join(args)}", flush=True)
    result = subprocess.run([sys.executable, str(ROOT / "client.py"), "--config", str(config), *args],
                            capture_output=True, text=True, encoding="utf-8")
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result


def run_demo(workdir: Path) -> bool:
    """Serve, list, download and verify the samples under ``workdir``; True if all matched."""
    samples = make_samples(workdir / "samples")
    server_config = write_config(workdir / "server" / "config.yaml", {
        "server": {"main": {"host": "127.0.0.1", "port": 0, "data_dir": "data"}},
        "logging": {"log_dir": "logs"},
    })
    print(f"Demo folder: {workdir}\nStarting the main server with {len(samples)} sample files...", flush=True)
    server = ServerProcess(server_config, add=samples)
    try:
        host, port = server.address
        print("\n".join(server.stdout_lines))
        client_config = write_config(workdir / "client" / "config.yaml", {
            "server": {"main": {"host": host, "port": port}},
            "client": {"download_dir": "downloads", "data_dir": "data"},
            "logging": {"log_dir": "logs"},
        })
        run_client(client_config, "list")
        run_client(client_config, "get", *SAMPLES)
        all_match = report_checksums(samples, workdir / "client" / "downloads")
        status = json.loads(run_client(client_config, "status", "--json").stdout or "{}")
        print(f"\nThe server sent {status.get('bytes_sent', 0):,} bytes and counted "
              f"{sum(status.get('downloads_per_file', {}).values())} downloads.")
    finally:
        server.stop()
    print("Main server stopped.")
    return all_match


def report_checksums(samples: list[Path], downloads: Path) -> bool:
    """Print whether each download's SHA-256 equals its source's; True if all do."""
    print("\nChecking every download against its original:")
    all_match = True
    for source in samples:
        copy = downloads / source.name
        match = copy.is_file() and sha256_file(copy) == sha256_file(source)
        all_match &= match
        print(f"  {'OK  ' if match else 'FAIL'} {source.name}")
    return all_match


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a local MiniTorrent demo on sample files.")
    parser.add_argument("--keep", action="store_true", help="keep the demo folder afterwards")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="minitorrent-demo-"))
    try:
        ok = run_demo(workdir)
    finally:
        if args.keep:
            print(f"Kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\nDemo finished: every file arrived intact." if ok else "\nDemo finished with errors.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
