from broker._proto.broker.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResetOwnershipRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetOwnershipResponse(_message.Message):
    __slots__ = ("claim_code", "sessions_ended")
    CLAIM_CODE_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_ENDED_FIELD_NUMBER: _ClassVar[int]
    claim_code: str
    sessions_ended: int
    def __init__(self, claim_code: _Optional[str] = ..., sessions_ended: _Optional[int] = ...) -> None: ...

class RenewCertificateRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: str
    def __init__(self, csr_pem: _Optional[str] = ...) -> None: ...

class RenewCertificateResponse(_message.Message):
    __slots__ = ("certificate_chain_pem", "trust_bundle", "not_after", "renew_after")
    CERTIFICATE_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    RENEW_AFTER_FIELD_NUMBER: _ClassVar[int]
    certificate_chain_pem: str
    trust_bundle: _common_pb2.TrustBundle
    not_after: int
    renew_after: int
    def __init__(self, certificate_chain_pem: _Optional[str] = ..., trust_bundle: _Optional[_Union[_common_pb2.TrustBundle, _Mapping]] = ..., not_after: _Optional[int] = ..., renew_after: _Optional[int] = ...) -> None: ...

class DeviceMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "stream_accept", "stream_reject", "media_frame", "stream_closed")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    STREAM_ACCEPT_FIELD_NUMBER: _ClassVar[int]
    STREAM_REJECT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FRAME_FIELD_NUMBER: _ClassVar[int]
    STREAM_CLOSED_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    stream_accept: StreamAccept
    stream_reject: StreamReject
    media_frame: MediaFrame
    stream_closed: StreamClosed
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., stream_accept: _Optional[_Union[StreamAccept, _Mapping]] = ..., stream_reject: _Optional[_Union[StreamReject, _Mapping]] = ..., media_frame: _Optional[_Union[MediaFrame, _Mapping]] = ..., stream_closed: _Optional[_Union[StreamClosed, _Mapping]] = ...) -> None: ...

class StreamAccept(_message.Message):
    __slots__ = ("session_id", "device_ephemeral_public_key", "signature")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_EPHEMERAL_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    device_ephemeral_public_key: bytes
    signature: bytes
    def __init__(self, session_id: _Optional[str] = ..., device_ephemeral_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class StreamReject(_message.Message):
    __slots__ = ("session_id", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class MediaFrame(_message.Message):
    __slots__ = ("session_id", "sequence", "ciphertext")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    sequence: int
    ciphertext: bytes
    def __init__(self, session_id: _Optional[str] = ..., sequence: _Optional[int] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class StreamClosed(_message.Message):
    __slots__ = ("session_id", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("trust_bundle_version", "firmware_version")
    TRUST_BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    FIRMWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    trust_bundle_version: str
    firmware_version: str
    def __init__(self, trust_bundle_version: _Optional[str] = ..., firmware_version: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sequence", "trust_bundle_version")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    trust_bundle_version: str
    def __init__(self, sequence: _Optional[int] = ..., trust_bundle_version: _Optional[str] = ...) -> None: ...

class BrokerMessage(_message.Message):
    __slots__ = ("accepted", "heartbeat_ack", "trust_bundle_update", "renew_soon", "start_stream", "stop_stream")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_ACK_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_UPDATE_FIELD_NUMBER: _ClassVar[int]
    RENEW_SOON_FIELD_NUMBER: _ClassVar[int]
    START_STREAM_FIELD_NUMBER: _ClassVar[int]
    STOP_STREAM_FIELD_NUMBER: _ClassVar[int]
    accepted: AttachAccepted
    heartbeat_ack: HeartbeatAck
    trust_bundle_update: TrustBundleUpdate
    renew_soon: RenewSoon
    start_stream: StartStream
    stop_stream: StopStream
    def __init__(self, accepted: _Optional[_Union[AttachAccepted, _Mapping]] = ..., heartbeat_ack: _Optional[_Union[HeartbeatAck, _Mapping]] = ..., trust_bundle_update: _Optional[_Union[TrustBundleUpdate, _Mapping]] = ..., renew_soon: _Optional[_Union[RenewSoon, _Mapping]] = ..., start_stream: _Optional[_Union[StartStream, _Mapping]] = ..., stop_stream: _Optional[_Union[StopStream, _Mapping]] = ...) -> None: ...

class StartStream(_message.Message):
    __slots__ = ("session_id", "token", "app_ephemeral_public_key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    APP_EPHEMERAL_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token: str
    app_ephemeral_public_key: bytes
    def __init__(self, session_id: _Optional[str] = ..., token: _Optional[str] = ..., app_ephemeral_public_key: _Optional[bytes] = ...) -> None: ...

class StopStream(_message.Message):
    __slots__ = ("session_id", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AttachAccepted(_message.Message):
    __slots__ = ("device_id", "server_time", "heartbeat_interval_seconds")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    server_time: int
    heartbeat_interval_seconds: int
    def __init__(self, device_id: _Optional[str] = ..., server_time: _Optional[int] = ..., heartbeat_interval_seconds: _Optional[int] = ...) -> None: ...

class HeartbeatAck(_message.Message):
    __slots__ = ("sequence",)
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    def __init__(self, sequence: _Optional[int] = ...) -> None: ...

class TrustBundleUpdate(_message.Message):
    __slots__ = ("trust_bundle",)
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    trust_bundle: _common_pb2.TrustBundle
    def __init__(self, trust_bundle: _Optional[_Union[_common_pb2.TrustBundle, _Mapping]] = ...) -> None: ...

class RenewSoon(_message.Message):
    __slots__ = ("not_after",)
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    not_after: int
    def __init__(self, not_after: _Optional[int] = ...) -> None: ...
