"""hcached's log lines: one line per event, with levels; colour only on a terminal, priorities for journald."""

import logging
import os
import sys
from typing import TextIO

_COLOURS = {"DEBUG": "\033[2m", "WARNING": "\033[33m", "ERROR": "\033[31m", "CRITICAL": "\033[1;31m"}
_RESET = "\033[0m"
# sd-daemon(3) priority prefixes: journald reads them as the line's level.
_PRIORITIES = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class _OneLine(logging.Formatter):
    """A traceback stays on its event's line, so journald and grep see one event per line."""

    def __init__(self, fmt: str, colour: bool, journald: bool) -> None:
        super().__init__(fmt)
        self.colour = colour
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", " | ")
        if self.journald:
            return f"<{_PRIORITIES.get(record.levelname, 6)}>{text}"
        if self.colour and record.levelname in _COLOURS:
            return f"{_COLOURS[record.levelname]}{text}{_RESET}"
        return text


def setup(level: str, stream: TextIO = sys.stderr) -> None:
    """Log to `stream`: with timestamps and colour on a tty, with journald priorities (no timestamp: journald
    adds one) when systemd connected it to the journal, else plain timestamped lines."""
    journald = bool(os.environ.get("JOURNAL_STREAM")) and not stream.isatty()
    colour = stream.isatty() and "NO_COLOR" not in os.environ
    fmt = "%(levelname)s %(name)s: %(message)s" if journald else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_OneLine(fmt, colour, journald))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
