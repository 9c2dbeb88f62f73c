"""Configure the root logger once per program from ``LoggingConfig``.

Every module gets its own logger with ``log = logging.getLogger(__name__)``
(one logger per module, named after it) and never adds handlers itself; only
the program's entry point calls ``setup_logging``. Records go to stderr and,
when ``log_to_file`` is set, to ``<log_dir>/<program>.log``, rotated at
5 MiB with 5 old files kept.

``setup_logging`` is idempotent: a second call replaces the handlers the first
one installed and leaves handlers installed by anyone else (for example
pytest's caplog) alone. Call it from one thread at start-up.
"""
from __future__ import annotations

import logging
import sys
import threading

from config_loader import LoggingConfig
from error_handler import ConfigError

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(threadName)s] %(message)s"
MAX_LOG_BYTES = 5 * 1024 * 1024  # a few hours of INFO on a busy server; still opens in an editor
LOG_BACKUP_COUNT = 5

# Marks our handlers on the handler itself, so a re-imported module still finds them.
_OWNER_ATTRIBUTE = "_minitorrent_logging"
_lock = threading.Lock()


def setup_logging(
    config: LoggingConfig,
    program: str,
    *,
    max_bytes: int = MAX_LOG_BYTES,
    backup_count: int = LOG_BACKUP_COUNT,
    console_level: str | None = None,
) -> None:
    """Set the root logger's level and install console (and file) handlers.

    ``program`` names the log file (``main_server`` -> ``main_server.log``).
    ``console_level`` raises the bar for stderr alone, so a command-line tool
    keeps its output clean while the file still records ``config.level``.
    Raises ``ConfigError`` if ``log_dir`` cannot be created or the log file
    cannot be opened; the previous setup then stays in place.
    """
    new_handlers = _make_handlers(config, program, max_bytes, backup_count)
    if console_level is not None:
        new_handlers[0].setLevel(console_level)
    formatter = logging.Formatter(LOG_FORMAT)
    root = logging.getLogger()
    with _lock:
        _remove_ours(root)
        for handler in new_handlers:
            handler.setFormatter(formatter)
            setattr(handler, _OWNER_ATTRIBUTE, True)
            root.addHandler(handler)
        root.setLevel(config.level)


def reset_logging() -> None:
    """Remove and close the handlers ``setup_logging`` installed (others stay)."""
    with _lock:
        _remove_ours(logging.getLogger())


def _make_handlers(
    config: LoggingConfig, program: str, max_bytes: int, backup_count: int
) -> list[logging.Handler]:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if not config.log_to_file:
        return handlers
    # Imported here: logging.handlers (with pickle) costs every start ~3 ms, and only a log file needs it.
    from logging.handlers import RotatingFileHandler

    log_file = config.log_dir / f"{program}.log"
    try:
        config.log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(
            RotatingFileHandler(
                log_file, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8"
            )
        )
    except OSError as error:
        raise ConfigError(
            f"logging.log_dir: cannot write {log_file}: {error.strerror or error}"
        ) from None
    return handlers


def _remove_ours(root: logging.Logger) -> None:
    for handler in list(root.handlers):
        if getattr(handler, _OWNER_ATTRIBUTE, False):
            root.removeHandler(handler)
            handler.close()
