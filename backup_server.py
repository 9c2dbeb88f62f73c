"""MiniTorrent backup server (not built yet).

    python backup_server.py [--config PATH] [--headless]

Replication, heartbeats and failover arrive with the backup-server issue; see
docs/protocol.md for the protocol it will speak. Until then this program only
says so, so that scripts calling it fail clearly instead of hanging.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="MiniTorrent backup server (not built yet).")
    parser.add_argument("--config", help="path to config.yaml")
    parser.add_argument("--headless", action="store_true", help="run without a window")
    parser.parse_args(argv)
    print("error: the backup server is not built yet; the main server and the client work today",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
