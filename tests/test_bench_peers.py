"""bench/peers.py in its quickest mode: every installed tool downloads a verified copy; a missing one is named."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import LONG_TIMEOUT, ROOT

ROUND = re.compile(r"^  round 1\s+(\S+(?: [a-z]+)?)\s+[\d.]+ s\s+[\d.]+ MB/s  sha256 verified", re.MULTILINE)


def installed_peers() -> set[str]:
    """The peers this machine has, found the way an operator would."""
    curl = shutil.which("curl") and shutil.which("openssl")
    found = {"curl+openssl": curl, "curl https": curl, "aria2c": shutil.which("aria2c"),
             "libtorrent": importlib.util.find_spec("libtorrent")}
    return {tool for tool, there in found.items() if there}


def run_quick(tmp_path, path: str) -> subprocess.CompletedProcess:
    """``bench/peers.py --quick`` with a 256 KiB file, its folder in ``tmp_path``, commands found on ``path``."""
    env = {"PATH": path, "TMPDIR": str(tmp_path), **{k: v for k, v in os.environ.items()
                                                      if k.startswith(("COV", "PYTHON"))}}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "peers.py"), "--quick", "--size", "256K",
                           "--folder", str(tmp_path)], capture_output=True, text=True, encoding="utf-8",
                          timeout=LONG_TIMEOUT * 2, cwd=tmp_path, env=env)


class TestPeersBenchmark:
    @pytest.mark.timeout(LONG_TIMEOUT * 3)
    def test_every_installed_tool_downloads_a_verified_copy(self, tmp_path):
        """Quick mode runs MiniTorrent (TLS and plain) and every installed peer once, checks each SHA-256, and reports medians."""
        result = run_quick(tmp_path, os.environ.get("PATH", "/usr/bin:/bin"))
        assert 0 == result.returncode, result.stdout + result.stderr
        assert {"minitorrent", "minitorrent plain"} | installed_peers() == set(ROUND.findall(result.stdout))
        for tool in installed_peers() | {"minitorrent plain"}:
            assert 1 == len(re.findall(rf"^  {re.escape(tool)}\s+[\d.]+ s  minitorrent speed-up\s+[\d.]+ x$",
                                       result.stdout, re.MULTILINE)), result.stdout
        assert "load average (1, 5, 15 min)" in result.stdout
        if "curl https" in installed_peers():  # the races like for like: plain against plain, TLS against TLS
            assert 1 == result.stdout.count("like for like (no encryption): minitorrent plain over "), result.stdout
            assert 1 == result.stdout.count("like for like (TLS): minitorrent over curl https"), result.stdout
        assert [] == list(tmp_path.glob("minitorrent-bench-peers-*"))  # the temporary folder is gone

    @pytest.mark.timeout(LONG_TIMEOUT * 3)
    def test_a_missing_tool_is_named_with_how_to_install_it(self, tmp_path):
        """With aria2c off the PATH, the run still verifies the others and says aria2c is missing and how to get it."""
        tools = tmp_path / "bin"
        tools.mkdir()
        for command in ("bash", "curl", "openssl", "tee", "git"):
            if shutil.which(command):
                (tools / command).symlink_to(shutil.which(command))
        result = run_quick(tmp_path, str(tools))
        assert 0 == result.returncode, result.stdout + result.stderr
        assert "aria2c" not in ROUND.findall(result.stdout)
        assert "minitorrent" in ROUND.findall(result.stdout)
        assert ["MISSING: install with `apt-get install -y aria2`"] == [
            line.split(None, 1)[1] for line in result.stdout.splitlines() if line.startswith("  aria2c ")]
