"""Which devices are attached right now, and a way to end their Attach streams.

Lives on the event loop (asyncio only, no grpc). Each Attach stream owns an outbox; the broker ends
a stream by putting a BrokerError in it, which the stream's handler turns into its final status.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from broker.errors import BrokerError, Unauthenticated


class StreamClosed:
    """Outbox marker: the device closed its side."""


CLOSED = StreamClosed()


@dataclass(eq=False)
class AttachHandle:
    """One live Attach stream."""

    device_id: str
    serial: str
    chain_pem: str = ""
    issuer_ski: str = ""  # the issuing CA of the certificate this stream was opened with
    epoch: int = 0  # the fencing token of this attachment in the store (0: not yet recorded)
    bundle_version: str = ""
    outbox: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    ended: bool = False

    def send(self, message: object) -> None:
        """Queue a message for the device (dropped if the stream already ended)."""
        if not self.ended:
            self.outbox.put_nowait(message)

    def end(self, error: BrokerError) -> None:
        """End the stream with error as its status."""
        if not self.ended:
            self.ended = True
            self.outbox.put_nowait(error)


class Presence:
    """Registry of live Attach streams, at most one per device."""

    def __init__(self) -> None:
        self._by_device: dict[str, AttachHandle] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        # Told of every stream whose handler has finished (its status is sent): metrics.
        self.on_detach: Callable[[AttachHandle], None] | None = None

    def attach(
        self, device_id: str, serial: str, chain_pem: str = "", issuer_ski: str = ""
    ) -> AttachHandle:
        """Register a new stream; an older stream of the same device is ended (reconnect wins)."""
        old = self._by_device.get(device_id)
        if old is not None:
            old.end(Unauthenticated("replaced by a newer Attach stream from the same device"))
        handle = AttachHandle(device_id, serial, chain_pem, issuer_ski)
        self._by_device[device_id] = handle
        return handle

    def recorded(self, handle: AttachHandle) -> None:
        """handle's attachment is in the store (its epoch known): wake Watch calls waiting for it."""
        for waiter in self._waiters.pop(handle.device_id, []):
            if not waiter.done():
                waiter.set_result(None)

    async def wait_attached(self, device_id: str, timeout: float) -> None:
        """Return when the device's attachment here is recorded, or after timeout seconds."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(device_id, []).append(waiter)
        try:
            await asyncio.wait_for(waiter, max(timeout, 0.0))
        except TimeoutError:
            pass
        finally:
            waiters = self._waiters.get(device_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(device_id, None)

    def detach(self, handle: AttachHandle) -> None:
        """Forget a stream that has finished (only if it is still the registered one)."""
        handle.ended = True
        if self._by_device.get(handle.device_id) is handle:
            del self._by_device[handle.device_id]
        if self.on_detach is not None:
            self.on_detach(handle)

    def handle(self, device_id: str) -> AttachHandle | None:
        """The device's live stream, if attached."""
        return self._by_device.get(device_id)

    def is_online(self, device_id: str) -> bool:
        return device_id in self._by_device

    def broadcast(self, message: object) -> int:
        """Queue message on every live stream; returns how many streams got it."""
        for handle in self._by_device.values():
            handle.send(message)
        return len(self._by_device)

    def online_ids(self) -> set[str]:
        return set(self._by_device)

    def online_count(self) -> int:
        return len(self._by_device)

    def end_device(self, device_id: str, error: BrokerError, epoch: int = 0) -> int:
        """End the device's stream, if any (only the stream of that attachment epoch, when one is
        given); returns how many were ended."""
        handle = self._by_device.get(device_id)
        if handle is None or (epoch and handle.epoch != epoch):
            return 0
        del self._by_device[device_id]
        handle.end(error)
        return 1

    def end_serials(self, serials: set[str], error: BrokerError) -> int:
        """End every stream authenticated with one of these certificate serials."""
        hit = [h for h in self._by_device.values() if h.serial in serials]
        for handle in hit:
            self.end_device(handle.device_id, error)
        return len(hit)

    def end_issued_outside(self, trusted_issuer_skis: set[str], error: BrokerError) -> int:
        """End every stream whose certificate was not issued by one of these CAs (after a PKI
        reload retired an issuing CA, such a stream could only offer viewers an untrusted chain)."""
        hit = [h for h in self._by_device.values() if h.issuer_ski not in trusted_issuer_skis]
        for handle in hit:
            self.end_device(handle.device_id, error)
        return len(hit)
