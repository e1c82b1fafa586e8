"""The daemon's own log: JSON lines on stderr (the journal, under systemd)."""

from __future__ import annotations

import sys

import structlog


def configure_logging() -> None:
    """JSON lines on stderr, one event per line (structlog processors, no stdlib logging)."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.EventRenamer("event"),
            # log.exception(...) writes the traceback (key `exception`), not `"exc_info": true`.
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
