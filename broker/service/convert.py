"""Core values to protobuf messages (one place, shared by the service modules)."""

from __future__ import annotations

from broker._proto.broker.v1 import common_pb2
from broker.pki.trust import TrustBundle


def trust_bundle_pb(bundle: TrustBundle) -> common_pb2.TrustBundle:
    """The protobuf form of a trust bundle."""
    return common_pb2.TrustBundle(
        ca_certificates_pem=bundle.ca_certificates_pem,
        version=bundle.version,
        issuing_certificates_pem=bundle.issuing_certificates_pem,
        jwks_json=bundle.jwks_json,
    )
