"""``make demo``: the whole story on the embedded defaults, in one process, in about ten seconds.

enroll → claim → share → watch (frames decrypted and checked by content) → a stranger denied →
a revocation ending a live stream → the owner's access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import grpc

from broker.client.admin import AdminClient, OperatorCredentials
from broker.client.app import AppClient
from broker.client.device import DeviceClient, Endpoints
from broker.client.simcam import SimulatedCamera, parse_payload
from broker.clock import SystemClock
from broker.config import Config
from broker.pki.ca import PkiFiles, init_pki
from broker.service.server import BrokerServer

PASSWORD = "demo password, not a real one"  # noqa: S105 (demo accounts in a temp directory)


def say(step: str, text: str) -> None:
    print(f"  {step:<10} {text}", flush=True)


async def watch_frames(app: AppClient, device_id: str, count: int) -> tuple[int, int, str]:
    """Open a session and read count frames; returns (good frames, rejected, session_id)."""
    ticket = await app.open_session(device_id)
    good = 0
    async with app.watch(ticket) as stream:
        async for plaintext in stream.frames():
            camera, session, _ = parse_payload(plaintext)
            if (camera, session) != (device_id, ticket.session_id):
                raise SystemExit(f"oracle mismatch: {camera}/{session}")
            good += 1
            if good == count:
                break
    return good, stream.rejected, ticket.session_id


async def revoke_while_watching(
    app: AppClient, admin: AdminClient, device_id: str
) -> tuple[float, str]:
    """Revoke the device while app watches it; returns (ms until the stream ended, end reason)."""
    ticket = await app.open_session(device_id)
    async with app.watch(ticket) as stream:
        frames = stream.frames()
        await frames.__anext__()
        started = time.monotonic()
        await asyncio.to_thread(admin.revoke_device, device_id, "demo: camera reported stolen")
        async for _ in frames:
            pass
        elapsed = (time.monotonic() - started) * 1000
    return elapsed, stream.end_reason or ""


async def story(home: Path) -> None:
    config = Config(
        home=home,
        bootstrap_address="127.0.0.1:0",
        main_address="127.0.0.1:0",
        factory_address="127.0.0.1:0",
    )
    init_pki(config, SystemClock())
    server = BrokerServer(config)
    ports = await server.start()
    files = PkiFiles(config.certs_dir)
    endpoints = Endpoints(f"127.0.0.1:{ports['bootstrap']}", f"127.0.0.1:{ports['main']}")
    ca = files.ca_bundle.read_bytes()
    admin = AdminClient(endpoints.main, OperatorCredentials.from_certs_dir(config.certs_dir))
    print(f"broker up (SQLite + new dev PKI in {home}); listeners {ports}")
    try:
        token = await asyncio.to_thread(admin.create_enrollment_token, "cam-nursery")
        camera_client = DeviceClient(home / "camera", endpoints, ca)
        state = await camera_client.enroll(token.enrollment_token)
        say(
            "enroll",
            f"camera {state.device_id} got {state.spiffe_id}; claim code {state.claim_code}",
        )
        camera = SimulatedCamera(camera_client, fps=30, frame_bytes=2048)
        camera_task = asyncio.create_task(camera.run())
        await asyncio.wait_for(camera.attached.wait(), 10)
        say("attach", "camera attached over mutual TLS")

        anna, ben, mallory = (
            AppClient(home / n, endpoints, ca) for n in ("anna", "ben", "mallory")
        )
        for name, app in (("anna", anna), ("ben", ben), ("mallory", mallory)):
            await app.create_account(name, PASSWORD)
            await app.enroll(name, PASSWORD, f"{name}'s phone")
        await anna.claim("cam-nursery", state.claim_code)
        say("claim", "anna claimed cam-nursery with its single-use code")
        await anna.share("cam-nursery", "ben")
        say("share", "anna shared cam-nursery with ben (viewer)")

        good, rejected, _ = await watch_frames(ben, "cam-nursery", 30)
        say(
            "watch",
            f"ben decrypted {good} frames end to end, each from cam-nursery/his session; {rejected} rejected",
        )

        try:
            await mallory.open_session("cam-nursery")
            raise SystemExit("a stranger got a session: this must never happen")
        except grpc.aio.AioRpcError as denied:
            say("stranger", f"mallory denied: {denied.code().name} ({denied.details()})")

        elapsed, reason = await revoke_while_watching(anna, admin, "cam-nursery")
        say(
            "revoke",
            f"operator revoked cam-nursery; anna's live stream ended in {elapsed:.0f} ms: {reason!r}",
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(camera_task), 5)  # the camera sees its revocation
        say(
            "camera",
            f"camera's Attach stream ended: {camera.ended.code().name if camera.ended else 'still open?!'}",
        )

        print("\n  access log of cam-nursery (owner's view):")
        for entry in await anna.list_access("cam-nursery"):
            print(
                f"    {entry.username:<8} {entry.app_label:<16} {entry.outcome:<7} "
                f"{entry.bytes:>7} B  {entry.reason}"
            )
        camera_task.cancel()
    finally:
        admin.__exit__()
        await server.stop(0.5)
    print("\ndemo complete: every frame checked, the stranger refused, revocation took effect live")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="broker-demo-") as tmp:
        asyncio.run(story(Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
