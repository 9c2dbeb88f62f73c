"""Tests for logger_config: handlers, file, rotation, level and idempotency."""
from __future__ import annotations

import logging
import logging.handlers

import pytest

from config_loader import LoggingConfig
from error_handler import ConfigError
from logger_config import reset_logging, setup_logging

PROGRAM = "test_program"


@pytest.fixture(autouse=True)
def restore_root_logger():
    """Undo setup_logging after each test so other tests see the root as before."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    reset_logging()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def our_handlers(root: logging.Logger) -> list[logging.Handler]:
    return [h for h in root.handlers if getattr(h, "_minitorrent_logging", False)]


def file_handlers(root: logging.Logger) -> list[logging.handlers.RotatingFileHandler]:
    return [h for h in root.handlers if isinstance(h, logging.handlers.RotatingFileHandler)]


def flush(root: logging.Logger) -> None:
    for handler in root.handlers:
        handler.flush()


class TestLogFile:
    def test_file_created_in_log_dir(self, tmp_path):
        """setup_logging creates log_dir (nested) and <program>.log inside it."""
        log_dir = tmp_path / "a" / "logs"
        setup_logging(LoggingConfig(log_dir=log_dir), PROGRAM)
        assert True == (log_dir / f"{PROGRAM}.log").is_file()

    def test_records_use_the_house_format(self, tmp_path, restore_root_logger):
        """A record is written with time, level, logger name, thread and message."""
        setup_logging(LoggingConfig(log_dir=tmp_path), PROGRAM)
        logging.getLogger("minitorrent.test").info("hello %s", "world")
        flush(restore_root_logger)
        line = (tmp_path / f"{PROGRAM}.log").read_text(encoding="utf-8").splitlines()[-1]
        assert "INFO    minitorrent.test [MainThread] hello world" == line.split(" ", 2)[2]

    def test_file_is_utf8(self, tmp_path, restore_root_logger):
        """Non-ASCII file names in messages are written as UTF-8."""
        setup_logging(LoggingConfig(log_dir=tmp_path), PROGRAM)
        logging.getLogger("minitorrent.test").warning("got 名前 ✓")
        flush(restore_root_logger)
        assert (tmp_path / f"{PROGRAM}.log").read_text(encoding="utf-8").rstrip().endswith("got 名前 ✓")

    def test_file_rotates(self, tmp_path, restore_root_logger):
        """Past max_bytes the file rotates, keeping at most backup_count old files."""
        setup_logging(LoggingConfig(log_dir=tmp_path), PROGRAM, max_bytes=500, backup_count=2)
        log = logging.getLogger("minitorrent.test")
        for number in range(100):
            log.info("message number %d with some padding to fill the file", number)
        flush(restore_root_logger)
        names = sorted(path.name for path in tmp_path.iterdir())
        assert [f"{PROGRAM}.log", f"{PROGRAM}.log.1", f"{PROGRAM}.log.2"] == names

    def test_default_rotation_limits(self, tmp_path, restore_root_logger):
        """By default the file rotates at 5 MiB and keeps 5 old files."""
        setup_logging(LoggingConfig(log_dir=tmp_path), PROGRAM)
        handler = file_handlers(restore_root_logger)[0]
        assert (5 * 1024 * 1024, 5) == (handler.maxBytes, handler.backupCount)

    def test_log_to_file_false_writes_no_file(self, tmp_path, restore_root_logger):
        """With log_to_file false nothing is created and no file handler is installed."""
        log_dir = tmp_path / "logs"
        setup_logging(LoggingConfig(log_to_file=False, log_dir=log_dir), PROGRAM)
        logging.getLogger("minitorrent.test").error("console only")
        assert (False, []) == (log_dir.exists(), file_handlers(restore_root_logger))

    def test_unwritable_log_dir_is_a_config_error(self, tmp_path):
        """A log_dir that cannot be created raises a one-line ConfigError naming the key."""
        blocker = tmp_path / "file"
        blocker.write_text("not a folder", encoding="utf-8")
        with pytest.raises(ConfigError) as caught:
            setup_logging(LoggingConfig(log_dir=blocker / "logs"), PROGRAM)
        assert (True, False) == (str(caught.value).startswith("logging.log_dir: "), "\n" in str(caught.value))


class TestConsole:
    def test_console_handler_writes_to_stderr(self, tmp_path, capsys):
        """Records also go to stderr in the house format."""
        setup_logging(LoggingConfig(log_to_file=False, log_dir=tmp_path), PROGRAM)
        logging.getLogger("minitorrent.test").warning("to the console")
        assert "WARNING minitorrent.test [MainThread] to the console" in capsys.readouterr().err


class TestLevel:
    def test_level_applied_to_root(self, tmp_path, restore_root_logger):
        """The root logger takes the configured level."""
        setup_logging(LoggingConfig(level="WARNING", log_dir=tmp_path), PROGRAM)
        assert logging.WARNING == restore_root_logger.level

    def test_records_below_level_are_dropped(self, tmp_path, restore_root_logger):
        """Records below the configured level do not reach the file."""
        setup_logging(LoggingConfig(level="WARNING", log_dir=tmp_path), PROGRAM)
        log = logging.getLogger("minitorrent.test")
        log.info("quiet")
        log.warning("loud")
        flush(restore_root_logger)
        text = (tmp_path / f"{PROGRAM}.log").read_text(encoding="utf-8")
        assert (False, True) == ("quiet" in text, "loud" in text)


class TestIdempotency:
    def test_second_call_does_not_stack_handlers(self, tmp_path, restore_root_logger):
        """Calling setup_logging twice leaves the same number of handlers as once."""
        setup_logging(LoggingConfig(log_dir=tmp_path), PROGRAM)
        count = len(restore_root_logger.handlers)
        setup_logging(LoggingConfig(log_dir=tmp_path), PROGRAM)
        assert (count, 2) == (len(restore_root_logger.handlers), len(our_handlers(restore_root_logger)))

    def test_second_call_closes_the_replaced_file_handler(self, tmp_path, restore_root_logger):
        """The file handler from the first call is closed when replaced."""
        setup_logging(LoggingConfig(log_dir=tmp_path / "one"), PROGRAM)
        first = file_handlers(restore_root_logger)[0]
        setup_logging(LoggingConfig(log_dir=tmp_path / "two"), PROGRAM)
        expected = (None, [str(tmp_path / "two" / f"{PROGRAM}.log")])
        assert expected == (first.stream, [h.baseFilename for h in file_handlers(restore_root_logger)])

    def test_other_handlers_are_left_alone(self, tmp_path, restore_root_logger):
        """Handlers installed by others survive setup_logging and reset_logging."""
        other = logging.NullHandler()
        restore_root_logger.addHandler(other)
        setup_logging(LoggingConfig(log_dir=tmp_path), PROGRAM)
        setup_logging(LoggingConfig(log_dir=tmp_path), PROGRAM)
        reset_logging()
        assert (True, []) == (other in restore_root_logger.handlers, our_handlers(restore_root_logger))

    def test_caplog_still_captures(self, tmp_path, caplog):
        """pytest's caplog keeps working after setup_logging."""
        setup_logging(LoggingConfig(log_dir=tmp_path), PROGRAM)
        logging.getLogger("minitorrent.test").warning("seen by caplog")
        assert ["seen by caplog"] == [record.getMessage() for record in caplog.records]
