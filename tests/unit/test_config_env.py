"""Load knobs from the environment (issue 12): BROKER_WATCH_WAIT_SECONDS, BROKER_CORE_QUEUE_LIMIT,
BROKER_DRAIN_WINDOW_SECONDS; a bad value stops start-up with a message naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import Config, from_environment


def test_load_knobs_are_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_WATCH_WAIT_SECONDS", "2.5")
    monkeypatch.setenv("BROKER_CORE_QUEUE_LIMIT", "250")
    monkeypatch.setenv("BROKER_DRAIN_WINDOW_SECONDS", "12")
    config = from_environment(tmp_path)
    assert (config.watch_wait_seconds, config.core_queue_limit, config.drain_window_seconds) == (
        2.5,
        250,
        12.0,
    )


def test_defaults_without_the_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (
        "BROKER_WATCH_WAIT_SECONDS",
        "BROKER_CORE_QUEUE_LIMIT",
        "BROKER_DRAIN_WINDOW_SECONDS",
    ):
        monkeypatch.delenv(var, raising=False)
    config = from_environment(tmp_path)
    default = Config()
    assert (config.watch_wait_seconds, config.core_queue_limit) == (
        default.watch_wait_seconds,
        default.core_queue_limit,
    )


@pytest.mark.parametrize(
    ("var", "raw", "message"),
    [
        ("BROKER_CORE_QUEUE_LIMIT", "lots", "BROKER_CORE_QUEUE_LIMIT='lots': expected an integer"),
        ("BROKER_CORE_QUEUE_LIMIT", "2.5", "BROKER_CORE_QUEUE_LIMIT='2.5': expected an integer"),
        (
            "BROKER_WATCH_WAIT_SECONDS",
            "soon",
            "BROKER_WATCH_WAIT_SECONDS='soon': expected a number",
        ),
        ("BROKER_WATCH_WAIT_SECONDS", "-1", "BROKER_WATCH_WAIT_SECONDS='-1' must not be negative"),
    ],
)
def test_a_bad_value_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str, raw: str, message: str
) -> None:
    monkeypatch.setenv(var, raw)
    with pytest.raises(ValueError) as raised:
        from_environment(tmp_path)
    assert str(raised.value) == message


def test_connection_knobs_are_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_MAX_CONNECTIONS_PER_ADDRESS", "0")
    monkeypatch.setenv("BROKER_HANDSHAKE_TIMEOUT_SECONDS", "4.5")
    monkeypatch.setenv("BROKER_IDLE_CONNECTION_SECONDS", "30")
    config = from_environment(tmp_path)
    assert (
        config.max_connections_per_address,
        config.handshake_timeout_seconds,
        config.idle_connection_seconds,
    ) == (0, 4.5, 30.0)
    assert (Config().max_connections_per_address, Config().handshake_timeout_seconds) == (256, 10)
