"""MiniTorrent main server: shares a catalog of files in verified chunks.

    python main_server.py [--config PATH] [--headless] [--add FILE_OR_DIR ...]
                          [--remove PATH ...] [--rename OLD NEW]
    python main_server.py [--config PATH] pair | paired | revoke ID | token

``--add`` imports files into the server's data folder (see catalog.py for the
naming rules); a folder is shared whole, each file under its relative path
(server/folder_scan.py). ``--remove`` stops sharing a file or a folder, ``--rename``
renames one (the backup follows, clients see it at once). Then the server serves until SIGINT or SIGTERM. Without
``--headless`` it opens the main server's window (gui/main_window.py), which
starts serving and imports the ``--add`` files with a progress bar. If a main
server already runs on that data folder, ``--add`` adds the files to its
catalog (it notices within a second and replicates them) and exits.

The engine, ``MainServer``, imports no tkinter: a window (or a test) holds one
and calls its methods. With a backup configured it replicates to it and sends
it heartbeats (see docs/failover.md). ``pair`` shows a one-time code that
lets one client pair (``server.access: paired``), ``paired`` lists the paired
clients and ``revoke`` removes one; see docs/security.md. ``token`` prints the
operator's token for the web face (docs/http.md).

With ``cluster.mode: etcd`` the program runs member ``cluster.name`` of an
etcd cluster instead (headless; ``ClusterMember``). ``--add``, ``--remove``
and ``--rename`` beside a running member change the catalog only if that
member leads (it replicates the change to every member; beside a follower
they are refused, naming the leader), and with ``cluster.ack: quorum``
``--add`` returns once a majority of the members holds each file, verified.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from typing import Sequence

from config_loader import Config, load_config
from error_handler import MiniTorrentError
from minitorrent.common.daemon import build_engine, edit_catalog, serve_until_signalled
from minitorrent.server.coordinator import EtcdUnavailable
from minitorrent.server.catalog import AddResult
from minitorrent.server.engine import ServerEngine, operator_token
from minitorrent.server.main import MainServer
from minitorrent.web.face import start_with_face, stop_with_face, web_face_for
from minitorrent.server.member import acknowledge_by_quorum, build_server, leader_name
from minitorrent.server.access import CODE_TTL_S, AccessList, wait_for_pairing
from minitorrent.wire.identity import parse_id

log = logging.getLogger(__name__)

QUORUM_TIMEOUT_S = 120.0  # --add with cluster.ack quorum gives up (exit 1) if a majority does not hold the file by then


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MiniTorrent main server: share files on the LAN.")
    parser.add_argument("--config", help="path to config.yaml (default: the one beside this program)")
    parser.add_argument("--headless", action="store_true", help="run without a window")
    parser.add_argument("--geometry", metavar="WxH+X+Y", help="the window's size and place on screen")
    parser.add_argument("--add", nargs="+", metavar="FILE_OR_DIR", default=[], help="files or folders to share")
    parser.add_argument("--remove", nargs="+", metavar="PATH", default=[],
                        help="shared files or folders to stop sharing")
    parser.add_argument("--rename", nargs=2, metavar=("OLD", "NEW"), help="rename a shared file or folder")
    parser.add_argument("command", nargs="?", choices=ACCESS_COMMANDS,
                        help="pair: show a one-time code for a client (server.access: paired); "
                             "paired: list the paired clients; revoke ID: stop accepting a client; "
                             "token: print the operator's token for the web face")
    parser.add_argument("identity", nargs="?", help="the client identity to revoke")
    args = parser.parse_args(argv)
    if (args.command == "revoke") != (args.identity is not None):
        parser.error("revoke takes one client identity; the other commands none")
    return args


def add_files(engine: ServerEngine, paths: Sequence[str], added: list | None = None) -> bool:
    """Import files (in durable batches) and folders (whole trees), one line per file once it is durable.

    False if any failed. Results are appended to ``added``.
    """
    ok = True
    files = [path for path in paths if not os.path.isdir(path)]
    for _path, outcome in engine.add_files(files) if files else ():
        ok = report_added(outcome, added) and ok
    for folder in (path for path in paths if os.path.isdir(path)):
        results, warnings = engine.add_folder(folder)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        for result in results:
            report_added(result, added)
    return ok


def report_added(outcome: AddResult | MiniTorrentError, added: list | None) -> bool:
    """Print one import's line (stdout, or the error on stderr); False if it failed."""
    if isinstance(outcome, MiniTorrentError):
        print(f"error: {outcome}", file=sys.stderr, flush=True)
        return False
    record = outcome.record
    if added is not None:
        added.append(outcome)
    print(f"{outcome.outcome}: {record.name} ({record.size} bytes, sha256 {record.sha256[:12]})", flush=True)
    return True


def start_banner(engine: ServerEngine) -> str:
    """Start the engine; the line that says where it listens."""
    host, port = engine.start()
    count, total = engine.catalog.count_files()
    who = "main server" if engine.name == "main" else f"cluster member {engine.name}"
    return f"{who} listening on {host}:{port} with {count} files ({total} bytes), identity {engine.identity.id}"


def run_access_command(args: argparse.Namespace) -> int:
    """``pair``, ``paired`` or ``revoke ID`` on the main's data folder (the running server sees the change)."""
    try:
        config = load_config(args.config)
        access = AccessList(config.server.main.data_dir)
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return ACCESS_COMMANDS[args.command](access, config, args)
    finally:
        access.close()


def run_pair(access: AccessList, config: Config, args: argparse.Namespace) -> int:
    code = access.offer_code()
    print(f"pairing code: {code}  (one attempt, {CODE_TTL_S / 60:g} minutes); on the client run: "
          f"python client.py pair {code}", flush=True)
    try:
        identity = wait_for_pairing(access, code, threading.Event())
    except LookupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"paired client {identity}", flush=True)
    return 0


def run_paired(access: AccessList, config: Config, args: argparse.Namespace) -> int:
    clients = access.paired()
    for identity, added_at in clients:
        print(f"{identity}  paired {time.strftime('%Y-%m-%d %H:%M', time.localtime(added_at))}")
    if not clients:
        print("no paired clients")
    return 0


def run_revoke(access: AccessList, config: Config, args: argparse.Namespace) -> int:
    try:
        identity = parse_id(args.identity)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not access.revoke(identity):
        print(f"error: {identity} is not a paired client", file=sys.stderr)
        return 1
    print(f"revoked {identity}", flush=True)
    return 0


def run_token(access: AccessList, config: Config, args: argparse.Namespace) -> int:
    """The operator's token, alone on stdout (the running main accepts the same one)."""
    try:
        print(operator_token(config, "main", access))
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


ACCESS_COMMANDS = {"pair": run_pair, "paired": run_paired, "revoke": run_revoke, "token": run_token}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command:
        return run_access_command(args)
    engine = build_engine(args.config, "main_server", build_server)
    if engine is None:
        return 2
    etcd_mode = engine.config.cluster.mode == "etcd"
    edits = bool(args.add or args.remove or args.rename)
    if not args.headless and not etcd_mode and not (edits and _folder_taken(engine)):
        if args.remove or args.rename:
            edit_catalog(engine, args.remove, args.rename)
        return run_window(engine, args.add, args.geometry)  # with edits and a main already running: as headless
    if etcd_mode and not args.headless:
        print("note: a cluster member (cluster.mode: etcd) has no window: running headless", file=sys.stderr)
    if edits and etcd_mode and _folder_taken(engine):
        return edit_running_member(engine, args)
    added_ok = all([add_files(engine, args.add), edit_catalog(engine, args.remove, args.rename)])  # both run
    if not added_ok or (edits and _already_running(engine)):
        engine.catalog.close()
        return 0 if added_ok else 1
    face = web_face_for(engine, engine.config)
    try:
        serve_until_signalled(lambda: start_with_face(lambda: start_banner(engine), face),
                              lambda: stop_with_face(engine.stop, face), f"{engine.name} server")
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        engine.catalog.close()
        return 1
    return 0


def edit_running_member(engine: ServerEngine, args: argparse.Namespace) -> int:
    """etcd mode: ``--add``, ``--remove``, ``--rename`` on the running leader's catalog (it replicates them to
    every member); refused beside a follower, whose catalog only the leader writes. With ``cluster.ack: quorum``,
    returns once a majority holds each added file."""
    config = engine.config
    try:
        leader = leader_name(config)
        if leader != engine.name:
            what = "add files" if args.add else "edit the catalog"
            print(f"error: {engine.name} is not the leader ({leader or 'nobody'} leads): {what} on the leader",
                  file=sys.stderr)
            return 1
        added: list = []
        ok = all([add_files(engine, args.add, added), edit_catalog(engine, args.remove, args.rename)])
        print(f"the {engine.name} server already running on this data folder now serves these changes", flush=True)
        if ok and config.cluster.ack == "quorum":
            failures = acknowledge_by_quorum(config, added, engine.stop_event, QUORUM_TIMEOUT_S)
            for failure in failures:
                print(f"error: not acknowledged by a quorum: {failure}", file=sys.stderr)
            ok = not failures
            if ok:
                print(f"acknowledged by a quorum of {len(config.cluster.servers) // 2 + 1}", flush=True)
        return 0 if ok else 1
    except EtcdUnavailable as error:
        print(f"error: etcd is unreachable: {error}", file=sys.stderr)
        return 1
    finally:
        engine.catalog.close()


def run_window(engine: MainServer, add: Sequence[str], geometry: str | None = None) -> int:
    """Open the main server's window (which starts serving and imports ``add``); 2 if there is no display."""
    from minitorrent.gui.base import (  # tkinter only when a window is wanted
        NoDisplay,
        no_display_hint,
        open_root,
    )
    from minitorrent.gui.shell import TITLES
    from minitorrent.gui.main_window import DEFAULT_GEOMETRY, run

    settings_file = engine.catalog.data_dir / "window.json"
    try:
        root = open_root(TITLES["main"], geometry or DEFAULT_GEOMETRY, settings_file)
    except NoDisplay:
        engine.catalog.close()
        return no_display_hint("main_server.py")
    face = web_face_for(engine, engine.config)
    try:
        start_with_face(str, face)
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        root.destroy()
        engine.catalog.close()
        return 1
    try:
        return run(engine, root, settings_file, add)
    finally:
        stop_with_face(lambda: None, face)


def _folder_taken(engine: MainServer) -> bool:
    """True if another main server holds this data folder."""
    if engine.lock.acquire():
        engine.lock.release()
        return False
    return True


def _already_running(engine: MainServer) -> bool:
    """True (and says so) if another main server holds this data folder: it will share the files."""
    if not _folder_taken(engine):
        return False
    print("the main server already running on this data folder now serves these changes", flush=True)
    return True


if __name__ == "__main__":
    sys.exit(main())
