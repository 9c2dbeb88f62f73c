"""Servers found on the LAN by mDNS: strict parsing of what strangers announce, and a real
announce-and-browse inside a private network namespace (multicast never leaves it)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import NETNS_TIMEOUT_S, ROOT, private_network_available, run_in_private_network

from minitorrent.net.discovery import MAX_EPOCH, FoundServer, parse_found

GOOD = {b"id": b"ABCDEFG-HIJKLMN", b"role": b"active", b"epoch": b"3"}


class TestParsingAnnouncements:
    def test_a_well_formed_announcement_is_kept(self):
        """Identity, role, epoch and the IPv4 address come back as announced."""
        expected = FoundServer("main", "192.0.2.7", 5001, "ABCDEFG-HIJKLMN", "active", 3)
        assert expected == parse_found("main._minitorrent._tcp.local.", ["192.0.2.7"], 5001, GOOD)

    @pytest.mark.parametrize("key,value", [
        (b"epoch", str(MAX_EPOCH + 1).encode()),  # past the wire limit
        (b"epoch", b"-1"),
        (b"epoch", b"1e9"),
        (b"role", b"leader"),  # not a role we have
        (b"id", b"x" * 200),  # longer than any identity
        (b"id", "ÄÖÜ".encode()),  # not ASCII
        (b"id", b"a b"),
        (b"role", None),
    ])
    def test_an_out_of_bounds_field_drops_the_announcement(self, key, value):
        """A stranger's TXT field outside its bounds makes the whole announcement ignored."""
        properties = {**GOOD, key: value}
        assert None is parse_found("x._minitorrent._tcp.local.", ["192.0.2.7"], 5001, properties)

    @pytest.mark.parametrize("addresses,port", [([], 5001), (["fe80::1"], 5001), (["192.0.2.7"], 0),
                                                (["192.0.2.7"], None), (["192.0.2.7"], 70000)])
    def test_no_usable_address_drops_the_announcement(self, addresses, port):
        """Without an IPv4 address and a valid port there is nothing to connect to."""
        assert None is parse_found("x._minitorrent._tcp.local.", addresses, port, GOOD)


# What runs inside the namespace: one honest server, one that announces garbage, then a browse.
NETNS_SCRIPT = textwrap.dedent("""
    import json, socket
    from zeroconf import ServiceInfo, Zeroconf, IPVersion
    from minitorrent.net.discovery import SERVICE_TYPE, Announcer, browse

    honest = Announcer("main-server", "127.0.0.1", 5701, "ABCDEFG-HIJKLMN")
    honest.start("active", 4)
    liar = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    liar.register_service(ServiceInfo(
        SERVICE_TYPE, "liar." + SERVICE_TYPE, port=5702, addresses=[socket.inet_aton("127.0.0.1")],
        properties={"id": "X", "role": "active", "epoch": str(2**64)}, server="liar.local."))
    first = browse(3.0, ["127.0.0.1"])
    honest.update("standby", 5)
    second = browse(3.0, ["127.0.0.1"])
    honest.close()
    liar.close()
    everywhere = Announcer("all-interfaces", "0.0.0.0", 5703, "OPQRSTU-VWXYZAB")
    everywhere.start("active", 1)
    third = browse(3.0)
    everywhere.close()
    closed_first = Announcer("never", "127.0.0.1", 5704, "NEVERAN-NOUNCED")
    closed_first.close()
    closed_first.start("active", 9)
    fourth = browse(3.0)
    print(json.dumps([[vars(s) for s in found] for found in (first, second, third, fourth)]))
""")


class TestDiscoveryOnAPrivateLan:
    def test_a_server_is_found_and_a_liar_is_not(self):
        """Browsing finds the honest server with its identity, role and epoch, drops the malformed one,
        sees a role change, finds a server bound to every interface, and never one closed before it began."""
        reason = private_network_available()
        if reason:
            pytest.skip(reason)
        result = run_in_private_network(NETNS_SCRIPT)
        assert 0 == result.returncode, result.stderr
        first, second, third, fourth = json.loads(result.stdout.strip().splitlines()[-1])
        assert [("127.0.0.1", 5701, "ABCDEFG-HIJKLMN", "active", 4)] == [
            (s["host"], s["port"], s["identity"], s["role"], s["epoch"]) for s in first]
        assert [("standby", 5)] == [(s["role"], s["epoch"]) for s in second]
        assert [("127.0.0.1", 5703)] == [(s["host"], s["port"]) for s in third], "a server on 0.0.0.0"
        assert [] == fourth, "an announcer closed before it started announced nothing"


# A real main server announcing itself, and the client's `servers` command hearing it.
PROGRAMS_SCRIPT = textwrap.dedent("""
    import json, subprocess, sys, tempfile
    from pathlib import Path
    from minitorrent.common.launcher import ROOT, ServerProcess, write_config

    folder = Path(tempfile.mkdtemp())
    config = write_config(folder / "config.yaml", {
        "server": {"main": {"port": 0, "data_dir": "main"}, "backup": {"port": 0, "data_dir": "backup"}},
        "client": {"data_dir": "client"}, "logging": {"log_to_file": False}, "discovery": True})
    server = ServerProcess(config)
    try:
        heard = subprocess.run([sys.executable, str(ROOT / "client.py"), "--config", str(config),
                                "servers", "--json", "--seconds", "4"], capture_output=True, text=True, timeout=40)
    finally:
        server.stop()
    print(json.dumps({"port": server.address[1], "rc": heard.returncode, "out": heard.stdout, "err": heard.stderr}))
""")


class TestServersCommand:
    def test_client_servers_lists_a_running_main(self):
        """`client.py servers --json` hears a main server started with discovery: true, active."""
        reason = private_network_available()
        if reason:
            pytest.skip(reason)
        result = run_in_private_network(PROGRAMS_SCRIPT)
        assert 0 == result.returncode, result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert 0 == report["rc"], report["err"]
        found = json.loads(report["out"])
        assert [(report["port"], "active")] == [(s["port"], s["role"]) for s in found]

    def test_no_interface_to_listen_on_is_one_error_line(self):
        """Where no interface carries IPv4 (a namespace with loopback down), `servers` says so and exits 1."""
        reason = private_network_available()
        if reason:
            pytest.skip(reason)
        heard = subprocess.run(["unshare", "-n", sys.executable, str(ROOT / "client.py"), "servers", "--seconds", "1"],
                               capture_output=True, text=True, timeout=NETNS_TIMEOUT_S, check=False)
        said = heard.stderr.strip().splitlines()[-1]
        assert (1, True, False) == (heard.returncode, said.startswith("error: cannot listen for servers on this "
                                                                      "network: mDNS unavailable"),
                                    "Traceback" in heard.stderr), heard.stderr


class TestNoMulticastFromTheTestSuite:
    def test_configs_written_for_tests_and_benches_pin_discovery_off(self, tmp_path):
        """launcher.write_config sets discovery: false unless the caller sets it, so no test announces by accident."""
        from config_loader import load_config
        from minitorrent.common.launcher import write_config

        plain = load_config(write_config(tmp_path / "plain.yaml", {}))
        asked = load_config(write_config(tmp_path / "asked.yaml", {"discovery": True}))
        assert (False, True) == (plain.discovery, asked.discovery)
        assert "discovery: false" in (tmp_path / "plain.yaml").read_text(encoding="utf-8")

    def test_browsing_from_the_test_process_is_refused(self, no_multicast_on_the_host):
        """Outside a namespace a test cannot open mDNS sockets: the suite's guard refuses it and records it."""
        from conftest import MulticastOutsideANamespace

        from minitorrent.net.discovery import browse

        with pytest.raises(MulticastOutsideANamespace):
            browse(0.1)
        assert ["MainThread"] == no_multicast_on_the_host
        no_multicast_on_the_host.clear()  # this one was on purpose
