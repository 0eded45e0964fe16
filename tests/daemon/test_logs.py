"""hcached's log lines: one per event, levels, no colour off a terminal, journald priorities under systemd."""

import io
import logging

import pytest

from hcache.daemon import logs


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _emit(stream: io.StringIO) -> list[str]:
    log = logging.getLogger("hcache.test")
    log.info("saved %s", "ctx")
    log.debug("hidden at INFO")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("request failed")
    return stream.getvalue().splitlines()


def test_plain_lines_without_colour_when_not_a_tty(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    stream = io.StringIO()
    logs.setup("INFO", stream)
    lines = _emit(stream)
    assert len(lines) == 2  # the traceback stays on its event's line; DEBUG is filtered
    assert "INFO hcache.test: saved ctx" in lines[0] and "\033[" not in stream.getvalue()
    assert "ERROR hcache.test: request failed | Traceback" in lines[1] and "ValueError: boom" in lines[1]


def test_journald_gets_priorities_and_no_timestamps(monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    stream = io.StringIO()
    logs.setup("INFO", stream)
    lines = _emit(stream)
    assert lines[0] == "<6>INFO hcache.test: saved ctx"
    assert lines[1].startswith("<3>ERROR hcache.test: request failed")


def test_colour_only_on_a_terminal_and_level_changes_live(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    stream = _Tty()
    logs.setup("WARNING", stream)
    logging.getLogger("hcache.test").warning("careful")
    assert "\033[33m" in stream.getvalue()
    logs.set_level("DEBUG")
    logging.getLogger("hcache.test").debug("now shown")
    assert "now shown" in stream.getvalue()
