"""Logging: a request id on every line, and the gateway's JSON access log on its own stream."""

from __future__ import annotations

import contextvars
import json
import logging
import sys

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class AccessLogFormatter(logging.Formatter):
    """One JSON object per line: the fields of the access record, never headers, keys or prompts."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "access", None)
        if not isinstance(fields, dict):
            return super().format(record)
        return json.dumps({"ts": self.formatTime(record), "level": record.levelname, **fields}, separators=(",", ":"))


def setup_logging(level: str = "info", access_log: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # One line per engine health check would drown everything else.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if access_log:
        access = logging.StreamHandler(sys.stdout)
        access.setFormatter(AccessLogFormatter())
        logger = logging.getLogger("serve.gateway.access")
        logger.handlers[:] = [access]
        logger.propagate = False
