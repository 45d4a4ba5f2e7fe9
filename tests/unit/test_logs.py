"""broker.logs: the JSON and text line formats, the request context on every record, request ids
a client may choose, and the log format knobs (Config.log_format, BROKER_LOG_FORMAT)."""

from __future__ import annotations

import contextvars
import io
import json
import logging
from pathlib import Path

import pytest

from broker.config import Config, from_environment
from broker.logs import bind_peer, bind_rpc, configure_logging, log_handler, request_id_from


def _emit(log_format: str, bind: bool, **extra: object) -> str:
    stream = io.StringIO()
    logger = logging.getLogger("broker.test.logs")
    logger.propagate = False
    handler = log_handler(log_format, stream)
    logger.addHandler(handler)

    def log() -> None:
        if bind:
            bind_rpc("req-1", "/broker.v1.AppService/OpenSession")
            bind_peer("spiffe://camera.local/user/u-1/app/a-1")
        logger.warning("opened %s", "s-1", extra=extra)

    try:
        contextvars.copy_context().run(log)  # a fresh context, as each RPC's task has
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_json_line_has_the_request_context_and_extra_fields() -> None:
    record = json.loads(_emit("json", True, session_id="s-1", bytes=12))
    assert record["ts"].endswith("+00:00") and record["level"] == "WARNING"
    assert record["logger"] == "broker.test.logs" and record["message"] == "opened s-1"
    assert record["request_id"] == "req-1"
    assert record["method"] == "/broker.v1.AppService/OpenSession"
    assert record["peer"] == "spiffe://camera.local/user/u-1/app/a-1"
    assert (record["session_id"], record["bytes"]) == ("s-1", 12)


def test_json_line_outside_an_rpc_has_no_context_fields() -> None:
    record = json.loads(_emit("json", False))
    assert set(record) == {"ts", "level", "logger", "message"}


def test_text_line_appends_the_request_id_only_during_an_rpc() -> None:
    inside = _emit("text", True)
    assert inside.rstrip().endswith(
        "opened s-1 request_id=req-1 method=/broker.v1.AppService/OpenSession"
    )
    assert "request_id" not in _emit("text", False)


def test_json_line_carries_the_exception() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("broker.test.exc")
    logger.propagate = False
    handler = log_handler("json", stream)
    logger.addHandler(handler)
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    record = json.loads(stream.getvalue())
    assert record["message"] == "failed" and "ValueError: boom" in record["exception"]


@pytest.mark.parametrize(
    ("offered", "kept"),
    [
        ("fw-1.2_3", True),
        ("A" * 64, True),
        ("A" * 65, False),
        ("", False),
        (None, False),
        ("has space", False),
        ("new\nline", False),
        ("é", False),
    ],
)
def test_client_request_ids_are_kept_only_when_sane(offered: str | None, kept: bool) -> None:
    chosen = request_id_from(offered)
    assert (chosen == offered) is kept
    if not kept:
        assert len(chosen) == 16 and int(chosen, 16) >= 0
    assert request_id_from(None) != request_id_from(None)


def test_log_format_knobs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="log format must be one of text, json"):
        log_handler("yaml")
    with pytest.raises(ValueError, match="log_format must be text or json"):
        Config(home=tmp_path, log_format="yaml")
    monkeypatch.setenv("BROKER_LOG_FORMAT", "json")
    assert from_environment(tmp_path).log_format == "json"
    assert Config(home=tmp_path).log_format == "text"


def test_configure_logging_leaves_a_configured_root_alone() -> None:
    root = logging.getLogger()
    assert root.handlers  # pytest's capture handlers
    before = list(root.handlers)
    assert configure_logging("json") is False
    assert root.handlers == before
    with pytest.raises(ValueError):
        configure_logging("xml")
