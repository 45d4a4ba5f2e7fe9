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
    __slots__ = ("hello", "heartbeat")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("accepted", "heartbeat_ack", "trust_bundle_update", "renew_soon")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_ACK_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_UPDATE_FIELD_NUMBER: _ClassVar[int]
    RENEW_SOON_FIELD_NUMBER: _ClassVar[int]
    accepted: AttachAccepted
    heartbeat_ack: HeartbeatAck
    trust_bundle_update: TrustBundleUpdate
    renew_soon: RenewSoon
    def __init__(self, accepted: _Optional[_Union[AttachAccepted, _Mapping]] = ..., heartbeat_ack: _Optional[_Union[HeartbeatAck, _Mapping]] = ..., trust_bundle_update: _Optional[_Union[TrustBundleUpdate, _Mapping]] = ..., renew_soon: _Optional[_Union[RenewSoon, _Mapping]] = ...) -> None: ...

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
