"""A local demo of MiniTorrent on throwaway sample files, failover included.

    python demo.py [--headless] [--keep] [--no-browser]

With a screen, the demo opens the three windows side by side on 127.0.0.1
with free ports, a throwaway data folder and the sample files already
shared: select files in the client, click Download Selected, then close (or
kill) the main server's window and watch the backup take over. It ends when
every window is closed, or on Ctrl+C or SIGTERM (which close the windows and
remove the folder too).

Without a screen (or with ``--headless``) it tells the same story with the
real programs as headless processes:

1. a backup server (standby) and a main server sharing a few sample files
   (of different sizes, with spaces and accents in their names);
2. the client lists and downloads them, and every SHA-256 is checked;
3. the main server is killed with SIGKILL; the backup notices the missing
   heartbeats, takes over with a higher epoch, and the client downloads again
   without being told anything;
4. the main server is started again: it catches up from the backup and takes
   the active role back.

Each server also has its web face (docs/http.md): the demo prints the main
server's page address, and with a screen opens it in a browser if there is
one (``--no-browser``: don't). Everything runs on 127.0.0.1, so the demo's
configs serve the page in plain HTTP (``http_tls: false``: allowed on a
loopback address only) and the browser opens it without a certificate warning;
a real server serves HTTPS with its own certificate (docs/http.md).

``--keep`` leaves the folder (configs, logs, downloads) for a look afterwards.
The commands it echoes are quoted for the shell: they can be copied and run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import webbrowser
from pathlib import Path
from typing import Callable, Sequence

import yaml

from integrity import sha256_file
from minitorrent.common.launcher import ROOT, ServerProcess, free_port, write_config

SAMPLES = {  # name -> size in bytes
    "welcome.txt": 2_000,
    "holiday photos été.bin": 3 * 1024 * 1024 + 17,
    "lecture video.bin": 24 * 1024 * 1024,
}
HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_TIMEOUT_S = 2.0
ROLE_CHANGE_TIMEOUT_S = 30.0
MIN_WINDOW = (900, 520)  # the windows' minimum size (gui/base.MIN_WINDOW_SIZE)


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


def write_configs(workdir: Path) -> dict[str, Path]:
    """One config per program, all naming the same two servers and sharing a fresh secret."""
    settings = {
        "server": {
            # Plain HTTP on loopback: the browser opens the page without a warning (see the docstring).
            "main": {"host": "127.0.0.1", "port": free_port(), "http_port": free_port(), "http_tls": False,
                     "data_dir": "data"},
            "backup": {"host": "127.0.0.1", "port": free_port(), "http_port": free_port(), "http_tls": False,
                       "data_dir": "data",
                       "heartbeat_interval": HEARTBEAT_INTERVAL_S, "heartbeat_timeout": HEARTBEAT_TIMEOUT_S},
            "secret": secrets.token_hex(16),
        },
        "client": {"download_dir": "downloads", "data_dir": "data", "retry_deadline": 30},
        "logging": {"log_dir": "logs"},
    }
    return {program: write_config(workdir / program / "config.yaml", settings)
            for program in ("main", "backup", "client")}


def run_client(config: Path, *args: str, quiet: bool = False) -> subprocess.CompletedProcess:
    """Run the real client, echoing what it prints."""
    print(f"\n$ {shell_command('client.py', '--config', str(config), *args)}", flush=True)
    result = subprocess.run([sys.executable, str(ROOT / "client.py"), "--config", str(config), *args],
                            capture_output=True, text=True, encoding="utf-8")
    if not quiet:
        sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result


def shell_command(program: str, *args: str) -> str:
    """``python PROGRAM ARGS`` quoted for a POSIX shell (names here have spaces and accents)."""
    return " ".join(shlex.quote(part) for part in ("python", program, *args))


def server_status(config: Path) -> dict:
    """The active server's status as the client sees it ({} if none answers)."""
    result = subprocess.run([sys.executable, str(ROOT / "client.py"), "--config", str(config), "status", "--json"],
                            capture_output=True, text=True, encoding="utf-8")
    return json.loads(result.stdout) if result.returncode == 0 else {}


def wait_for(config: Path, condition: Callable[[dict], bool], what: str) -> dict:
    """Poll the active server's status until ``condition`` holds; that status."""
    deadline = time.monotonic() + ROLE_CHANGE_TIMEOUT_S
    while time.monotonic() < deadline:
        status = server_status(config)
        if status and condition(status):
            return status
        time.sleep(0.2)
    raise RuntimeError(f"waited {ROLE_CHANGE_TIMEOUT_S:g} s for {what}")


def wait_for_active(config: Path, server: str) -> dict:
    """Poll until ``server`` ("main" or "backup") is the active one; its status."""
    return wait_for(config, lambda s: s.get("server") == server and s.get("role") == "active",
                    f"the {server} server to be active")


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


def page_address(config: Path) -> str:
    """The web page of the server that ``config`` configures (the demo gives every server a known http_port)."""
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))["server"]["main"]
    scheme = "https" if settings.get("http_tls", True) else "http"
    return f"{scheme}://{settings['host']}:{settings['http_port']}/"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run_demo(workdir: Path) -> bool:
    """The whole story under ``workdir``; True if every download matched its original."""
    samples = make_samples(workdir / "samples")
    configs = write_configs(workdir)
    client = configs["client"]
    say(f"Demo folder: {workdir}. Starting a backup server and a main server sharing {len(samples)} files")
    servers: list[ServerProcess] = []  # stopped on the way out, however the story ends
    try:
        backup = ServerProcess(configs["backup"], script="backup_server.py")
        servers.append(backup)
        main = ServerProcess(configs["main"], add=samples)
        servers.append(main)
        print("\n".join(backup.stdout_lines + main.stdout_lines))
        status = wait_for(client, lambda s: s.get("server") == "main" and s["backup"].get("in_sync"),
                          "the backup to hold a full replica")
        print(f"The main server is active (epoch {status['epoch']}); the backup holds a full replica.")
        print(f"Its web page (catalog, status, downloads, .torrent files): {page_address(configs['main'])}")
        run_client(client, "list")
        run_client(client, "get", *SAMPLES)
        ok = report_checksums(samples, workdir / "client" / "downloads")

        say("Crashing the main server with SIGKILL")
        main.stop(signal.SIGKILL)
        status = wait_for_active(client, "backup")
        print(f"The backup took over: active with epoch {status['epoch']}.")
        again = workdir / "client" / "from-backup"
        run_client(client, "get", "lecture video.bin", "--output", str(again), quiet=True)
        ok &= report_checksums(samples[-1:], again)

        say("Starting the main server again")
        main = ServerProcess(configs["main"])
        servers.append(main)
        status = wait_for_active(client, "main")
        print(f"The main caught up and took the role back: active with epoch {status['epoch']}; "
              f"it counts {sum(status.get('downloads_per_file', {}).values())} downloads, "
              "including the one served by the backup.")
    finally:
        for server in servers:
            server.kill()
    return ok


def screen_size() -> tuple[int, int] | None:
    """The screen's (width, height), or None when no window can be opened."""
    if not os.environ.get("DISPLAY"):
        return None
    try:
        import tkinter

        probe = tkinter.Tk()
    except Exception:  # tkinter missing or no usable display: the headless demo it is
        return None
    size = probe.winfo_screenwidth(), probe.winfo_screenheight()
    probe.destroy()
    return size


def window_geometries(width: int, height: int) -> dict[str, str]:
    """Places for the three windows: the servers side by side on top, the client below, overlapping if small."""
    half_w = max(MIN_WINDOW[0], width // 2)
    top_h = max(MIN_WINDOW[1], height // 2)
    client_w, client_h = max(MIN_WINDOW[0], min(width, 1200)), max(MIN_WINDOW[1], height - top_h)
    return {
        "main": f"{half_w}x{top_h}+0+0",
        "backup": f"{half_w}x{top_h}+{max(0, width - half_w)}+0",
        "client": f"{client_w}x{client_h}+{max(0, (width - client_w) // 2)}+{max(0, height - client_h)}",
    }


def page_answers(url: str) -> bool:
    """Wait (up to the time a server takes to start) until ``url`` answers; False if it never does."""
    deadline = time.monotonic() + ROLE_CHANGE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def run_windows(workdir: Path, size: tuple[int, int], open_browser: bool = True) -> bool:
    """Open the three windows on the samples; wait until all are closed. True if none failed."""
    samples = make_samples(workdir / "samples")
    configs = write_configs(workdir)
    places = window_geometries(*size)
    say(f"Demo folder: {workdir}. Opening the main server, backup and client windows")
    # The main first: a backup that hears no heartbeat for heartbeat_timeout would take over before it starts.
    programs = [("main", "main_server.py", ["--add", *map(str, samples)]), ("backup", "backup_server.py", []),
                ("client", "client.py", [])]
    processes = [subprocess.Popen([sys.executable, str(ROOT / script), "--config", str(configs[name]),
                                   "--geometry", places[name], *extra])
                 for name, script, extra in programs]
    page = page_address(configs["main"])
    opened = open_browser and page_answers(page) and webbrowser.open(page)  # False when no browser is there
    print(f"The main server's web page is at {page}{' (opened in your browser)' if opened else ''}.")
    print("Select files in the client window and click Download Selected. Then close the main server's\n"
          "window (or kill it) and watch the backup take over; start "
          f"`{shell_command('main_server.py', '--config', str(configs['main']))}` again to see it take the role "
          "back. Close every window (or press Ctrl+C) to end.")
    try:
        codes = [process.wait() for process in processes]
    except KeyboardInterrupt:
        for process in processes:
            process.terminate()
        codes = [process.wait() for process in processes]
    return all(code in (0, -signal.SIGTERM) for code in codes)


def interrupt_on_sigterm() -> None:
    """SIGTERM ends the demo as Ctrl+C does: the windows or servers are stopped and the folder removed."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a local MiniTorrent demo on sample files, with a failover.")
    parser.add_argument("--headless", action="store_true", help="tell the story in the terminal, no windows")
    parser.add_argument("--keep", action="store_true", help="keep the demo folder afterwards")
    parser.add_argument("--no-browser", action="store_true", help="do not open the web page in a browser")
    args = parser.parse_args(argv)
    size = None if args.headless else screen_size()
    interrupt_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="minitorrent-demo-"))
    try:
        if size:
            return 0 if run_windows(workdir, size, open_browser=not args.no_browser) else 1
        ok = run_demo(workdir)
    except KeyboardInterrupt:  # the servers were stopped on the way out (run_demo's finally)
        print("\nDemo interrupted.", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"Kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\nDemo finished: every file arrived intact." if ok else "\nDemo finished with errors.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
