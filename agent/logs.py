"""Structured logging: `key=value` text for people, JSON lines for machines.

Call sites log an event name plus fields through `log_event` so both renderings carry
the same structure; nothing here does I/O beyond the standard logging handlers.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class _Formatter(logging.Formatter):
    def __init__(self, json_lines: bool) -> None:
        super().__init__()
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in vars(record).items() if k not in _RESERVED}
        if self.json_lines:
            doc: dict[str, Any] = {
                "ts": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "event": record.getMessage(),
                **fields,
            }
            if record.exc_info:
                doc["exc"] = self.formatException(record.exc_info)
            return json.dumps(doc, default=str)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{stamp} {record.levelname[0]} {record.name}: {record.getMessage()}"
        if extra:
            line += f" {extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "INFO", json_lines: bool = False, path: str | Path | None = None) -> None:
    """Install one handler on the root logger (idempotent): stderr, or appending to `path`.

    A file is for long runs whose terminal shows something else (the simulator's progress view).
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_edgefleet", False):
            root.removeHandler(old)
            if isinstance(old, logging.FileHandler):
                old.close()
    handler: logging.Handler = (logging.StreamHandler(sys.stderr) if path is None
                                else logging.FileHandler(path, encoding="utf-8"))
    handler.setFormatter(_Formatter(json_lines))
    handler._edgefleet = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `event` with structured `fields` (rendered as key=value or JSON)."""
    logger.log(level, event, extra=fields)
