"""structlog set-up shared by every airouter process: JSON lines, or readable lines on a TTY."""

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from airouter.tracing import add_trace_ids


def exception_in_one_line(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: an exception a line carries (`_log.exception`, exc_info) becomes
    its type and message. No line holds a traceback: tracebacks are multi-line, can be had
    by anyone who can make the server fail, and tell an operator nothing they can act on."""
    exc_info = event.pop("exc_info", None)
    if exc_info is True:
        exc_info = sys.exc_info()
    error = exc_info if isinstance(exc_info, BaseException) else None
    if isinstance(exc_info, tuple):
        error = exc_info[1]
    if error is not None:
        event.setdefault("error_type", type(error).__name__)
        event.setdefault("error", str(error)[:500])
    return event


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Routes structlog to stderr; JSON unless stderr is a terminal (or `json` says otherwise)."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            exception_in_one_line,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
