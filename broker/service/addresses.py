"""Listening addresses as configured: "host:port" or "[v6]:port"."""

from __future__ import annotations

from broker.errors import ConfigurationError


def split_address(address: str, what: str) -> tuple[str, int]:
    """(host, port) of address; ConfigurationError naming what it is for when it is neither."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigurationError(f"{what} address {address!r}: expected host:port")
    return host, int(port)
