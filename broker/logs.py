"""Log lines of the broker process: plain text (the default) or one JSON object per line, and
the request context (request id, RPC method, verified peer) every line logged during an RPC
carries, so a firmware author can quote the ``x-request-id`` a call returned and an operator can
find its lines.

The service layer binds the context per RPC (``bind_rpc``, ``bind_peer``); this module knows
nothing of gRPC. Secrets (passwords, tokens, claim codes, keys) are never logged by the broker
(I11); nothing here adds any: a record's message and its ``extra`` fields are written as given.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import re
import secrets
import sys
from dataclasses import dataclass, replace
from typing import Any, TextIO

FORMATS = ("text", "json")
REQUEST_ID_HEADER = "x-request-id"
# A client-chosen request id is kept only when it is this safe to echo and to log.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_CONTEXT_FIELDS = ("request_id", "method", "peer")


@dataclass(frozen=True, slots=True)
class RpcContext:
    """The RPC being served: its request id, full method name and verified peer (SPIFFE ID,
    empty before authentication or for anonymous callers)."""

    request_id: str
    method: str
    peer: str = ""


_rpc: contextvars.ContextVar[RpcContext | None] = contextvars.ContextVar("broker_rpc", default=None)


def request_id_from(offered: str | None) -> str:
    """The client's x-request-id when it is sane (<= 64 of [A-Za-z0-9._-]), else a new one."""
    if offered and REQUEST_ID_PATTERN.fullmatch(offered):
        return offered
    return secrets.token_hex(8)


def bind_rpc(request_id: str, method: str) -> None:
    """Lines logged from here on in this task (and the core calls it awaits) carry the RPC."""
    _rpc.set(RpcContext(request_id, method))


def bind_peer(peer: str) -> None:
    """Add the verified peer once the caller is authenticated."""
    current = _rpc.get()
    if current is not None:
        _rpc.set(replace(current, peer=peer))


def current_rpc() -> RpcContext | None:
    """The RPC bound in this context, if any."""
    return _rpc.get()


class RequestContextFilter(logging.Filter):
    """Puts request_id, method and peer on every record ("" outside an RPC)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rpc = _rpc.get()
        for name in _CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, getattr(rpc, name) if rpc is not None else "")
        return True


class TextFormatter(logging.Formatter):
    """The classic line, with ``request_id=... method=...`` appended during an RPC."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", "")
        if request_id:
            line += f" request_id={request_id} method={getattr(record, 'method', '')}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, method, peer (when
    known), every ``extra`` field, and the exception text when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _CONTEXT_FIELDS:
            value = getattr(record, name, "")
            if value:
                entry[name] = value
        for name, value in record.__dict__.items():
            if name not in _STANDARD and name not in _CONTEXT_FIELDS and name not in entry:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def log_handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing log_format lines ("text" or "json") with the request context."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestContextFilter())
    return handler


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> bool:
    """Log log_format lines to stderr from the root logger, like logging.basicConfig: only if
    nothing configured the root logger before (an embedding program, pytest); True if done."""
    handler = log_handler(log_format)  # validates the format either way
    root = logging.getLogger()
    if root.handlers:
        return False
    root.addHandler(handler)
    root.setLevel(level)
    return True
