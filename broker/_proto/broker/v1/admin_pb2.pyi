from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateEnrollmentTokenRequest(_message.Message):
    __slots__ = ("device_id", "ttl_seconds")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    ttl_seconds: int
    def __init__(self, device_id: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class CreateEnrollmentTokenResponse(_message.Message):
    __slots__ = ("device_id", "enrollment_token", "expires_at")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    enrollment_token: str
    expires_at: int
    def __init__(self, device_id: _Optional[str] = ..., enrollment_token: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class RevokeDeviceRequest(_message.Message):
    __slots__ = ("device_id", "reason")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    reason: str
    def __init__(self, device_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeDeviceResponse(_message.Message):
    __slots__ = ("device_id", "revoked_serials", "attach_streams_closed")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REVOKED_SERIALS_FIELD_NUMBER: _ClassVar[int]
    ATTACH_STREAMS_CLOSED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    revoked_serials: _containers.RepeatedScalarFieldContainer[str]
    attach_streams_closed: int
    def __init__(self, device_id: _Optional[str] = ..., revoked_serials: _Optional[_Iterable[str]] = ..., attach_streams_closed: _Optional[int] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeviceSummary(_message.Message):
    __slots__ = ("device_id", "state", "online", "created_at", "certificate_not_after", "certificate_serial")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_SERIAL_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    state: str
    online: bool
    created_at: int
    certificate_not_after: int
    certificate_serial: str
    def __init__(self, device_id: _Optional[str] = ..., state: _Optional[str] = ..., online: _Optional[bool] = ..., created_at: _Optional[int] = ..., certificate_not_after: _Optional[int] = ..., certificate_serial: _Optional[str] = ...) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceSummary]
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceSummary, _Mapping]]] = ...) -> None: ...
