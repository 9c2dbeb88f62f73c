"""The README's first command: the demo runs end to end and says every file arrived intact."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

import pytest
from conftest import LONG_TIMEOUT, ROOT, wait_until

import demo


class TestDemo:
    @pytest.mark.timeout(LONG_TIMEOUT * 2)
    def test_demo_downloads_every_sample_intact(self, tmp_path):
        """demo.py serves its samples, survives a SIGKILL of the main, fails back, and cleans up after itself."""
        result = subprocess.run([sys.executable, str(ROOT / "demo.py")], capture_output=True, text=True,
                                encoding="utf-8", timeout=LONG_TIMEOUT * 2, cwd=tmp_path,
                                env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path),
                                     **{k: v for k, v in os.environ.items()
                                        if k.startswith(("COV", "PYTHON"))}})
        assert 0 == result.returncode, result.stdout + result.stderr
        assert "every file arrived intact" in result.stdout
        assert 4 == result.stdout.count("  OK   ")  # three samples, then one again from the backup
        assert "The backup took over" in result.stdout and "took the role back" in result.stdout
        assert "Its web page (catalog, status, downloads, .torrent files): http://127.0.0.1:" in result.stdout
        assert [] == list(tmp_path.glob("minitorrent-demo-*"))  # the throwaway folder is gone
        echoed_get = next(line for line in result.stdout.splitlines() if line.startswith("$ ") and " get " in line)
        words = shlex.split(echoed_get[2:])  # what a user gets by pasting it into a shell
        assert ["python", "client.py", "--config"] == words[:3]
        assert ["get", *demo.SAMPLES] == words[4:]

    @pytest.mark.timeout(LONG_TIMEOUT * 2)
    def test_sigterm_stops_the_servers_and_removes_the_folder(self, tmp_path):
        """A SIGTERM to the headless demo stops its servers, removes its folder and exits 130, no traceback."""
        process = subprocess.Popen([sys.executable, str(ROOT / "demo.py"), "--headless"], cwd=tmp_path, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8",
                                   env={**os.environ, "TMPDIR": str(tmp_path)})
        try:
            wait_until(lambda: _demo_processes(tmp_path) >= 2, LONG_TIMEOUT, "the demo's two servers")
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=LONG_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
        assert (130, "Traceback" in stderr) == (process.returncode, False), stderr
        assert 0 == _demo_processes(tmp_path)
        assert [] == list(tmp_path.glob("minitorrent-demo-*"))


def _demo_processes(folder) -> int:
    """How many running processes name a file under ``folder`` on their command line (the demo's servers)."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                words = cmdline.read().split(b"\0")
        except OSError:
            continue
        count += any(word.startswith(f"{folder}/minitorrent-demo-".encode()) for word in words)
    return count


class TestShellCommand:
    def test_echoed_commands_survive_the_shell(self):
        """shell_command quotes names with spaces, accents and quotes so a shell splits them back exactly."""
        args = ["get", "holiday photos été.bin", "it's.txt", "--output", "/tmp/a b"]
        assert ["python", "client.py", *args] == shlex.split(demo.shell_command("client.py", *args))


class TestDemoWindows:
    @pytest.mark.timeout(LONG_TIMEOUT * 2)
    @pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
    def test_demo_opens_the_three_windows_and_a_signal_closes_them(self, tmp_path, display, stop):
        """With a screen, demo.py opens the three windows; Ctrl+C or SIGTERM closes them all and removes the folder."""
        import shutil

        if shutil.which("xdotool") is None:
            reason = "xdotool is needed to list the windows"
            if os.environ.get("REQUIRE_GUI") == "1":
                pytest.fail(reason + " (REQUIRE_GUI=1)")
            pytest.skip(reason)
        process = subprocess.Popen([sys.executable, str(ROOT / "demo.py"), "--no-browser"], cwd=tmp_path, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env={**os.environ, "TMPDIR": str(tmp_path)})

        def titles() -> set[str]:
            found = subprocess.run(["xdotool", "search", "--name", "MiniTorrent"], capture_output=True, text=True)
            names = set()
            for window in found.stdout.split():
                name = subprocess.run(["xdotool", "getwindowname", window], capture_output=True, text=True)
                names.add(name.stdout.strip())
            return names

        wanted = {"MiniTorrent — Main server", "MiniTorrent — Backup server", "MiniTorrent — Client"}
        try:
            wait_until(lambda: wanted <= titles(), LONG_TIMEOUT, "the three demo windows")
        finally:
            process.send_signal(stop)
            output, _ = process.communicate(timeout=LONG_TIMEOUT)
        assert 0 == process.returncode, output
        assert set() == wanted & titles()  # every window is gone
        assert [] == list(tmp_path.glob("minitorrent-demo-*"))  # the throwaway folder is gone
