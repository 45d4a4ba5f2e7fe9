"""Identities: SPIFFE IDs of devices, app instances, operators and the broker.

Pure functions over parsed certificates; the only place that turns a certificate into an identity (I1).
Anything but exactly one well-formed URI SAN in our trust domain is refused.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from cryptography import x509

from broker.errors import InvalidArgument, Unauthenticated

# Device, user and app IDs end up inside URI paths and file names: a fixed lowercase alphabet
# (no dots, no slashes, no percent-escapes) so two spellings can never name the same party.
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{2,63}$")
OPERATOR_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
TRUST_DOMAIN_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?$")


class Kind(enum.Enum):
    """What sort of party a verified identity is; each RPC admits exactly one."""

    DEVICE = "device"
    APP = "app"
    OPERATOR = "operator"
    BROKER = "broker"
    # A camera proving itself with a factory birth certificate (factory listener only).
    BIRTH = "birth"
    # No client certificate (bootstrap listener only).
    ANONYMOUS = "anonymous"
    # An RPC deliberately not served on a listener: no caller ever has this kind.
    NOBODY = "nobody"


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified party. ``name`` is the device_id, operator name, or user_id for apps."""

    kind: Kind
    trust_domain: str
    name: str
    app_id: str = ""

    @property
    def spiffe_id(self) -> str:
        base = f"spiffe://{self.trust_domain}"
        if self.kind is Kind.DEVICE:
            return f"{base}/device/{self.name}"
        if self.kind is Kind.APP:
            return f"{base}/user/{self.name}/app/{self.app_id}"
        if self.kind is Kind.OPERATOR:
            return f"{base}/operator/{self.name}"
        if self.kind is Kind.BROKER:
            return f"{base}/broker"
        return ""


ANONYMOUS = Identity(Kind.ANONYMOUS, "", "")


def validate_device_id(device_id: str) -> str:
    """Return device_id if it uses the safe alphabet, else raise InvalidArgument."""
    if not ID_PATTERN.fullmatch(device_id):
        raise InvalidArgument(
            "device_id must be 3-64 characters of a-z, 0-9 and '-', starting with a letter or digit"
        )
    return device_id


def validate_operator_name(name: str) -> str:
    """Return name if it is a valid operator name, else raise InvalidArgument."""
    if not OPERATOR_PATTERN.fullmatch(name):
        raise InvalidArgument("operator name must be 1-63 characters of a-z, 0-9, '.', '_' and '-'")
    return name


def validate_trust_domain(trust_domain: str) -> str:
    """Return the trust domain if it is a lowercase DNS-style name, else raise InvalidArgument."""
    if not TRUST_DOMAIN_PATTERN.fullmatch(trust_domain) or ".." in trust_domain:
        raise InvalidArgument(f"trust domain {trust_domain!r} must be a lowercase DNS name")
    return trust_domain


def device(trust_domain: str, device_id: str) -> Identity:
    """The identity of a device, after validating its ID."""
    return Identity(Kind.DEVICE, trust_domain, validate_device_id(device_id))


def operator(trust_domain: str, name: str) -> Identity:
    """The identity of an operator, after validating its name."""
    return Identity(Kind.OPERATOR, trust_domain, validate_operator_name(name))


def broker(trust_domain: str) -> Identity:
    """The broker's own identity."""
    return Identity(Kind.BROKER, trust_domain, "broker")


def parse_spiffe_id(uri: str, trust_domain: str) -> Identity:
    """Parse a SPIFFE ID of our trust domain into an Identity; raise Unauthenticated otherwise."""
    prefix = f"spiffe://{trust_domain}/"
    if not uri.startswith(prefix):
        raise Unauthenticated("certificate identity is not in this broker's trust domain")
    parts = uri[len(prefix) :].split("/")
    match parts:
        case ["device", device_id] if ID_PATTERN.fullmatch(device_id):
            return Identity(Kind.DEVICE, trust_domain, device_id)
        case ["user", user_id, "app", app_id] if ID_PATTERN.fullmatch(
            user_id
        ) and ID_PATTERN.fullmatch(app_id):
            return Identity(Kind.APP, trust_domain, user_id, app_id)
        case ["operator", name] if OPERATOR_PATTERN.fullmatch(name):
            return Identity(Kind.OPERATOR, trust_domain, name)
        case ["broker"]:
            return Identity(Kind.BROKER, trust_domain, "broker")
    raise Unauthenticated("certificate URI SAN is not a recognised SPIFFE ID")


def single_uri_san(cert: x509.Certificate) -> str:
    """The certificate's one URI SAN; Unauthenticated unless there is exactly one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise Unauthenticated("certificate has no subject alternative name") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise Unauthenticated("certificate must carry exactly one URI SAN")
    return uris[0]


def from_certificate(cert: x509.Certificate, trust_domain: str) -> Identity:
    """The identity a verified certificate proves: from its single URI SAN and nothing else (I1)."""
    return parse_spiffe_id(single_uri_san(cert), trust_domain)


def birth_device_id(cert: x509.Certificate) -> str:
    """The device_id a factory birth certificate names: its subject serialNumber attribute."""
    attrs = cert.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)
    if len(attrs) != 1:
        raise Unauthenticated("birth certificate must carry exactly one subject serialNumber")
    value = attrs[0].value
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            "birth certificate serialNumber is not a valid device_id "
            "(3-64 characters of a-z, 0-9 and '-')"
        )
    return value
