"""gRPC channels to the broker's listeners, pinned to the broker's trust bundle."""

from __future__ import annotations

import grpc

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def _options(server_name: str | None) -> list[tuple[str, object]]:
    opts: list[tuple[str, object]] = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts


def tls_channel(target: str, ca_pem: bytes, server_name: str | None = None) -> grpc.aio.Channel:
    """Server-authenticated TLS (bootstrap listener)."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    return grpc.aio.secure_channel(target, creds, options=_options(server_name))


def mtls_channel(
    target: str, ca_pem: bytes, key_pem: bytes, chain_pem: bytes, server_name: str | None = None
) -> grpc.aio.Channel:
    """Mutual TLS with our certificate chain (main and factory listeners)."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=chain_pem
    )
    return grpc.aio.secure_channel(target, creds, options=_options(server_name))


def sync_mtls_channel(
    target: str, ca_pem: bytes, key_pem: bytes, chain_pem: bytes, server_name: str | None = None
) -> grpc.Channel:
    """Blocking mutual-TLS channel, for the CLI."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=chain_pem
    )
    return grpc.secure_channel(target, creds, options=_options(server_name))
