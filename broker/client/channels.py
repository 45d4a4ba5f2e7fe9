"""gRPC channels to the broker's listeners, pinned to the broker's trust bundle.

A listener address may name several replicas: ``"10.0.0.1:8443,10.0.0.2:8443"`` (or a list of
addresses), or one DNS name with several addresses (``"broker.example:8443"``,
``"dns:///broker.example:8443"``). IP literals become one gRPC target (``ipv4:a:p,b:p``) and DNS
names are resolved by gRPC; either way the channel uses ``pick_first`` over a shuffled address
list, so a new connection goes to a live replica (a dead one refuses and the next is tried) and a
fleet of cameras spreads over the replicas. Only a list of several *host names* cannot be one
target: each new channel then takes one of the names at random (the SDK's reconnect loop moves on
to another when it fails).
"""

from __future__ import annotations

import ipaddress
import json
import random
from collections.abc import Sequence

import grpc

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# pick_first with a shuffled address list (gRFC A62): one connection per channel, and a fleet of
# cameras does not pile onto the first address; an address that refuses is skipped.
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"pick_first": {"shuffleAddressList": True}}]})

AddressSpec = str | Sequence[str]


def split_addresses(spec: AddressSpec) -> tuple[str, ...]:
    """The addresses named by spec: a comma-separated string or a sequence of strings (each of
    which may itself hold commas)."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    return tuple(a.strip() for part in parts for a in part.split(",") if a.strip())


def _ip_literal(address: str) -> tuple[int, str, str] | None:
    """(IP version, host as written in a target, port) when address is IP:port or [IPv6]:port."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return None
    return ip.version, (f"[{bare}]" if ip.version == 6 else bare), port


def target_for(spec: AddressSpec) -> tuple[str, str | None]:
    """(gRPC target, TLS name to check when the target itself does not say it) for one new
    channel to spec."""
    addresses = split_addresses(spec)
    if len(addresses) <= 1:
        return (addresses[0] if addresses else ""), None
    literals = [_ip_literal(a) for a in addresses]
    ips = [lit for lit in literals if lit is not None]
    if len(ips) == len(addresses) and len({version for version, _, _ in ips}) == 1:
        first_host = ips[0][1].strip("[]")
        random.shuffle(ips)
        scheme = "ipv6" if ips[0][0] == 6 else "ipv4"
        # Every replica presents the same broker certificate, which carries the IPs it is
        # reached at as SANs: check the first address of the list.
        return f"{scheme}:" + ",".join(f"{host}:{port}" for _, host, port in ips), first_host
    return random.choice(addresses), None  # noqa: S311 (spreading load, not a secret)


def _options(server_name: str | None, implied_name: str | None) -> list[tuple[str, object]]:
    opts: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.service_config", SERVICE_CONFIG),
    ]
    name = server_name or implied_name
    if name:
        opts.append(("grpc.ssl_target_name_override", name))
    return opts


def tls_channel(
    target: AddressSpec, ca_pem: bytes, server_name: str | None = None
) -> grpc.aio.Channel:
    """Server-authenticated TLS (bootstrap listener)."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    address, implied = target_for(target)
    return grpc.aio.secure_channel(address, creds, options=_options(server_name, implied))


def mtls_channel(
    target: AddressSpec,
    ca_pem: bytes,
    key_pem: bytes,
    chain_pem: bytes,
    server_name: str | None = None,
) -> grpc.aio.Channel:
    """Mutual TLS with our certificate chain (main and factory listeners)."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=chain_pem
    )
    address, implied = target_for(target)
    return grpc.aio.secure_channel(address, creds, options=_options(server_name, implied))


def sync_mtls_channel(
    target: AddressSpec,
    ca_pem: bytes,
    key_pem: bytes,
    chain_pem: bytes,
    server_name: str | None = None,
) -> grpc.Channel:
    """Blocking mutual-TLS channel, for the CLI."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=chain_pem
    )
    address, implied = target_for(target)
    return grpc.secure_channel(address, creds, options=_options(server_name, implied))
