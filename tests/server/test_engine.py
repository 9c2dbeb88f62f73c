"""What both servers' engines share (server/engine.py): here, announcing on the LAN (``discovery: true``).

mDNS runs only inside a network namespace the test creates (see conftest's
``no_multicast_on_the_host``): each case is a script run there.
"""
from __future__ import annotations

import json
import textwrap

import pytest
from conftest import private_network_available, run_in_private_network

# A main announcing itself whose mDNS updates hang (or fail): does changing its role wait for them?
ROLE_CHANGE_SCRIPT = textwrap.dedent("""
    import json, tempfile, threading, time
    from pathlib import Path
    import zeroconf
    from config_loader import load_config
    from minitorrent.common.launcher import write_config
    from minitorrent.server.main import MainServer

    mode = "{mode}"
    registered, released = threading.Event(), threading.Event()
    register = zeroconf.Zeroconf.register_service

    def register_then_tell(self, *args, **kwargs):
        register(self, *args, **kwargs)
        registered.set()

    def update(self, info):
        if mode == "failing":
            raise zeroconf.EventLoopBlocked("the event loop did not answer in time")
        released.wait(60)  # a network that does not carry the announcement now

    zeroconf.Zeroconf.register_service, zeroconf.Zeroconf.update_service = register_then_tell, update
    folder = Path(tempfile.mkdtemp())
    config = load_config(write_config(folder / "config.yaml", {{
        "server": {{"main": {{"port": 0, "data_dir": "main"}}, "backup": {{"port": 0, "data_dir": "backup"}}}},
        "logging": {{"log_to_file": False}}, "discovery": True}}))
    threading.Timer(20, released.set).start()  # at the latest: the old way blocked until then
    engine = MainServer(config)
    outcome = {{"error": ""}}
    try:
        engine.start()  # the main takes the active role in here (no backup): a role change
    except Exception as error:
        outcome["error"] = type(error).__name__
    outcome["started_while_hanging"] = not released.is_set()
    registered.wait(30)
    deadline = time.monotonic() + 30
    while not engine.node.is_active() and time.monotonic() < deadline:
        time.sleep(0.05)

    def step_down():
        try:
            engine.node.step_down("a test")
        except Exception as error:
            outcome["error"] = outcome["error"] or type(error).__name__

    changer = threading.Thread(target=step_down, daemon=True)
    changer.start()
    changer.join(10)
    outcome["stepped_down_while_hanging"] = not changer.is_alive() and not released.is_set()
    released.set()
    engine.stop()
    print(json.dumps(outcome))
""")


class TestLanAnnouncement:
    @pytest.mark.parametrize("mode", ["hanging", "failing"])
    def test_a_role_change_never_waits_for_nor_fails_with_the_announcement(self, mode):
        """Re-announcing a new role is mDNS I/O (half a second, or an error): the thread changing the role goes on."""
        reason = private_network_available()
        if reason:
            pytest.skip(reason)
        result = run_in_private_network(ROLE_CHANGE_SCRIPT.format(mode=mode))
        assert 0 == result.returncode, result.stderr
        outcome = json.loads(result.stdout.strip().splitlines()[-1])
        assert {"error": "", "started_while_hanging": True, "stepped_down_while_hanging": True} == outcome
