from broker._proto.broker.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetCRLRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCRLResponse(_message.Message):
    __slots__ = ("crl_pem",)
    CRL_PEM_FIELD_NUMBER: _ClassVar[int]
    crl_pem: str
    def __init__(self, crl_pem: _Optional[str] = ...) -> None: ...

class GetTrustBundleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTrustBundleResponse(_message.Message):
    __slots__ = ("trust_bundle",)
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    trust_bundle: _common_pb2.TrustBundle
    def __init__(self, trust_bundle: _Optional[_Union[_common_pb2.TrustBundle, _Mapping]] = ...) -> None: ...

class EnrollDeviceRequest(_message.Message):
    __slots__ = ("csr_pem", "enrollment_token")
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    csr_pem: str
    enrollment_token: str
    def __init__(self, csr_pem: _Optional[str] = ..., enrollment_token: _Optional[str] = ...) -> None: ...

class EnrollDeviceResponse(_message.Message):
    __slots__ = ("device_id", "spiffe_id", "certificate_chain_pem", "trust_bundle", "not_after", "renew_after", "claim_code")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    RENEW_AFTER_FIELD_NUMBER: _ClassVar[int]
    CLAIM_CODE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    spiffe_id: str
    certificate_chain_pem: str
    trust_bundle: _common_pb2.TrustBundle
    not_after: int
    renew_after: int
    claim_code: str
    def __init__(self, device_id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., certificate_chain_pem: _Optional[str] = ..., trust_bundle: _Optional[_Union[_common_pb2.TrustBundle, _Mapping]] = ..., not_after: _Optional[int] = ..., renew_after: _Optional[int] = ..., claim_code: _Optional[str] = ...) -> None: ...

class CreateAccountRequest(_message.Message):
    __slots__ = ("username", "password")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    username: str
    password: str
    def __init__(self, username: _Optional[str] = ..., password: _Optional[str] = ...) -> None: ...

class CreateAccountResponse(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class EnrollAppRequest(_message.Message):
    __slots__ = ("username", "password", "csr_pem", "label")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    username: str
    password: str
    csr_pem: str
    label: str
    def __init__(self, username: _Optional[str] = ..., password: _Optional[str] = ..., csr_pem: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class EnrollAppResponse(_message.Message):
    __slots__ = ("user_id", "app_id", "spiffe_id", "certificate_chain_pem", "trust_bundle", "not_after", "renew_after")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    RENEW_AFTER_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    app_id: str
    spiffe_id: str
    certificate_chain_pem: str
    trust_bundle: _common_pb2.TrustBundle
    not_after: int
    renew_after: int
    def __init__(self, user_id: _Optional[str] = ..., app_id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., certificate_chain_pem: _Optional[str] = ..., trust_bundle: _Optional[_Union[_common_pb2.TrustBundle, _Mapping]] = ..., not_after: _Optional[int] = ..., renew_after: _Optional[int] = ...) -> None: ...

class RenewExpiredCertificateRequest(_message.Message):
    __slots__ = ("certificate_chain_pem", "csr_pem", "nonce", "timestamp", "signature")
    CERTIFICATE_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    certificate_chain_pem: str
    csr_pem: str
    nonce: bytes
    timestamp: int
    signature: bytes
    def __init__(self, certificate_chain_pem: _Optional[str] = ..., csr_pem: _Optional[str] = ..., nonce: _Optional[bytes] = ..., timestamp: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class RenewExpiredCertificateResponse(_message.Message):
    __slots__ = ("spiffe_id", "certificate_chain_pem", "trust_bundle", "not_after", "renew_after")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    RENEW_AFTER_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    certificate_chain_pem: str
    trust_bundle: _common_pb2.TrustBundle
    not_after: int
    renew_after: int
    def __init__(self, spiffe_id: _Optional[str] = ..., certificate_chain_pem: _Optional[str] = ..., trust_bundle: _Optional[_Union[_common_pb2.TrustBundle, _Mapping]] = ..., not_after: _Optional[int] = ..., renew_after: _Optional[int] = ...) -> None: ...
