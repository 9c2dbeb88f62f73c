"""The README's first command: the demo runs end to end and says every file arrived intact."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import LONG_TIMEOUT, ROOT


class TestDemo:
    @pytest.mark.timeout(LONG_TIMEOUT * 2)
    def test_demo_downloads_every_sample_intact(self, tmp_path):
        """demo.py serves its samples, survives a SIGKILL of the main, fails back, and cleans up after itself."""
        result = subprocess.run([sys.executable, str(ROOT / "demo.py")], capture_output=True, text=True,
                                encoding="utf-8", timeout=LONG_TIMEOUT * 2, cwd=tmp_path,
                                env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path),
                                     **{k: v for k, v in __import__("os").environ.items()
                                        if k.startswith(("COV", "PYTHON"))}})
        assert 0 == result.returncode, result.stdout + result.stderr
        assert "every file arrived intact" in result.stdout
        assert 4 == result.stdout.count("  OK   ")  # three samples, then one again from the backup
        assert "The backup took over" in result.stdout and "took the role back" in result.stdout
        assert [] == list(tmp_path.glob("minitorrent-demo-*"))  # the throwaway folder is gone


class TestDemoWindows:
    @pytest.mark.timeout(LONG_TIMEOUT * 2)
    def test_demo_opens_the_three_windows_and_ends_on_ctrl_c(self, tmp_path, display):
        """With a screen, demo.py opens the main, backup and client windows; Ctrl+C closes them all cleanly."""
        import os
        import shutil
        import signal

        from conftest import wait_until

        if shutil.which("xdotool") is None:
            reason = "xdotool is needed to list the windows"
            if os.environ.get("REQUIRE_GUI") == "1":
                pytest.fail(reason + " (REQUIRE_GUI=1)")
            pytest.skip(reason)
        demo = subprocess.Popen([sys.executable, str(ROOT / "demo.py")], cwd=tmp_path, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, "TMPDIR": str(tmp_path)})

        def titles() -> set[str]:
            found = subprocess.run(["xdotool", "search", "--name", "MiniTorrent"], capture_output=True, text=True)
            names = set()
            for window in found.stdout.split():
                name = subprocess.run(["xdotool", "getwindowname", window], capture_output=True, text=True)
                names.add(name.stdout.strip())
            return names

        try:
            wanted = {"MiniTorrent main server", "MiniTorrent backup server", "MiniTorrent — Client"}
            wait_until(lambda: wanted <= titles(), LONG_TIMEOUT, "the three demo windows")
        finally:
            demo.send_signal(signal.SIGINT)
            output, _ = demo.communicate(timeout=LONG_TIMEOUT)
        assert 0 == demo.returncode, output
        assert [] == list(tmp_path.glob("minitorrent-demo-*"))  # the throwaway folder is gone
