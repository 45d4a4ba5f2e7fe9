from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RevokeAppInstanceRequest(_message.Message):
    __slots__ = ("app_id", "reason")
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    app_id: str
    reason: str
    def __init__(self, app_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeAppInstanceResponse(_message.Message):
    __slots__ = ("app_id", "user_id", "sessions_ended")
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_ENDED_FIELD_NUMBER: _ClassVar[int]
    app_id: str
    user_id: str
    sessions_ended: int
    def __init__(self, app_id: _Optional[str] = ..., user_id: _Optional[str] = ..., sessions_ended: _Optional[int] = ...) -> None: ...

class ReloadPkiRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadPkiResponse(_message.Message):
    __slots__ = ("trust_bundle_version", "bundle_changed", "cameras_notified", "issuing_ca_serial")
    TRUST_BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_CHANGED_FIELD_NUMBER: _ClassVar[int]
    CAMERAS_NOTIFIED_FIELD_NUMBER: _ClassVar[int]
    ISSUING_CA_SERIAL_FIELD_NUMBER: _ClassVar[int]
    trust_bundle_version: str
    bundle_changed: bool
    cameras_notified: int
    issuing_ca_serial: str
    def __init__(self, trust_bundle_version: _Optional[str] = ..., bundle_changed: _Optional[bool] = ..., cameras_notified: _Optional[int] = ..., issuing_ca_serial: _Optional[str] = ...) -> None: ...

class RotationStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotationStatusResponse(_message.Message):
    __slots__ = ("trust_bundle_version", "active_devices", "online_devices", "devices_with_current_bundle", "online_with_current_bundle", "lagging_device_ids", "root_rotation_pending")
    TRUST_BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_DEVICES_FIELD_NUMBER: _ClassVar[int]
    ONLINE_DEVICES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_WITH_CURRENT_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    ONLINE_WITH_CURRENT_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    LAGGING_DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    ROOT_ROTATION_PENDING_FIELD_NUMBER: _ClassVar[int]
    trust_bundle_version: str
    active_devices: int
    online_devices: int
    devices_with_current_bundle: int
    online_with_current_bundle: int
    lagging_device_ids: _containers.RepeatedScalarFieldContainer[str]
    root_rotation_pending: bool
    def __init__(self, trust_bundle_version: _Optional[str] = ..., active_devices: _Optional[int] = ..., online_devices: _Optional[int] = ..., devices_with_current_bundle: _Optional[int] = ..., online_with_current_bundle: _Optional[int] = ..., lagging_device_ids: _Optional[_Iterable[str]] = ..., root_rotation_pending: _Optional[bool] = ...) -> None: ...

class GetCertificateRequest(_message.Message):
    __slots__ = ("serial",)
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    serial: str
    def __init__(self, serial: _Optional[str] = ...) -> None: ...

class GetCertificateResponse(_message.Message):
    __slots__ = ("serial", "spiffe_id", "status", "not_before", "not_after", "superseded_by", "revocation_reason")
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_BY_FIELD_NUMBER: _ClassVar[int]
    REVOCATION_REASON_FIELD_NUMBER: _ClassVar[int]
    serial: str
    spiffe_id: str
    status: str
    not_before: int
    not_after: int
    superseded_by: str
    revocation_reason: str
    def __init__(self, serial: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., status: _Optional[str] = ..., not_before: _Optional[int] = ..., not_after: _Optional[int] = ..., superseded_by: _Optional[str] = ..., revocation_reason: _Optional[str] = ...) -> None: ...

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

class FleetAuditRequest(_message.Message):
    __slots__ = ("since_seconds", "expiring_within_seconds", "fanout_min_devices", "fanout_window_seconds")
    SINCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPIRING_WITHIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FANOUT_MIN_DEVICES_FIELD_NUMBER: _ClassVar[int]
    FANOUT_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    since_seconds: int
    expiring_within_seconds: int
    fanout_min_devices: int
    fanout_window_seconds: int
    def __init__(self, since_seconds: _Optional[int] = ..., expiring_within_seconds: _Optional[int] = ..., fanout_min_devices: _Optional[int] = ..., fanout_window_seconds: _Optional[int] = ...) -> None: ...

class FleetAuditFinding(_message.Message):
    __slots__ = ("kind", "id", "count", "first_seen_ms", "last_seen_ms", "detail", "value")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_MS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    id: str
    count: int
    first_seen_ms: int
    last_seen_ms: int
    detail: str
    value: int
    def __init__(self, kind: _Optional[str] = ..., id: _Optional[str] = ..., count: _Optional[int] = ..., first_seen_ms: _Optional[int] = ..., last_seen_ms: _Optional[int] = ..., detail: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...

class FleetAuditResponse(_message.Message):
    __slots__ = ("generated_at_ms", "since_ms", "possible_clones", "key_reuse", "revoked_attempts", "expiring_offline", "relay_alarms", "session_fanout", "since_seconds", "expiring_within_seconds", "fanout_min_devices", "fanout_window_seconds")
    GENERATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    POSSIBLE_CLONES_FIELD_NUMBER: _ClassVar[int]
    KEY_REUSE_FIELD_NUMBER: _ClassVar[int]
    REVOKED_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    EXPIRING_OFFLINE_FIELD_NUMBER: _ClassVar[int]
    RELAY_ALARMS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FANOUT_FIELD_NUMBER: _ClassVar[int]
    SINCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPIRING_WITHIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FANOUT_MIN_DEVICES_FIELD_NUMBER: _ClassVar[int]
    FANOUT_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    generated_at_ms: int
    since_ms: int
    possible_clones: _containers.RepeatedCompositeFieldContainer[FleetAuditFinding]
    key_reuse: _containers.RepeatedCompositeFieldContainer[FleetAuditFinding]
    revoked_attempts: _containers.RepeatedCompositeFieldContainer[FleetAuditFinding]
    expiring_offline: _containers.RepeatedCompositeFieldContainer[FleetAuditFinding]
    relay_alarms: _containers.RepeatedCompositeFieldContainer[FleetAuditFinding]
    session_fanout: _containers.RepeatedCompositeFieldContainer[FleetAuditFinding]
    since_seconds: int
    expiring_within_seconds: int
    fanout_min_devices: int
    fanout_window_seconds: int
    def __init__(self, generated_at_ms: _Optional[int] = ..., since_ms: _Optional[int] = ..., possible_clones: _Optional[_Iterable[_Union[FleetAuditFinding, _Mapping]]] = ..., key_reuse: _Optional[_Iterable[_Union[FleetAuditFinding, _Mapping]]] = ..., revoked_attempts: _Optional[_Iterable[_Union[FleetAuditFinding, _Mapping]]] = ..., expiring_offline: _Optional[_Iterable[_Union[FleetAuditFinding, _Mapping]]] = ..., relay_alarms: _Optional[_Iterable[_Union[FleetAuditFinding, _Mapping]]] = ..., session_fanout: _Optional[_Iterable[_Union[FleetAuditFinding, _Mapping]]] = ..., since_seconds: _Optional[int] = ..., expiring_within_seconds: _Optional[int] = ..., fanout_min_devices: _Optional[int] = ..., fanout_window_seconds: _Optional[int] = ...) -> None: ...
