"""Identities: SPIFFE IDs of devices, app instances, operators, the broker and its replicas.

Pure functions over parsed certificates; the only place that turns a certificate into an identity (I1).
Anything but exactly one well-formed URI SAN in our trust domain is refused.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography import x509

from broker.errors import InvalidArgument, Unauthenticated
from broker.protocol.spiffe_id import (
    ID_PATTERN,
    OPERATOR_PATTERN,
    REPLICA_PATTERN,
    TRUST_DOMAIN_PATTERN,
    MalformedSpiffeId,
    SpiffeId,
    single_uri_san,
)


class Kind(enum.Enum):
    """What sort of party a verified identity is; each RPC admits exactly one."""

    DEVICE = "device"
    APP = "app"
    OPERATOR = "operator"
    BROKER = "broker"
    # One replica of a fleet, calling or serving the internal listener (never a public RPC).
    REPLICA = "replica"
    # A camera proving itself with a factory birth certificate (factory listener only).
    BIRTH = "birth"
    # No client certificate (bootstrap listener only).
    ANONYMOUS = "anonymous"
    # An RPC deliberately not served on a listener: no caller ever has this kind.
    NOBODY = "nobody"


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified party. ``name`` is its primary id; prefer the accessors that say which one
    (``device_id``, ``user_id``, ``operator_name``, ``replica_name``), which refuse the wrong
    kind."""

    kind: Kind
    trust_domain: str
    name: str
    app_id: str = ""

    @property
    def spiffe(self) -> SpiffeId | None:
        """The typed SPIFFE ID (None for anonymous and birth-certificate callers)."""
        td = self.trust_domain
        match self.kind:
            case Kind.DEVICE:
                return SpiffeId.device(td, self.name)
            case Kind.APP:
                return SpiffeId.app(td, self.name, self.app_id)
            case Kind.OPERATOR:
                return SpiffeId.operator(td, self.name)
            case Kind.BROKER:
                return SpiffeId.broker(td)
            case Kind.REPLICA:
                return SpiffeId.replica(td, self.name)
        return None

    @property
    def spiffe_id(self) -> str:
        """The SPIFFE ID as text ('' for parties that have none)."""
        spiffe = self.spiffe
        return "" if spiffe is None else str(spiffe)

    @property
    def device_id(self) -> str:
        return self._named(Kind.DEVICE, Kind.BIRTH)

    @property
    def user_id(self) -> str:
        return self._named(Kind.APP)

    @property
    def operator_name(self) -> str:
        return self._named(Kind.OPERATOR)

    @property
    def replica_name(self) -> str:
        return self._named(Kind.REPLICA)

    def _named(self, *kinds: Kind) -> str:
        if self.kind not in kinds:
            raise TypeError(f"a {self.kind.value} identity has no such name")
        return self.name


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


def validate_replica_name(name: str) -> str:
    """Return name if it is a valid replica name, else raise InvalidArgument."""
    if not REPLICA_PATTERN.fullmatch(name):
        raise InvalidArgument("replica name must be 1-63 characters of a-z, 0-9, '.', '_' and '-'")
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


def replica(trust_domain: str, name: str) -> Identity:
    """The identity of one broker replica, after validating its name."""
    return Identity(Kind.REPLICA, trust_domain, validate_replica_name(name))


def parse_spiffe_id(uri: str, trust_domain: str) -> Identity:
    """Parse a SPIFFE ID of our trust domain into an Identity; raise Unauthenticated otherwise."""
    if not uri.startswith(f"spiffe://{trust_domain}/"):
        raise Unauthenticated("certificate identity is not in this broker's trust domain")
    try:
        spiffe = SpiffeId.parse(uri)
    except MalformedSpiffeId:
        raise Unauthenticated("certificate URI SAN is not a recognised SPIFFE ID") from None
    match spiffe.kind:
        case "device":
            return Identity(Kind.DEVICE, trust_domain, spiffe.device_id)
        case "app":
            return Identity(Kind.APP, trust_domain, spiffe.user_id, spiffe.app_id)
        case "operator":
            return Identity(Kind.OPERATOR, trust_domain, spiffe.operator_name)
        case "replica":
            return Identity(Kind.REPLICA, trust_domain, spiffe.replica_name)
    return Identity(Kind.BROKER, trust_domain, "broker")


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
