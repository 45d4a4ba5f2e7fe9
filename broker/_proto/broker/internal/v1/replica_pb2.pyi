from broker._proto.broker.v1 import app_pb2 as _app_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ForwardWatchRequest(_message.Message):
    __slots__ = ("session_id", "token", "app_ephemeral_public_key", "app_spiffe_id", "cnf_thumbprint", "attach_epoch")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    APP_EPHEMERAL_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    APP_SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CNF_THUMBPRINT_FIELD_NUMBER: _ClassVar[int]
    ATTACH_EPOCH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token: str
    app_ephemeral_public_key: bytes
    app_spiffe_id: str
    cnf_thumbprint: str
    attach_epoch: int
    def __init__(self, session_id: _Optional[str] = ..., token: _Optional[str] = ..., app_ephemeral_public_key: _Optional[bytes] = ..., app_spiffe_id: _Optional[str] = ..., cnf_thumbprint: _Optional[str] = ..., attach_epoch: _Optional[int] = ...) -> None: ...
