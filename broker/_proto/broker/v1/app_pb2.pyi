from broker._proto.broker.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_OWNER: _ClassVar[Role]
    ROLE_VIEWER: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
ROLE_OWNER: Role
ROLE_VIEWER: Role

class WatchRequest(_message.Message):
    __slots__ = ("session_id", "token", "app_ephemeral_public_key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    APP_EPHEMERAL_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token: str
    app_ephemeral_public_key: bytes
    def __init__(self, session_id: _Optional[str] = ..., token: _Optional[str] = ..., app_ephemeral_public_key: _Optional[bytes] = ...) -> None: ...

class StreamEvent(_message.Message):
    __slots__ = ("hello", "frame", "end")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    hello: StreamHello
    frame: StreamFrame
    end: StreamEnd
    def __init__(self, hello: _Optional[_Union[StreamHello, _Mapping]] = ..., frame: _Optional[_Union[StreamFrame, _Mapping]] = ..., end: _Optional[_Union[StreamEnd, _Mapping]] = ...) -> None: ...

class StreamHello(_message.Message):
    __slots__ = ("session_id", "device_id", "device_certificate_chain_pem", "device_ephemeral_public_key", "signature")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CERTIFICATE_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    DEVICE_EPHEMERAL_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    device_id: str
    device_certificate_chain_pem: str
    device_ephemeral_public_key: bytes
    signature: bytes
    def __init__(self, session_id: _Optional[str] = ..., device_id: _Optional[str] = ..., device_certificate_chain_pem: _Optional[str] = ..., device_ephemeral_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class StreamFrame(_message.Message):
    __slots__ = ("sequence", "ciphertext", "dropped")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    ciphertext: bytes
    dropped: int
    def __init__(self, sequence: _Optional[int] = ..., ciphertext: _Optional[bytes] = ..., dropped: _Optional[int] = ...) -> None: ...

class StreamEnd(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ListAccessRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class AccessEntry(_message.Message):
    __slots__ = ("session_id", "user_id", "username", "app_id", "app_label", "started_at", "ended_at", "outcome", "reason", "bytes")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    APP_LABEL_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    user_id: str
    username: str
    app_id: str
    app_label: str
    started_at: int
    ended_at: int
    outcome: str
    reason: str
    bytes: int
    def __init__(self, session_id: _Optional[str] = ..., user_id: _Optional[str] = ..., username: _Optional[str] = ..., app_id: _Optional[str] = ..., app_label: _Optional[str] = ..., started_at: _Optional[int] = ..., ended_at: _Optional[int] = ..., outcome: _Optional[str] = ..., reason: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class ListAccessResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AccessEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AccessEntry, _Mapping]]] = ...) -> None: ...

class RenewAppCertificateRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: str
    def __init__(self, csr_pem: _Optional[str] = ...) -> None: ...

class RenewAppCertificateResponse(_message.Message):
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

class ClaimDeviceRequest(_message.Message):
    __slots__ = ("device_id", "claim_code")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIM_CODE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    claim_code: str
    def __init__(self, device_id: _Optional[str] = ..., claim_code: _Optional[str] = ...) -> None: ...

class ClaimDeviceResponse(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class ListMyDevicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MyDevice(_message.Message):
    __slots__ = ("device_id", "role", "online", "expires_at", "spiffe_id")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    role: Role
    online: bool
    expires_at: int
    spiffe_id: str
    def __init__(self, device_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., online: _Optional[bool] = ..., expires_at: _Optional[int] = ..., spiffe_id: _Optional[str] = ...) -> None: ...

class ListMyDevicesResponse(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[MyDevice]
    def __init__(self, devices: _Optional[_Iterable[_Union[MyDevice, _Mapping]]] = ...) -> None: ...

class ShareDeviceRequest(_message.Message):
    __slots__ = ("device_id", "username", "expires_at")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    username: str
    expires_at: int
    def __init__(self, device_id: _Optional[str] = ..., username: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class ShareDeviceResponse(_message.Message):
    __slots__ = ("device_id", "user_id")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    user_id: str
    def __init__(self, device_id: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class RevokeShareRequest(_message.Message):
    __slots__ = ("device_id", "username")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    username: str
    def __init__(self, device_id: _Optional[str] = ..., username: _Optional[str] = ...) -> None: ...

class RevokeShareResponse(_message.Message):
    __slots__ = ("sessions_ended",)
    SESSIONS_ENDED_FIELD_NUMBER: _ClassVar[int]
    sessions_ended: int
    def __init__(self, sessions_ended: _Optional[int] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("device_id", "app_ephemeral_public_key")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    APP_EPHEMERAL_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    app_ephemeral_public_key: bytes
    def __init__(self, device_id: _Optional[str] = ..., app_ephemeral_public_key: _Optional[bytes] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "token", "expires_at")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token: str
    expires_at: int
    def __init__(self, session_id: _Optional[str] = ..., token: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class SignOutRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SignOutResponse(_message.Message):
    __slots__ = ("sessions_ended",)
    SESSIONS_ENDED_FIELD_NUMBER: _ClassVar[int]
    sessions_ended: int
    def __init__(self, sessions_ended: _Optional[int] = ...) -> None: ...
