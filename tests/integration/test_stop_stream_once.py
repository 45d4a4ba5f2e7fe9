"""StopStream is sent at most once per session (issue 8, item 6), through the real listeners.

A camera (raw Attach stream) accepts a session and streams; the app hangs up its Watch. The camera
is told to stop ("watcher left"); frames it had in flight then arrive at the broker, and must not
make it send a second StopStream for the same session. A heartbeat after those frames is the
fence: the broker handles one stream's messages in order, so any StopStream those frames caused is
written before the heartbeat's acknowledgement.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc

from broker._proto.broker.v1 import app_pb2, app_pb2_grpc, device_pb2
from tests.helpers import RunningBroker, claim_device, enroll_camera, new_user, open_session

DEVICE = "cam-0001"
EPH = b"\x01" * 32
_END = object()


class RawCamera:
    """An Attach stream driven by the test: what it sends, and every message it received."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._outgoing: queue.Queue[object] = queue.Queue()
        self.received: queue.Queue[device_pb2.BrokerMessage] = queue.Queue()
        self.log: list[device_pb2.BrokerMessage] = []
        self._call = channel.stream_stream(
            "/broker.v1.DeviceService/Attach",
            request_serializer=device_pb2.DeviceMessage.SerializeToString,
            response_deserializer=device_pb2.BrokerMessage.FromString,
        )(self._requests(), timeout=60)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[device_pb2.DeviceMessage]:
        while (item := self._outgoing.get()) is not _END:
            assert isinstance(item, device_pb2.DeviceMessage)
            yield item

    def _read(self) -> None:
        try:
            for message in self._call:
                self.log.append(message)
                self.received.put(message)
        except grpc.RpcError:
            pass

    def send(self, **kind: object) -> None:
        self._outgoing.put(device_pb2.DeviceMessage(**kind))  # type: ignore[arg-type]

    def wait_for(self, kind: str, timeout: float = 10) -> device_pb2.BrokerMessage:
        while True:
            message = self.received.get(timeout=timeout)
            if message.WhichOneof("kind") == kind:
                return message

    def close(self) -> None:
        self._outgoing.put(_END)
        self._call.cancel()
        self._reader.join(10)


def frame(session_id: str, sequence: int) -> device_pb2.MediaFrame:
    return device_pb2.MediaFrame(session_id=session_id, sequence=sequence, ciphertext=b"\x00" * 32)


def test_a_watcher_leaving_stops_the_camera_exactly_once(
    broker: RunningBroker, operator_channel: grpc.Channel
) -> None:
    creds, code = enroll_camera(broker, operator_channel, DEVICE)
    app = new_user(broker, "alice")
    claim_device(broker, app, DEVICE, code)
    with creds.channel(broker) as device_channel, app.channel(broker) as app_channel:
        camera = RawCamera(device_channel)
        try:
            camera.send(hello=device_pb2.Hello(trust_bundle_version="test"))
            camera.wait_for("accepted")
            opened = open_session(broker, app, DEVICE, EPH)
            watch = app_pb2_grpc.AppServiceStub(app_channel).Watch(
                app_pb2.WatchRequest(
                    session_id=opened.session_id, token=opened.token, app_ephemeral_public_key=EPH
                ),
                timeout=30,
            )
            start = camera.wait_for("start_stream").start_stream
            assert start.session_id == opened.session_id
            camera.send(
                stream_accept=device_pb2.StreamAccept(
                    session_id=start.session_id,
                    device_ephemeral_public_key=b"\x02" * 32,
                    signature=b"not checked by the broker",
                )
            )
            assert next(watch).HasField("hello")
            camera.send(media_frame=frame(start.session_id, 1))
            assert next(watch).frame.sequence == 1

            watch.cancel()  # the watcher leaves
            stop = camera.wait_for("stop_stream").stop_stream
            assert (stop.session_id, stop.reason) == (start.session_id, "watcher left")

            for sequence in range(2, 7):  # frames the camera sent before it saw the stop
                camera.send(media_frame=frame(start.session_id, sequence))
            camera.send(heartbeat=device_pb2.Heartbeat(sequence=41))
            assert camera.wait_for("heartbeat_ack").heartbeat_ack.sequence == 41
        finally:
            camera.close()
    stops = [m.stop_stream for m in camera.log if m.WhichOneof("kind") == "stop_stream"]
    assert [(s.session_id, s.reason) for s in stops] == [(start.session_id, "watcher left")]
