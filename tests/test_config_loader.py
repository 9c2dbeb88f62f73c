"""Tests for config_loader: defaults, path resolution, and one-line errors."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import config_loader
from config_loader import (
    BackupServerConfig,
    ClientConfig,
    Config,
    LoggingConfig,
    MainServerConfig,
    ServerConfig,
    TransferConfig,
    config_from_mapping,
    load_config,
)
from error_handler import ConfigError

REPO_DIR = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO_DIR / "config.yaml"


def write_config(folder: Path, text: str, name: str = "config.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(write_config(tmp_path, text))


def config_error(tmp_path: Path, text: str) -> str:
    """Load ``text`` from a real file and return the ConfigError message."""
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def defaults_in(folder: Path) -> Config:
    """The pure defaults as they look when the config file lives in ``folder``."""
    return Config(
        server=ServerConfig(
            main=MainServerConfig(data_dir=folder / "data/main"),
            backup=BackupServerConfig(data_dir=folder / "data/backup"),
            cluster_key_file=folder / "cluster.key",
        ),
        client=ClientConfig(download_dir=folder / "downloads", data_dir=folder / "data/client"),
        transfer=TransferConfig(),
        logging=LoggingConfig(log_dir=folder / "logs"),
    )


def schema_keys(cls: type = Config, prefix: str = "") -> set[str]:
    """Every dotted key the dataclasses define (``source`` is not a file key)."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        if spec.name == "source":
            continue
        dotted = f"{prefix}{spec.name}"
        if dataclasses.is_dataclass(hints[spec.name]):
            keys |= schema_keys(hints[spec.name], dotted + ".")
        else:
            keys.add(dotted)
    return keys


def mapping_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        if isinstance(value, dict):
            keys |= mapping_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


class TestDefaults:
    def test_empty_file_gives_defaults(self, tmp_path):
        """An empty file is valid and yields every default."""
        path = write_config(tmp_path, "")
        assert dataclasses.replace(defaults_in(tmp_path), source=path) == load_config(path)

    def test_comments_only_file_gives_defaults(self, tmp_path):
        """A file holding only comments and blank lines yields every default."""
        path = write_config(tmp_path, "# nothing set\n\n   # still nothing\n")
        assert dataclasses.replace(defaults_in(tmp_path), source=path) == load_config(path)

    def test_source_is_the_loaded_file(self, tmp_path):
        """Config.source is the absolute path of the file that was read."""
        path = write_config(tmp_path, "")
        assert path == load_text(tmp_path, "").source

    def test_empty_section_gives_section_defaults(self, tmp_path):
        """A section written with nothing under it keeps its defaults."""
        config = load_text(tmp_path, "logging:\ntransfer:\n")
        assert defaults_in(tmp_path).logging == config.logging

    def test_partial_section_keeps_other_defaults(self, tmp_path):
        """Setting one key leaves its siblings at their defaults."""
        config = load_text(tmp_path, "server:\n  main:\n    port: 6000\n")
        expected = dataclasses.replace(defaults_in(tmp_path).server.main, port=6000)
        assert expected == config.server.main

    def test_values_from_file_are_used(self, tmp_path):
        """Values of every type are read from the file and converted."""
        config = load_text(
            tmp_path,
            "client: {seeding: false, seed_port: 7000, retry_deadline: 5}\n"
            "transfer: {chunk_size: 4096, io_timeout: 0.5}\n",
        )
        expected = (False, 7000, 5.0, 4096, 0.5)
        actual = (
            config.client.seeding,
            config.client.seed_port,
            config.client.retry_deadline,
            config.transfer.chunk_size,
            config.transfer.io_timeout,
        )
        assert expected == actual

    def test_float_field_accepts_int_and_stores_float(self, tmp_path):
        """An int given for a float key is stored as a float."""
        interval = load_text(tmp_path, "server: {backup: {heartbeat_interval: 1}}\n").server.backup
        assert (1.0, float) == (interval.heartbeat_interval, type(interval.heartbeat_interval))

    def test_log_level_is_case_insensitive_and_stored_upper(self, tmp_path):
        """'debug' in the file is stored as 'DEBUG'."""
        assert "DEBUG" == load_text(tmp_path, "logging: {level: debug}\n").logging.level

    @pytest.mark.parametrize("size", [1024, 16777216])
    def test_chunk_size_bounds_are_inclusive(self, tmp_path, size):
        """chunk_size accepts exactly 1 KiB and exactly 16 MiB."""
        assert size == load_text(tmp_path, f"transfer: {{chunk_size: {size}}}\n").transfer.chunk_size

    def test_missing_default_file_gives_defaults_beside_program(self, tmp_path, monkeypatch):
        """With no path and no default file, defaults resolve against the program folder."""
        monkeypatch.setattr(config_loader, "default_config_path", lambda: tmp_path / "config.yaml")
        assert defaults_in(tmp_path) == load_config()

    def test_no_path_loads_the_default_file(self, tmp_path, monkeypatch):
        """With no path, the default config file is the one loaded."""
        path = write_config(tmp_path, "server: {main: {port: 6123}}\n")
        monkeypatch.setattr(config_loader, "default_config_path", lambda: path)
        assert (path, 6123) == (load_config().source, load_config().server.main.port)

    def test_default_config_path_is_beside_module(self):
        """default_config_path() is config.yaml in config_loader's folder."""
        assert SHIPPED_CONFIG == config_loader.default_config_path()


class TestHttpPort:
    @pytest.mark.parametrize("value", [-1, 0, 8080])
    def test_off_any_or_a_port(self, tmp_path, value):
        """http_port takes -1 (off), 0 (any free port) or a port."""
        config = load_text(tmp_path, f"server: {{main: {{http_port: {value}}}, backup: {{http_port: {value}}}}}")
        assert (value, value) == (config.server.main.http_port, config.server.backup.http_port)

    def test_defaults(self, tmp_path):
        """The web faces default to 5080 (main) and 5081 (backup)."""
        config = load_text(tmp_path, "")
        assert (5080, 5081) == (config.server.main.http_port, config.server.backup.http_port)


class TestShippedConfig:
    def test_shipped_file_equals_defaults(self):
        """The shipped config.yaml sets every key to its default."""
        loaded = load_config(SHIPPED_CONFIG)
        assert defaults_in(REPO_DIR) == dataclasses.replace(loaded, source=None)

    def test_shipped_file_documents_every_key_and_nothing_else(self):
        """config.yaml lists exactly the keys the schema defines."""
        data = yaml.safe_load(SHIPPED_CONFIG.read_text(encoding="utf-8"))
        assert schema_keys() == mapping_keys(data)


class TestPaths:
    def test_relative_paths_resolve_against_config_folder(self, tmp_path, monkeypatch):
        """Relative paths are joined to the config file's folder, not the cwd."""
        conf_dir = tmp_path / "conf"
        conf_dir.mkdir()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        path = write_config(conf_dir, "client: {download_dir: ../dl, data_dir: state}\n")
        client = load_config(path).client
        assert (tmp_path / "dl", conf_dir / "state") == (client.download_dir, client.data_dir)

    def test_relative_config_path_is_taken_from_cwd(self, tmp_path, monkeypatch):
        """A relative --config path is found from the cwd and made absolute."""
        write_config(tmp_path, "")
        monkeypatch.chdir(tmp_path)
        config = load_config("config.yaml")
        assert (tmp_path / "config.yaml", tmp_path / "logs") == (config.source, config.logging.log_dir)

    def test_default_paths_are_absolute(self, tmp_path):
        """Paths not given in the file are still absolute, under the config folder."""
        assert tmp_path / "data/main" == load_text(tmp_path, "").server.main.data_dir

    def test_absolute_path_is_kept(self, tmp_path):
        """An absolute path in the file is used as is."""
        target = tmp_path / "abs" / "logs"
        assert target == load_text(tmp_path, f"logging: {{log_dir: '{target}'}}\n").logging.log_dir

    def test_tilde_is_expanded(self, tmp_path, monkeypatch):
        """'~' in a path means the user's home folder."""
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        config = load_text(tmp_path, "client: {download_dir: ~/Downloads}\n")
        assert tmp_path / "home" / "Downloads" == config.client.download_dir

    def test_config_from_mapping_resolves_against_base_dir(self, tmp_path):
        """config_from_mapping resolves paths against the base_dir it is given."""
        config = config_from_mapping({"server": {"backup": {"data_dir": "b"}}}, tmp_path)
        assert tmp_path / "b" == config.server.backup.data_dir


class TestFileErrors:
    def test_missing_explicit_file_is_an_error(self, tmp_path):
        """An explicitly named file that does not exist raises ConfigError."""
        path = tmp_path / "absent.yaml"
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert f"{path}: config file not found" == str(caught.value)

    def test_unreadable_file_is_an_error(self, tmp_path):
        """A path that cannot be read (here a folder) gives a one-line ConfigError."""
        with pytest.raises(ConfigError) as caught:
            load_config(tmp_path)
        assert str(caught.value).startswith(f"{tmp_path}: cannot read config file:")

    def test_yaml_syntax_error_names_file_and_line(self, tmp_path):
        """Invalid YAML gives one line with the file and the line number."""
        message = config_error(tmp_path, "server:\n  main: [1, 2\n  backup: {}\n")
        assert (True, True, False) == (
            message.startswith(f"{tmp_path / 'config.yaml'}: line "),
            "invalid YAML" in message,
            "\n" in message,
        )

    def test_bad_encoding_is_one_line(self, tmp_path):
        """Bytes that are not UTF-8 give a one-line YAML error, not a traceback."""
        path = tmp_path / "config.yaml"
        path.write_bytes(b"logging: {level: \xc3\x28}\n")
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert (True, False) == ("invalid YAML" in str(caught.value), "\n" in str(caught.value))

    def test_duplicate_key_is_an_error(self, tmp_path):
        """A key written twice in one mapping is refused instead of silently overwritten."""
        message = config_error(tmp_path, "transfer:\n  chunk_size: 4096\n  chunk_size: 8192\n")
        assert f"{tmp_path / 'config.yaml'}: line 3, column 3: invalid YAML: duplicate key 'chunk_size'" == message


class TestStructureErrors:
    @pytest.mark.parametrize(
        ("text", "expected_key"),
        [
            ("colour: blue\n", "colour"),
            ("server:\n  middle: {}\n", "server.middle"),
            ("server:\n  main:\n    prot: 5001\n", "server.main.prot"),
            ("transfer:\n  chunksize: 4096\n", "transfer.chunksize"),
        ],
    )
    def test_unknown_key_is_named_with_its_dotted_path(self, tmp_path, text, expected_key):
        """An unknown key at any level is named with its dotted path."""
        message = config_error(tmp_path, text)
        assert f"{tmp_path / 'config.yaml'}: {expected_key}: unknown key (allowed here: " == (
            message[: message.index("(allowed here: ") + len("(allowed here: ")]
        )

    def test_unknown_key_lists_allowed_keys(self, tmp_path):
        """The unknown-key message lists the keys allowed in that section."""
        message = config_error(tmp_path, "logging: {colour: true}\n")
        assert message.endswith("(allowed here: level, log_to_file, log_dir)")

    @pytest.mark.parametrize(
        ("text", "expected_key", "got"),
        [
            ("transfer: 5\n", "transfer", "5"),
            ("server:\n  main: [1, 2]\n", "server.main", "a list"),
            ("logging: verbose\n", "logging", "'verbose'"),
        ],
    )
    def test_section_that_is_not_a_mapping(self, tmp_path, text, expected_key, got):
        """A section holding a scalar or list is refused, naming the section."""
        expected = f"{tmp_path / 'config.yaml'}: {expected_key}: must be a mapping of keys, got {got}"
        assert expected == config_error(tmp_path, text)

    @pytest.mark.parametrize(("text", "got"), [("- a\n- b\n", "a list"), ("hello\n", "'hello'")])
    def test_root_that_is_not_a_mapping(self, tmp_path, text, got):
        """A file whose top level is not a mapping is refused."""
        expected = f"{tmp_path / 'config.yaml'}: top level: must be a mapping of keys, got {got}"
        assert expected == config_error(tmp_path, text)


class TestTypeErrors:
    @pytest.mark.parametrize(
        ("text", "expected_tail"),
        [
            ("server: {main: {port: true}}", "server.main.port: must be an integer from 0 to 65535, got true"),
            ("server: {main: {port: 5001.0}}", "server.main.port: must be an integer from 0 to 65535, got 5001.0"),
            ("server: {main: {port: '5001'}}", "server.main.port: must be an integer from 0 to 65535, got '5001'"),
            ("server: {main: {port: }}", "server.main.port: must be an integer from 0 to 65535, got null"),
            ("transfer: {chunk_size: 4096.5}", "transfer.chunk_size: must be an integer from 1024 to 16777216, got 4096.5"),
            ("transfer: {max_connections: [1]}", "transfer.max_connections: must be an integer >= 1, got a list"),
            ("server: {backup: {heartbeat_interval: true}}", "server.backup.heartbeat_interval: must be a number of seconds > 0, got true"),
            ("server: {backup: {heartbeat_interval: '2'}}", "server.backup.heartbeat_interval: must be a number of seconds > 0, got '2'"),
            ("client: {seeding: 'yes'}", "client.seeding: must be true or false, got 'yes'"),
            ("client: {seeding: 1}", "client.seeding: must be true or false, got 1"),
            ("server: {main: {host: 10}}", "server.main.host: must be a non-empty string, got 10"),
            ("logging: {level: 10}", "logging.level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 10"),
            ("logging: {log_dir: 5}", "logging.log_dir: must be a path (a non-empty string), got 5"),
            ("client: {data_dir: ''}", "client.data_dir: must be a path (a non-empty string), got ''"),
        ],
    )
    def test_wrong_type_names_the_key(self, tmp_path, text, expected_tail):
        """A value of the wrong type gives one line naming the file and dotted key."""
        assert f"{tmp_path / 'config.yaml'}: {expected_tail}" == config_error(tmp_path, text + "\n")


class TestValueErrors:
    @pytest.mark.parametrize(
        ("text", "expected_tail"),
        [
            ("server: {main: {port: 70000}}", "server.main.port: must be an integer from 0 to 65535, got 70000"),
            ("server: {backup: {port: -1}}", "server.backup.port: must be an integer from 0 to 65535, got -1"),
            ("client: {seed_port: 65536}", "client.seed_port: must be an integer from 0 to 65535, got 65536"),
            ("server: {main: {http_port: -2}}",
             "server.main.http_port: must be an integer from 0 to 65535, or -1 (off), got -2"),
            ("server: {backup: {http_port: 65536}}",
             "server.backup.http_port: must be an integer from 0 to 65535, or -1 (off), got 65536"),
            ("transfer: {chunk_size: 1023}", "transfer.chunk_size: must be an integer from 1024 to 16777216, got 1023"),
            ("transfer: {chunk_size: 16777217}", "transfer.chunk_size: must be an integer from 1024 to 16777216, got 16777217"),
            ("transfer: {max_connections: 0}", "transfer.max_connections: must be an integer >= 1, got 0"),
            ("transfer: {pool_size: 0}", "transfer.pool_size: must be an integer >= 1, got 0"),
            ("transfer: {pipeline_depth: 0}", "transfer.pipeline_depth: must be an integer from 1 to 64, got 0"),
            ("transfer: {pipeline_depth: 65}", "transfer.pipeline_depth: must be an integer from 1 to 64, got 65"),
            ("transfer: {idle_timeout: 0}", "transfer.idle_timeout: must be a number of seconds > 0, got 0"),
            ("transfer: {io_timeout: -1.5}", "transfer.io_timeout: must be a number of seconds > 0, got -1.5"),
            ("transfer: {io_timeout: .inf}", "transfer.io_timeout: must be a number of seconds > 0, got inf"),
            ("client: {retry_deadline: 0}", "client.retry_deadline: must be a number of seconds > 0, got 0"),
            ("server: {backup: {heartbeat_interval: 0}}", "server.backup.heartbeat_interval: must be a number of seconds > 0, got 0"),
            ("server: {backup: {heartbeat_timeout: 2}}", "server.backup.heartbeat_timeout: must be greater than heartbeat_interval (2), got 2"),
            (
                "server: {backup: {heartbeat_interval: 10, heartbeat_timeout: 5}}",
                "server.backup.heartbeat_timeout: must be greater than heartbeat_interval (10), got 5",
            ),
            ("logging: {level: verbose}", "logging.level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'verbose'"),
            ("server: {main: {host: ''}}", "server.main.host: must be a non-empty string, got ''"),
        ],
    )
    def test_invalid_value_names_the_key(self, tmp_path, text, expected_tail):
        """An out-of-range value gives one line naming the file, dotted key and value."""
        assert f"{tmp_path / 'config.yaml'}: {expected_tail}" == config_error(tmp_path, text + "\n")

    def test_mapping_errors_without_source_say_config(self, tmp_path):
        """config_from_mapping with no source prefixes its errors with 'config'."""
        with pytest.raises(ConfigError) as caught:
            config_from_mapping({"transfer": {"pool_size": 0}}, tmp_path)
        assert "config: transfer.pool_size: must be an integer >= 1, got 0" == str(caught.value)

    def test_backup_config_checks_itself_when_built(self):
        """BackupServerConfig refuses a timeout not above the interval even when built directly."""
        with pytest.raises(ValueError):
            BackupServerConfig(heartbeat_interval=3.0, heartbeat_timeout=3.0)


class TestPortProperty:
    @given(port=st.one_of(st.integers(max_value=-1), st.integers(min_value=65536)))
    def test_port_outside_range_is_rejected(self, port):
        """Any integer port outside 0..65535 raises a one-line ConfigError naming the key."""
        with pytest.raises(ConfigError) as caught:
            config_from_mapping({"server": {"main": {"port": port}}}, Path("/"))
        expected = f"config: server.main.port: must be an integer from 0 to 65535, got {port}"
        assert expected == str(caught.value)

    @given(port=st.integers(min_value=0, max_value=65535))
    def test_port_inside_range_is_accepted(self, port):
        """Any integer port in 0..65535 is accepted as given."""
        config = config_from_mapping({"client": {"seed_port": port}}, Path("/"))
        assert port == config.client.seed_port


class TestClusterSettings:
    ETCD = ("cluster: {mode: etcd, name: b, ack: quorum, etcd: {endpoints: ['http://127.0.0.1:12379'], prefix: /t},"
            " servers: [{name: a, port: 7101, data_dir: d/a}, {name: b, host: 127.0.0.2, port: 7102}]}")

    def test_default_is_a_pair(self, tmp_path):
        """No cluster section: pair mode, leader acks, no members, etcd's usual local endpoint."""
        cluster = load_text(tmp_path, "").cluster
        assert ("pair", "leader", (), ("http://127.0.0.1:2379",)) == (
            cluster.mode, cluster.ack, cluster.servers, cluster.etcd.endpoints)

    def test_etcd_members_are_read_with_their_paths_resolved(self, tmp_path):
        """Each member keeps its name and address; relative data folders resolve against the config's folder."""
        cluster = load_text(tmp_path, self.ETCD).cluster
        assert [("a", "127.0.0.1", 7101, tmp_path / "d" / "a"), ("b", "127.0.0.2", 7102, tmp_path / "data" / "member")] \
            == [(m.name, m.host, m.port, m.data_dir) for m in cluster.servers]
        assert ("etcd", "b", "quorum", ("http://127.0.0.1:12379",), "/t", 7102) == (
            cluster.mode, cluster.name, cluster.ack, cluster.etcd.endpoints, cluster.etcd.prefix,
            cluster.member("b").port)

    @pytest.mark.parametrize(
        ("text", "expected_tail"),
        [
            ("cluster: {mode: raft}", "cluster.mode: must be pair or etcd, got 'raft'"),
            ("cluster: {ack: all}", "cluster.ack: must be leader or quorum, got 'all'"),
            ("cluster: {servers: a}", "cluster.servers: must be a list, got 'a'"),
            ("cluster: {servers: [{name: a}]}", "cluster.servers[0].port: must be set to an integer from 1 to 65535"),
            ("cluster: {servers: [{port: 1}]}", "cluster.servers[0].name: must be set (each member of cluster.servers "
                                                 "needs a unique name)"),
            ("cluster: {servers: [{name: a, port: 1, colour: red}]}",
             "cluster.servers[0].colour: unknown key (allowed here: name, host, port, data_dir)"),
            ("cluster: {servers: [{name: a, port: 1}, {name: a, port: 2}]}",
             "cluster.servers: must have unique names, got 'a' twice"),
            ("cluster: {mode: etcd, servers: [{name: a, port: 1}]}",
             "cluster.servers: must list at least 2 members in etcd mode, got 1"),
            ("cluster: {name: z, servers: [{name: a, port: 1}]}",
             "cluster.name: must be one of the names in cluster.servers, got 'z'"),
            ("cluster: {etcd: {endpoints: []}}", "cluster.etcd.endpoints: must be a non-empty list of http:// URLs, "
                                                  "got a list"),
            ("cluster: {etcd: {endpoints: ['127.0.0.1:2379']}}",
             "cluster.etcd.endpoints: must be a non-empty list of http:// URLs, got a list"),
            ("cluster: {etcd: {endpoints: [2379]}}", "cluster.etcd.endpoints[0]: must be a string, got 2379"),
            ("cluster: {etcd: {endpoints: http://x}}", "cluster.etcd.endpoints: must be a list, got 'http://x'"),
        ],
    )
    def test_bad_cluster_value_names_the_key(self, tmp_path, text, expected_tail):
        """Every wrong cluster setting is a one-line error naming the key (list items by index)."""
        with pytest.raises(ConfigError) as caught:
            load_text(tmp_path, text)
        message = str(caught.value)
        assert (True, 1) == (message.endswith(expected_tail), len(message.splitlines())), message


class TestDiscoveryKey:
    @pytest.mark.parametrize("text,expected", [("", None), ("discovery:\n", None), ("discovery: true\n", True),
                                               ("discovery: false\n", False)])
    def test_discovery_is_unset_unless_written(self, tmp_path, text, expected):
        """An empty file (or `discovery:` alone) leaves discovery unset (None); true and false are kept."""
        path = tmp_path / "config.yaml"
        path.write_text(text, encoding="utf-8")
        assert expected == load_config(path).discovery

    def test_a_non_boolean_discovery_is_a_clear_error(self, tmp_path):
        """`discovery: yes please` names the key and the rule."""
        path = tmp_path / "bad.yaml"
        path.write_text("discovery: yes please\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=r"discovery: must be true or false"):
            load_config(path)
