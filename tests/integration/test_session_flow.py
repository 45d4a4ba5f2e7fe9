"""The account → app certificate → claim → share → session flow through the SDKs (real mTLS)."""

from __future__ import annotations

import asyncio

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from broker.client.app import AppClient
from broker.client.device import DeviceClient, Endpoints
from broker.protocol.tokens import cert_thumbprint, key_hash
from tests.helpers import create_token


def test_i5_shared_viewer_gets_token_the_camera_accepts(broker, operator_channel, tmp_path):
    endpoints = Endpoints(broker.bootstrap, broker.main)
    camera = DeviceClient(tmp_path / "cam", endpoints, broker.pki.ca_pem)
    owner = AppClient(tmp_path / "owner", endpoints, broker.pki.ca_pem)
    friend = AppClient(tmp_path / "friend", endpoints, broker.pki.ca_pem)
    token = create_token(operator_channel, "cam-flow")

    async def scenario():
        state = await camera.enroll(token)
        await owner.create_account("anna@example.com", "correct horse battery")
        await friend.create_account("ben", "another long password")
        await owner.enroll("anna@example.com", "correct horse battery", "Anna's phone")
        await friend.enroll("ben", "another long password", "Ben's phone")
        await owner.claim("cam-flow", state.claim_code)
        await owner.share("cam-flow", "ben")
        return await friend.list_devices(), await friend.open_session("cam-flow")

    devices, ticket = asyncio.run(scenario())
    assert [(d.device_id, d.role) for d in devices] == [("cam-flow", 2)]  # ROLE_VIEWER

    claims = camera.token_verifier(broker.clock).verify(ticket.token)
    friend_der = x509.load_pem_x509_certificate(friend.chain_path.read_bytes()).public_bytes(
        Encoding.DER
    )
    assert claims.session_id == ticket.session_id
    assert claims.user_id == friend.state.user_id
    assert claims.app_id == friend.state.app_id
    assert claims.audience == "spiffe://camera.local/device/cam-flow"
    assert claims.cnf_thumbprint == cert_thumbprint(friend_der)
    assert claims.ephemeral_key_hash == key_hash(ticket.ephemeral_public)
    assert claims.expires_at - claims.issued_at <= 300
    with broker.store().read() as tx:
        record = tx.get_session(ticket.session_id)
    assert record is not None and record.outcome.value == "opened"
