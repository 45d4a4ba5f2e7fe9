"""SPIFFE IDs as a typed value: the one module that parses and formats them (shared with the SDKs).

The broker names every party by one URI SAN of the form ``spiffe://<trust-domain>/<path>``:
``device/<device_id>``, ``user/<user_id>/app/<app_id>``, ``operator/<name>``, ``broker``, and
``broker/replica/<name>`` for one replica of a fleet (its internal listener and forwarded calls).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

from broker.errors import Unauthenticated

SCHEME = "spiffe://"
# Device, user and app IDs end up inside URI paths and file names: a fixed lowercase alphabet
# (no dots, no slashes, no percent-escapes) so two spellings can never name the same party.
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{2,63}$")
OPERATOR_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# Replica names use the operator alphabet (they also end up in file names: certs/replicas/<name>).
REPLICA_PATTERN = OPERATOR_PATTERN
TRUST_DOMAIN_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?$")


class MalformedSpiffeId(ValueError):
    """The text is not a SPIFFE ID of a shape the broker issues."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed SPIFFE ID: trust domain and path segments."""

    trust_domain: str
    path: tuple[str, ...]

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}/{'/'.join(self.path)}"

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse and check the shape; raises MalformedSpiffeId on anything else."""
        if not uri.startswith(SCHEME):
            raise MalformedSpiffeId("not a spiffe:// URI")
        trust_domain, _, rest = uri[len(SCHEME) :].partition("/")
        if not TRUST_DOMAIN_PATTERN.fullmatch(trust_domain) or ".." in trust_domain:
            raise MalformedSpiffeId("bad trust domain")
        parsed = cls(trust_domain, tuple(rest.split("/")))
        if parsed.kind == "":
            raise MalformedSpiffeId("unrecognised SPIFFE ID path")
        return parsed

    @classmethod
    def device(cls, trust_domain: str, device_id: str) -> SpiffeId:
        return cls(trust_domain, ("device", device_id))

    @classmethod
    def app(cls, trust_domain: str, user_id: str, app_id: str) -> SpiffeId:
        return cls(trust_domain, ("user", user_id, "app", app_id))

    @classmethod
    def operator(cls, trust_domain: str, name: str) -> SpiffeId:
        return cls(trust_domain, ("operator", name))

    @classmethod
    def broker(cls, trust_domain: str) -> SpiffeId:
        return cls(trust_domain, ("broker",))

    @classmethod
    def replica(cls, trust_domain: str, name: str) -> SpiffeId:
        return cls(trust_domain, ("broker", "replica", name))

    @property
    def kind(self) -> str:
        """'device', 'app', 'operator', 'broker', 'replica', or '' for a path of no known shape."""
        match self.path:
            case ("device", device_id) if ID_PATTERN.fullmatch(device_id):
                return "device"
            case ("user", user_id, "app", app_id) if ID_PATTERN.fullmatch(
                user_id
            ) and ID_PATTERN.fullmatch(app_id):
                return "app"
            case ("operator", name) if OPERATOR_PATTERN.fullmatch(name):
                return "operator"
            case ("broker",):
                return "broker"
            case ("broker", "replica", name) if REPLICA_PATTERN.fullmatch(name):
                return "replica"
        return ""

    @property
    def device_id(self) -> str:
        """The device id of a device SPIFFE ID (MalformedSpiffeId for any other kind)."""
        if self.kind != "device":
            raise MalformedSpiffeId("not a device SPIFFE ID")
        return self.path[1]

    @property
    def user_id(self) -> str:
        """The user id of an app-instance SPIFFE ID."""
        if self.kind != "app":
            raise MalformedSpiffeId("not an app-instance SPIFFE ID")
        return self.path[1]

    @property
    def app_id(self) -> str:
        """The app id of an app-instance SPIFFE ID."""
        if self.kind != "app":
            raise MalformedSpiffeId("not an app-instance SPIFFE ID")
        return self.path[3]

    @property
    def operator_name(self) -> str:
        """The name of an operator SPIFFE ID."""
        if self.kind != "operator":
            raise MalformedSpiffeId("not an operator SPIFFE ID")
        return self.path[1]

    @property
    def replica_name(self) -> str:
        """The name of a broker-replica SPIFFE ID."""
        if self.kind != "replica":
            raise MalformedSpiffeId("not a broker-replica SPIFFE ID")
        return self.path[2]


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
