"""Load ``config.yaml`` into frozen dataclasses, with a default for every key.

The dataclasses below *are* the schema: each field's type, default and rule
(``_setting``) describe one key, and one walker (``_build``) merges a parsed
YAML mapping over them and validates it. Adding a key means adding one field.

Contract:

* An empty file, or one holding only comments, gives the defaults. A section
  written with no keys under it (``logging:``) also gives its defaults.
* Every ``Path`` in the result is absolute: relative paths are resolved
  against the folder holding the config file (never the current directory),
  and ``~`` is expanded.
* Every problem raises ``error_handler.ConfigError`` whose message is one line:
  ``<file>: <dotted.key>: must be <rule>, got <value>``.

All functions are pure apart from reading the file, so any thread may call them.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from error_handler import ConfigError

CONFIG_FILE_NAME = "config.yaml"
MAX_PORT = 65535
MIN_CHUNK_SIZE_BYTES = 1024  # smaller chunks make the manifest bigger than the data it guards
MAX_CHUNK_SIZE_BYTES = 16 * 1024 * 1024  # one chunk is held in memory per transfer
MAX_PIPELINE_DEPTH = 64  # in-flight chunks per connection; beyond this only memory grows
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# --------------------------------------------------------------------- schema
def _setting(
    default: Any,
    must: str | None = None,
    ok: Callable[[Any], bool] | None = None,
    normalize: Callable[[Any], Any] | None = None,
) -> Any:
    """Declare one config key: its default, and the rule a file value must meet.

    ``must`` is the rule as read in an error ("an integer from 0 to 65535");
    without it the rule is just the type. ``ok`` runs after the type check and
    after ``normalize``.
    """
    return field(default=default, metadata={"must": must, "ok": ok, "normalize": normalize})


def _int_range(low: int, high: int | None = None) -> dict[str, Any]:
    if high is None:
        return {"must": f"an integer >= {low}", "ok": lambda v: v >= low}
    return {"must": f"an integer from {low} to {high}", "ok": lambda v: low <= v <= high}


_PORT = _int_range(0, MAX_PORT)  # 0 asks the OS for any free port (tests rely on it)
HTTP_OFF = -1  # an http_port of -1 turns a server's web face (page, API, metrics, HTTP downloads) off
_HTTP_PORT = {"must": f"an integer from 0 to {MAX_PORT}, or {HTTP_OFF} (off)",
              "ok": lambda v: v == HTTP_OFF or 0 <= v <= MAX_PORT}
_POSITIVE_SECONDS = {"must": "a number of seconds > 0", "ok": lambda v: v > 0}
_HOST = {"must": "a non-empty string", "ok": lambda v: v.strip() != ""}
# An identity as `client.py status` shows it (its check characters are checked where it is used).
_IDENTITY = {"must": "empty or an identity (8 groups of 7 letters A-Z and digits 2-7, joined by dashes)",
             "ok": lambda v: v == "" or re.fullmatch(r"[A-Z2-7]{7}(-[A-Z2-7]{7}){7}", v) is not None,
             "normalize": lambda v: v.strip().upper()}


class _RelationError(ValueError):
    """A value that is fine alone but conflicts with another key of its section."""

    def __init__(self, key: str, text: str) -> None:
        super().__init__(f"{key}: {text}")
        self.key = key
        self.text = text


@dataclass(frozen=True)
class MainServerConfig:
    """Where the main server listens and keeps its catalog."""

    host: str = _setting("127.0.0.1", **_HOST)
    port: int = _setting(5001, **_PORT)
    data_dir: Path = _setting(Path("data/main"))
    http_port: int = _setting(5080, **_HTTP_PORT)
    http_tls: bool = _setting(True)  # false: plain HTTP, and then only on a loopback host (web/face.py)
    id: str = _setting("", **_IDENTITY)


@dataclass(frozen=True)
class BackupServerConfig:
    """Where the backup listens, and how fast it notices the main is gone.

    Raises ``ValueError`` when built with ``heartbeat_timeout`` not greater
    than ``heartbeat_interval`` (a single late heartbeat would cause failover).
    """

    host: str = _setting("127.0.0.1", **_HOST)
    port: int = _setting(5002, **_PORT)
    data_dir: Path = _setting(Path("data/backup"))
    http_port: int = _setting(5081, **_HTTP_PORT)
    http_tls: bool = _setting(True)
    id: str = _setting("", **_IDENTITY)
    heartbeat_interval: float = _setting(2.0, **_POSITIVE_SECONDS)
    heartbeat_timeout: float = _setting(6.0, **_POSITIVE_SECONDS)
    failback: str = _setting(
        "auto", must="auto or manual", ok=lambda v: v in ("auto", "manual"), normalize=str.lower
    )

    def __post_init__(self) -> None:
        if not self.heartbeat_timeout > self.heartbeat_interval:
            raise _RelationError(
                "heartbeat_timeout",
                f"must be greater than heartbeat_interval ({self.heartbeat_interval:g}),"
                f" got {self.heartbeat_timeout:g}",
            )


@dataclass(frozen=True)
class ServerConfig:
    """Both servers, and the secret their peer connections prove they share."""

    main: MainServerConfig = field(default_factory=MainServerConfig)
    backup: BackupServerConfig = field(default_factory=BackupServerConfig)
    secret: str = _setting("")
    cluster_key_file: Path = _setting(Path("cluster.key"))
    access: str = _setting("open", must="open or paired", ok=lambda v: v in ("open", "paired"), normalize=str.lower)


@dataclass(frozen=True)
class ClientConfig:
    """Client folders and seeding; ``retry_deadline`` is in seconds."""

    download_dir: Path = _setting(Path("downloads"))
    data_dir: Path = _setting(Path("data/client"))
    seeding: bool = _setting(True)
    seed_port: int = _setting(0, **_PORT)
    retry_deadline: float = _setting(30.0, **_POSITIVE_SECONDS)


@dataclass(frozen=True)
class TransferConfig:
    """Chunking, connection caps and socket timeouts (seconds)."""

    chunk_size: int = _setting(1048576, **_int_range(MIN_CHUNK_SIZE_BYTES, MAX_CHUNK_SIZE_BYTES))
    max_connections: int = _setting(10, **_int_range(1))
    idle_timeout: float = _setting(30.0, **_POSITIVE_SECONDS)
    io_timeout: float = _setting(10.0, **_POSITIVE_SECONDS)
    pipeline_depth: int = _setting(8, **_int_range(1, MAX_PIPELINE_DEPTH))
    pool_size: int = _setting(4, **_int_range(1))
    upload_limit: int = _setting(0, **_int_range(0))
    download_limit: int = _setting(0, **_int_range(0))
    announce_interval: float = _setting(10.0, **_POSITIVE_SECONDS)
    encrypt: bool = _setting(True)


@dataclass(frozen=True)
class LoggingConfig:
    """``level`` is always one of ``LOG_LEVELS`` (upper-case)."""

    level: str = _setting(
        "INFO", must=f"one of {', '.join(LOG_LEVELS)}", ok=LOG_LEVELS.__contains__, normalize=str.upper
    )
    log_to_file: bool = _setting(True)
    log_dir: Path = _setting(Path("logs"))


@dataclass(frozen=True)
class MemberConfig:
    """One server of an etcd cluster: its name, address and data folder."""

    name: str = _setting("", must="a non-empty name", ok=lambda v: v.strip() != "")
    host: str = _setting("127.0.0.1", **_HOST)
    port: int = _setting(0, **_int_range(1, MAX_PORT))  # clients must know it: no "any free port" here
    data_dir: Path = _setting(Path("data/member"))

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise _RelationError("name", "must be set (each member of cluster.servers needs a unique name)")
        if self.port == 0:
            raise _RelationError("port", "must be set to an integer from 1 to 65535")


@dataclass(frozen=True)
class EtcdConfig:
    """Where etcd's v3 JSON gateway listens, and the prefix of this cluster's keys."""

    endpoints: tuple[str, ...] = _setting(
        ("http://127.0.0.1:2379",), must="a non-empty list of http:// URLs",
        ok=lambda v: bool(v) and all(u.startswith("http://") and len(u) > 7 for u in v))
    prefix: str = _setting("/minitorrent", must="a key prefix starting with /", ok=lambda v: v.startswith("/"))


@dataclass(frozen=True)
class ClusterConfig:
    """pair (a main and a backup, the default) or etcd (any number of servers, one leader elected in etcd)."""

    mode: str = _setting("pair", must="pair or etcd", ok=lambda v: v in ("pair", "etcd"), normalize=str.lower)
    name: str = _setting("")  # which of ``servers`` this program is (etcd mode, servers only)
    ack: str = _setting("leader", must="leader or quorum", ok=lambda v: v in ("leader", "quorum"),
                        normalize=str.lower)
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    servers: tuple[MemberConfig, ...] = ()

    def __post_init__(self) -> None:
        names = [member.name for member in self.servers]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise _RelationError("servers", f"must have unique names, got {duplicate!r} twice")
        if self.mode == "etcd" and len(self.servers) < 2:
            raise _RelationError("servers", f"must list at least 2 members in etcd mode, got {len(self.servers)}")
        if self.name and self.name not in names:
            raise _RelationError("name", f"must be one of the names in cluster.servers, got {self.name!r}")

    def member(self, name: str) -> MemberConfig:
        """The member called ``name``; ``KeyError`` if there is none."""
        for member in self.servers:
            if member.name == name:
                return member
        raise KeyError(name)


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``source`` is the file it came from (None: defaults)."""

    server: ServerConfig = field(default_factory=ServerConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Servers found on the LAN by mDNS. true: servers announce themselves and a client
    # window with no configured server answering listens for them; false: neither.
    # Unset (None): servers stay silent (an announcement tells the whole network a
    # server is here) but a client window still listens, so a client with no server
    # configured finds the servers that opted in.
    discovery: bool | None = _setting(None)
    source: Path | None = field(default=None, metadata={"internal": True})


# -------------------------------------------------------------- type checking
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # inf would pass "> 0" yet break socket.settimeout; nan fails every comparison.
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


# type -> (rule when the field states none, accepts, converts)
_KINDS: dict[type, tuple[str, Callable[[Any], bool], Callable[[Any], Any]]] = {
    int: ("an integer", _is_int, int),
    float: ("a number", _is_number, float),
    bool: ("true or false", lambda v: isinstance(v, bool), bool),
    str: ("a string", lambda v: isinstance(v, str), str),
    Path: ("a path (a non-empty string)", lambda v: isinstance(v, str) and v != "", str),
}


def _describe(value: Any) -> str:
    """Render a YAML value for a one-line error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple, set)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _optional(kind: Any) -> type | None:
    """``X`` for a field typed ``X | None`` (its value may be unset), else None."""
    args = get_args(kind)
    if len(args) == 2 and type(None) in args:
        return next(arg for arg in args if arg is not type(None))
    return None


# ---------------------------------------------------------------------- walker
class _Problem(Exception):
    """Raised inside the walker; turned into a ConfigError naming the file."""

    def __init__(self, key: str, text: str) -> None:
        super().__init__(f"{key}: {text}")


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _resolve(raw: str | Path, base_dir: Path) -> Path:
    return Path(os.path.normpath(base_dir / os.path.expanduser(raw)))


def _value(spec: Any, kind: type, raw: Any, key: str, base_dir: Path) -> Any:
    """Check one file value against its field and return it converted."""
    default_rule, accepts, convert = _KINDS[kind]
    rule = spec.metadata.get("must") or default_rule
    if not accepts(raw):
        raise _Problem(key, f"must be {rule}, got {_describe(raw)}")
    value = convert(raw)
    normalize, ok = spec.metadata.get("normalize"), spec.metadata.get("ok")
    if normalize:
        value = normalize(value)
    if ok and not ok(value):
        raise _Problem(key, f"must be {rule}, got {_describe(raw)}")
    return _resolve(value, base_dir) if kind is Path else value


def _list(spec: Any, kind: type, raw: Any, key: str, base_dir: Path) -> tuple:
    """Check a YAML list item by item (``key[i]`` in errors), then the whole list against the field's rule."""
    if not isinstance(raw, list):
        raise _Problem(key, f"must be a list, got {_describe(raw)}")
    if is_dataclass(kind):
        return tuple(_build(kind, item, f"{key}[{i}]", base_dir) for i, item in enumerate(raw))
    items = tuple(_value(_PLAIN, kind, item, f"{key}[{i}]", base_dir) for i, item in enumerate(raw))
    ok = spec.metadata.get("ok")
    if ok and not ok(items):
        raise _Problem(key, f"must be {spec.metadata.get('must')}, got {_describe(raw)}")
    return items


_PLAIN = field(metadata={})  # an item of a list: only its type is checked here


def _build(cls: type, data: Any, where: str, base_dir: Path, **extra: Any) -> Any:
    """Merge ``data`` over the defaults of dataclass ``cls``, recursing into sections."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise _Problem(where or "top level", f"must be a mapping of keys, got {_describe(data)}")
    settable = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    unknown = [key for key in data if key not in settable]
    if unknown:
        allowed = ", ".join(settable)
        raise _Problem(_join(where, unknown[0]), f"unknown key (allowed here: {allowed})")
    hints = get_type_hints(cls)
    values = {}
    for name, spec in settable.items():
        key, kind = _join(where, name), hints[name]
        if is_dataclass(kind):
            values[name] = _build(kind, data.get(name), key, base_dir)
        elif get_origin(kind) is tuple and name in data:
            values[name] = _list(spec, get_args(kind)[0], data[name], key, base_dir)
        elif name in data and data[name] is None and _optional(kind):
            values[name] = None  # written with no value (``discovery:``): as if unset
        elif name in data:
            values[name] = _value(spec, _optional(kind) or kind, data[name], key, base_dir)
        elif kind is Path:
            values[name] = _resolve(spec.default, base_dir)
    try:
        return cls(**values, **extra)
    except _RelationError as error:
        raise _Problem(_join(where, error.key), error.text) from None


# ------------------------------------------------------------------ public API
def default_config_path() -> Path:
    """Return the ``config.yaml`` beside this module (it may not exist)."""
    return Path(__file__).resolve().parent / CONFIG_FILE_NAME


def config_from_mapping(
    data: Mapping[str, Any] | None, base_dir: Path, source: Path | None = None
) -> Config:
    """Validate parsed YAML ``data`` (None = empty) over the defaults.

    Relative paths are resolved against ``base_dir``. Raises ``ConfigError``
    (one line, prefixed with ``source`` or "config") on any unknown key, wrong
    type or invalid value.
    """
    base_dir = Path(os.path.expanduser(base_dir)).absolute()
    try:
        return _build(Config, data, "", base_dir, source=source)
    except _Problem as problem:
        raise ConfigError(f"{source or 'config'}: {problem}") from None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate a YAML config file.

    ``path`` None means ``default_config_path()``; if that file is missing the
    result is the pure defaults with paths relative to this module's folder.
    An explicit path that does not exist, cannot be read, is not valid YAML or
    holds a bad value raises ``ConfigError`` with a one-line message.
    """
    if path is None:
        path = default_config_path()
        if not path.exists():
            return config_from_mapping(None, path.parent)
    source = Path(os.path.expanduser(os.fspath(path))).absolute()
    return config_from_mapping(_read_yaml(source), source.parent, source)


# ------------------------------------------------------------------ YAML input
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which PyYAML silently overwrites."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable key: SafeLoader reports it below
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_describe(key)}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line for a YAML error: line, column and what went wrong."""
    text = str(error)
    where = ""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        text = "; ".join(part for part in (error.context, error.problem) if part) or text
        if mark is not None:
            where = f"line {mark.line + 1}, column {mark.column + 1}: "
    return f"{where}invalid YAML: {' '.join(text.split())}"


def _read_yaml(source: Path) -> Any:
    try:
        raw = source.read_bytes()  # bytes let PyYAML honour a UTF-16 BOM
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except OSError as error:
        raise ConfigError(f"{source}: cannot read config file: {error.strerror or error}") from None
    try:
        return yaml.load(raw, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: {_yaml_problem(error)}") from None
