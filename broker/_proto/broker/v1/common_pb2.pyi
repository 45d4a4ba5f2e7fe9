from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class TrustBundle(_message.Message):
    __slots__ = ("ca_certificates_pem", "version", "issuing_certificates_pem", "jwks_json")
    CA_CERTIFICATES_PEM_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ISSUING_CERTIFICATES_PEM_FIELD_NUMBER: _ClassVar[int]
    JWKS_JSON_FIELD_NUMBER: _ClassVar[int]
    ca_certificates_pem: str
    version: str
    issuing_certificates_pem: str
    jwks_json: str
    def __init__(self, ca_certificates_pem: _Optional[str] = ..., version: _Optional[str] = ..., issuing_certificates_pem: _Optional[str] = ..., jwks_json: _Optional[str] = ...) -> None: ...
