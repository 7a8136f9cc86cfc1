"""structlog set-up shared by every airouter process: JSON lines, or readable lines on a TTY."""

import logging
import sys

import structlog

from airouter.tracing import add_trace_ids


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
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
