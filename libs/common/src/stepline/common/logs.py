"""Logging with run and task context.

Modules use ``logging.getLogger(__name__)`` with ``%``-style arguments. The
run and task being worked on live in context variables; :class:`ContextFilter`
copies them onto every record, so a log line says which run it concerns
without each call passing it. Only ``__main__`` modules call
:func:`configure_logging`.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

run_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("run_id", default=None)
task_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("task_id", default=None)
principal_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "principal", default=None
)

_CONTEXT_FIELDS = {"run_id": run_id_var, "task_id": task_id_var, "principal": principal_var}

#: Third-party loggers held at WARNING by :func:`configure_logging`.
QUIET_LOGGERS = ("httpx", "httpcore")


@contextlib.contextmanager
def log_context(*, run_id: str | None = None, task_id: str | None = None) -> Iterator[None]:
    """Attach a run (and task) to every log record emitted inside the block."""
    tokens: list[tuple[contextvars.ContextVar[str | None], contextvars.Token[str | None]]] = []
    if run_id is not None:
        tokens.append((run_id_var, run_id_var.set(run_id)))
    if task_id is not None:
        tokens.append((task_id_var, task_id_var.set(task_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Adds ``run_id``, ``task_id`` and ``principal`` (or ``None``) to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT_FIELDS.items():
            if not hasattr(record, name):
                setattr(record, name, var.get())
        return True


class TextFormatter(logging.Formatter):
    """Human-readable lines; context fields appear only when set."""

    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)s " + service + " %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(
            f"{name}={getattr(record, name)}"
            for name in _CONTEXT_FIELDS
            if getattr(record, name, None) is not None
        )
        return f"{line} [{context}]" if context else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def configure_logging(*, service: str, level: str = "INFO", json_output: bool = False) -> None:
    """Install one stderr handler on the root logger. Call from ``__main__`` only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if json_output else TextFormatter(service))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request's full URL (query-string secrets included) at INFO.
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
