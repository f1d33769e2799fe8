"""The daemon's log lines on stderr: plain text, JSON, or journald's stream format.

- `text`: "time LEVEL logger: message", as before.
- `json`: one object a line: `time` (ISO 8601 UTC, "Z"), `level`, `logger`, `message`,
  the fields a call passed in `extra=`, and `exception` with the traceback.
- `journal`: the message with journald's `<N>` priority prefix on each line (journald
  adds the time and the unit); chosen by itself when stderr is the stream systemd set
  up ($JOURNAL_STREAM names its device and inode), as under `secretfs.service`.

A log line never holds a secret value: callers log names, ids and errors, never values
(see the audit log's rule). These formats only rearrange what the callers wrote.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

log = logging.getLogger(__name__)

FORMATS = ("text", "json", "journal")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What every LogRecord carries; the rest of its attributes came from `extra=`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# syslog(3) priorities, as journald reads them from a "<N>" prefix.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
               (logging.INFO, 6))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in fields:
                fields[key] = value
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        # ASCII only: a line stays one line, whatever the message holds.
        return json.dumps(fields, default=str)


class JournalFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        # journald reads each line as an entry: a traceback's lines keep the priority.
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def priority(level: int) -> int:
    return next((value for threshold, value in _PRIORITIES if level >= threshold), 7)


def stderr_is_journal(stream=None) -> bool:
    """Whether `stream` (stderr) is the journal stream $JOURNAL_STREAM describes: a child
    whose stderr went elsewhere inherits the variable, so it is checked, as systemd asks."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = expected.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        status = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError):
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def configure(*, debug: bool = False, log_format: str | None = None, stream=None) -> None:
    """The root logger's one handler, on stderr. An unknown format (from config.json;
    the command line offers only the known ones) logs as text, and says so."""
    stream = stream or sys.stderr
    chosen = log_format or ("journal" if stderr_is_journal(stream) else "text")
    handler = logging.StreamHandler(stream)
    if chosen == "json":
        handler.setFormatter(JsonFormatter())
    elif chosen == "journal":
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler])
    if chosen not in FORMATS:
        log.warning("unknown log format %r (LogFormat in config.json?): logging as text; "
                    "choose one of %s", chosen, ", ".join(FORMATS))
