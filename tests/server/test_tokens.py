"""Web tokens (server/tokens.py): made from a key, checked in constant time against the paired list, shared by
the main and the backup, and asked for over the wire by a paired client."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import LONG_TIMEOUT, ROOT, client_config_for, make_config, write_config

from config_loader import load_config
from error_handler import RemoteError
from minitorrent.client.engine import ClientEngine
from minitorrent.server.access import AccessList
from minitorrent.server.backup import BackupServer
from minitorrent.server.main import MainServer
from minitorrent.server.engine import operator_token
from minitorrent.server.tokens import OPERATOR, WebTokens, token_key
from minitorrent.wire.identity import load_or_create
from minitorrent.wire.protocol import ErrorCode

PAIRED = {"server": {"access": "paired"}}


def client_of(tmp_path, address) -> ClientEngine:
    """A client engine with its own identity, of the server at ``address`` only."""
    settings = {"server": {"backup": {"port": 0}}, "client": {"retry_deadline": 1}}
    return ClientEngine(load_config(client_config_for(tmp_path / "cli", address, settings)))


@pytest.fixture
def access(tmp_path):
    """An AccessList in tmp_path, closed after the test."""
    access = AccessList(tmp_path / "srv")
    yield access
    access.close()


class TestTokens:
    def test_a_paired_clients_token_names_it(self, access, tmp_path):
        """token_for then holder gives back the paired identity."""
        identity = load_or_create(tmp_path / "cli").id
        access.pair(identity)
        tokens = WebTokens(token_key("secret", access), access)
        assert identity == tokens.holder(tokens.token_for(identity))

    def test_an_unpaired_or_revoked_identity_holds_nothing(self, access, tmp_path):
        """A well-made token of an identity not (or no longer) paired is nobody's."""
        identity = load_or_create(tmp_path / "cli").id
        tokens = WebTokens(token_key("secret", access), access)
        before = tokens.holder(tokens.token_for(identity))
        access.pair(identity)
        access.revoke(identity)
        assert (None, None) == (before, tokens.holder(tokens.token_for(identity)))

    def test_the_operator_holds_the_operator_token(self, access):
        """operator_token belongs to OPERATOR without any pairing."""
        tokens = WebTokens(token_key("secret", access), access)
        assert OPERATOR == tokens.holder(tokens.operator_token())

    @pytest.mark.parametrize("token", ["", "abc", "!" * 64, "A" * 64, "A" * 200, "A" * 63 + "\u00e9"])
    def test_malformed_tokens_are_nobodys(self, access, token):
        """Empty, short, non-base64, wrong-MAC, overlong or non-ASCII tokens hold nothing (and raise nothing)."""
        assert None == WebTokens(token_key("secret", access), access).holder(token)

    def test_another_secret_makes_other_tokens(self, access):
        """A token made with one shared secret is nobody's under another."""
        mine, theirs = WebTokens(token_key("one", access), access), WebTokens(token_key("two", access), access)
        assert None == theirs.holder(mine.operator_token())

    def test_without_a_secret_the_key_is_kept_in_access_db(self, tmp_path):
        """A main with no peer keeps one random key: a second AccessList on the folder makes the same tokens."""
        first, second = AccessList(tmp_path / "srv"), AccessList(tmp_path / "srv")
        try:
            tokens = [WebTokens(token_key("", a), a).operator_token() for a in (first, second)]
        finally:
            first.close()
            second.close()
        assert tokens[0] == tokens[1]

    def test_the_command_line_token_is_the_engines(self, server_factory, tmp_path):
        """operator_token(config, ...) beside a running main equals the engine's own (no peer: access.db's key)."""
        engine = server_factory(PAIRED)
        config = make_config(tmp_path / "srv", PAIRED)
        access = AccessList(config.server.main.data_dir)
        try:
            assert engine.operator_token() == operator_token(config, "main", access)
        finally:
            access.close()


class TestFailover:
    def test_main_and_backup_accept_the_same_tokens(self, tmp_path):
        """The main and the backup sharing a cluster key make the same tokens: a token outlives a failover."""
        shared = {"access": "paired", "cluster_key_file": str(tmp_path / "cluster.key")}
        main = MainServer(make_config(tmp_path / "main", {"server": {**shared, "backup": {"port": 5999}}}))
        backup = BackupServer(make_config(tmp_path / "backup", {"server": {**shared, "backup": {"port": 0}}}))
        identity = load_or_create(tmp_path / "cli").id
        try:
            backup.access.pair(identity)
            expected = (main.operator_token(), OPERATOR, identity)
            actual = (backup.operator_token(), backup.tokens.holder(main.operator_token()),
                      backup.tokens.holder(main.tokens.token_for(identity)))
        finally:
            for engine in (main, backup):
                engine.catalog.close()
                engine.access.close()
        assert expected == actual


class TestCommands:
    def test_main_and_backup_commands_print_the_same_token(self, tmp_path):
        """main_server.py token and backup_server.py token, on one shared secret, print the same 64 characters."""
        config = write_config(tmp_path, {"server": {"secret": "shared", "main": {"port": 5998, "data_dir": "m"},
                                                    "backup": {"port": 5999, "data_dir": "b"}}})
        printed = [subprocess.run([sys.executable, str(ROOT / program), "--config", str(config), "token"],
                                  capture_output=True, text=True, timeout=LONG_TIMEOUT)
                   for program in ("main_server.py", "backup_server.py")]
        main, backup = (p.stdout.strip() for p in printed)
        assert (0, 0, 64, main) == (printed[0].returncode, printed[1].returncode, len(main), backup)


class TestWebTokenRequest:
    def test_a_paired_client_gets_its_token_over_tls(self, tmp_path, server_factory):
        """After pairing, ClientEngine.web_token() is the token the server's face accepts for that client."""
        server = server_factory(PAIRED)
        client = client_of(tmp_path, server.server.address)
        try:
            client.pair(server.offer_pairing_code())
            token = client.web_token()
        finally:
            client.close()
        assert client.identity.id == server.tokens.holder(token)

    def test_an_unpaired_client_is_refused(self, tmp_path, server_factory):
        """An unpaired client asking for a token gets NOT_PAIRED."""
        server = server_factory(PAIRED)
        client = client_of(tmp_path, server.server.address)
        try:
            with pytest.raises(RemoteError) as refused:
                client.web_token()
        finally:
            client.close()
        assert ErrorCode.NOT_PAIRED == refused.value.code
