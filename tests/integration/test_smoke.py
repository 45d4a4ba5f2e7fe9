from __future__ import annotations

import asyncio

from broker.client.device import DeviceClient, Endpoints
from tests.helpers import create_token


def test_enroll_attach_renew(broker, operator_channel, tmp_path):
    token = create_token(operator_channel, "cam-0001")
    client = DeviceClient(
        tmp_path / "dev", Endpoints(broker.bootstrap, broker.main), broker.pki.ca_pem
    )

    async def scenario():
        state = await client.enroll(token)
        assert state.device_id == "cam-0001"
        async with client.attach() as session:
            msg = await session.receive(timeout=5)
            assert msg.accepted.device_id == "cam-0001"
        await client.renew()

    asyncio.run(scenario())
