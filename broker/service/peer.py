"""Reading the verified TLS peer certificate into an Identity, parsed once per distinct PEM."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import grpc
from cryptography import x509

from broker.errors import BrokerError, Unauthenticated
from broker.identity.spiffe import ANONYMOUS, Identity, Kind, birth_device_id, from_certificate
from broker.pki.ca import fingerprint, serial_hex
from broker.protocol.e2e import directly_issued
from broker.service.gate import ClientAddresses

PEM_KEY = "x509_pem_cert"
CACHE_SIZE = 20_000


@dataclass(frozen=True, slots=True)
class Caller:
    """The verified party behind an RPC (I1): derived from the TLS peer certificate only."""

    identity: Identity
    certificate: x509.Certificate | None = None
    serial: str = ""
    fingerprint: str = ""


ANONYMOUS_CALLER = Caller(ANONYMOUS)


def peer_pem(context: grpc.aio.ServicerContext) -> bytes | None:
    """The PEM of the certificate the TLS layer verified for this call, if the peer sent one."""
    values = context.auth_context().get(PEM_KEY)
    return values[0] if values else None


def peer_address(context: grpc.aio.ServicerContext, clients: ClientAddresses) -> str:
    """The client's IP address (port dropped; through a connection gate, the address of the
    client the gate admitted), for per-address rate limits and logs."""
    return clients.address_of(context.peer() or "")


class PeerParser:
    """Turns verified peer PEMs into Callers; results (and failures) are cached per PEM."""

    def __init__(self, trust_domain: str, issuers: list[x509.Certificate]) -> None:
        self._trust_domain = trust_domain
        self._issuers = _key_names(issuers)
        self._issuer_certs = list(issuers)
        self._cache: OrderedDict[tuple[bytes, Kind], Caller | BrokerError] = OrderedDict()

    def reset(self, issuers: list[x509.Certificate]) -> None:
        """Trust a new set of issuing CAs (after rotation); forget every cached verdict."""
        self._issuers = _key_names(issuers)
        self._issuer_certs = list(issuers)
        self._cache.clear()

    def parse(self, pem: bytes, expected: Kind) -> Caller:
        """Caller for pem under the listener's expectation (BIRTH or certificate identity)."""
        key = (pem, Kind.BIRTH if expected is Kind.BIRTH else Kind.DEVICE)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._parse_uncached(pem, expected)
            self._cache[key] = hit
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        if isinstance(hit, BrokerError):
            raise hit
        return hit

    def _issued_by_trusted(self, cert: x509.Certificate) -> bool:
        if _issuer_key_name(cert) in self._issuers:
            return True  # the common case: no signature check (see _issuer_key_name)
        # No key identifiers to match (a vendor's factory CA may omit them), or none matched
        # (then this refuses, at the cost of the signature checks, cached per certificate).
        return any(directly_issued(cert, issuer) for issuer in self._issuer_certs)

    def _parse_uncached(self, pem: bytes, expected: Kind) -> Caller | BrokerError:
        try:
            cert = x509.load_pem_x509_certificate(pem)
            if not self._issued_by_trusted(cert):
                return Unauthenticated("certificate was not issued by a CA this listener trusts")
            if expected is Kind.BIRTH:
                identity = Identity(Kind.BIRTH, "", birth_device_id(cert))
            else:
                identity = from_certificate(cert, self._trust_domain)
            return Caller(identity, cert, serial_hex(cert.serial_number), fingerprint(cert))
        except BrokerError as error:
            return error
        except ValueError:
            return Unauthenticated("peer certificate could not be parsed")


KeyName = tuple[bytes, bytes]  # (DER subject name, key identifier)


def _key_names(issuers: list[x509.Certificate]) -> frozenset[KeyName]:
    """Each trusted issuing CA that has a subjectKeyIdentifier, as (subject, SKI)."""
    names = set()
    for issuer in issuers:
        try:
            ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            continue
        names.add((issuer.subject.public_bytes(), ski.digest))
    return frozenset(names)


def _issuer_key_name(cert: x509.Certificate) -> KeyName | None:
    """The leaf's (issuer, authorityKeyIdentifier): which CA key signed it.

    No second signature check: TLS already verified the chain, and path building only accepts
    as the leaf's issuer a certificate whose subject and key identifier match these (RFC 5280
    4.2.1.1). Every CA certificate that chains to our roots is one we issued, with the key
    identifier derived from its key, so a match names exactly one trusted issuing key; a leaf
    of a retired or foreign issuing CA does not match (I1, I7). None without an AKI."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    if aki.key_identifier is None:
        return None
    return (cert.issuer.public_bytes(), aki.key_identifier)
