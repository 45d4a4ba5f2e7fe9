"""Event kinds and the codec between ``Effects`` and the JSON payload of an event row.

A committed change that ends sessions or Attach streams appends an ``effects`` event in the same
unit of work; every other replica decodes it and applies it to its own live streams. Errors travel
as ``{"code": <BrokerError subclass name>, "message": ...}`` and are rebuilt as the same class, so
the camera or viewer on another replica sees exactly the status it would see here. A trust change
is not serialized: ``pki.reloaded`` tells each replica to re-read certs/ itself.
"""

from __future__ import annotations

from typing import Any

from broker import errors
from broker.errors import BrokerError
from broker.outcomes import Effects, EndAttach, EndSessions

EFFECTS = "effects"  # payload: effects_to_payload(...)
PKI_RELOADED = "pki.reloaded"  # payload: {"trust_bundle_version": ...}; each replica reloads
KINDS = frozenset({EFFECTS, PKI_RELOADED})
PAYLOAD_VERSION = 1


def _error_classes() -> dict[str, type[BrokerError]]:
    """Every BrokerError class of broker.errors whose constructor takes just a message."""
    found: dict[str, type[BrokerError]] = {}
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, BrokerError):
            found[value.__name__] = value
    # Built by the request decoder from a message type, never the outcome of a committed change.
    found.pop(errors.UndecodableRequest.__name__, None)
    return found


ERROR_CLASSES = _error_classes()


class EventPayloadError(ValueError):
    """An event payload this replica cannot decode (unknown kind, shape or error code)."""


def error_to_payload(error: BrokerError) -> dict[str, str]:
    """The nearest class of broker.errors (store subclasses such as DuplicateKey map to their
    parent) and the message."""
    for cls in type(error).__mro__:
        if ERROR_CLASSES.get(cls.__name__) is cls:
            return {"code": cls.__name__, "message": error.message}
    raise EventPayloadError(f"{type(error).__name__} cannot be carried by an event")


def payload_to_error(payload: Any) -> BrokerError:
    data = _mapping(payload, "error")
    code = _string(data, "code")
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        raise EventPayloadError(f"unknown error code {code!r} in an event")
    return cls(_string(data, "message"))


def effects_to_payload(effects: Effects) -> dict[str, Any]:
    """The JSON-ready payload of an ``effects`` event. Trust changes are refused: a PKI reload is
    announced with a ``pki.reloaded`` event and re-read by each replica."""
    if effects.trust is not None:
        raise EventPayloadError("a trust change travels as a pki.reloaded event, not as effects")
    return {
        "v": PAYLOAD_VERSION,
        "end_sessions": [
            {
                "reason": end.reason,
                "session_ids": list(end.session_ids),
                "device_id": end.device_id,
                "user_id": end.user_id,
                "app_id": end.app_id,
            }
            for end in effects.end_sessions
        ],
        "end_attach": [
            {"device_id": end.device_id, "error": error_to_payload(end.error), "epoch": end.epoch}
            for end in effects.end_attach
        ],
        "revocations_changed": effects.revocations_changed,
    }


def payload_to_effects(payload: Any, trust_domain: str) -> Effects:
    """Rebuild the Effects of an ``effects`` event; anything malformed raises EventPayloadError
    (trust_domain names this replica in the refusal: one store serves one trust domain)."""
    try:
        data = _mapping(payload, "payload")
        if data.get("v") != PAYLOAD_VERSION:
            raise EventPayloadError(f"unsupported payload version {data.get('v')!r}")
        end_sessions = tuple(
            EndSessions(
                _string(item, "reason"),
                tuple(_strings(item, "session_ids")),
                _string(item, "device_id"),
                _string(item, "user_id"),
                _string(item, "app_id"),
            )
            for item in (_mapping(i, "end_sessions item") for i in _list(data, "end_sessions"))
        )
        end_attach = tuple(
            EndAttach(
                _string(item, "device_id"),
                payload_to_error(item.get("error")),
                _int(item, "epoch"),
            )
            for item in (_mapping(i, "end_attach item") for i in _list(data, "end_attach"))
        )
        changed = data.get("revocations_changed")
        if not isinstance(changed, bool):
            raise EventPayloadError("revocations_changed must be a boolean")
    except EventPayloadError as exc:
        raise EventPayloadError(f"event refused by a replica of {trust_domain}: {exc}") from None
    return Effects(end_sessions, end_attach, None, changed)


def pki_reloaded_payload(trust_bundle_version: str) -> dict[str, Any]:
    """The payload of a ``pki.reloaded`` event (the bundle version the announcing replica read)."""
    return {"v": PAYLOAD_VERSION, "trust_bundle_version": trust_bundle_version}


# -- strict readers of decoded JSON --------------------------------------------------------------
def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EventPayloadError(f"{what} must be an object")
    return value


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list):
        raise EventPayloadError(f"{key} must be a list")
    return value


def _string(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise EventPayloadError(f"{key} must be a string")
    return value


def _strings(data: dict[str, Any], key: str) -> list[str]:
    values = _list(data, key)
    if not all(isinstance(v, str) for v in values):
        raise EventPayloadError(f"{key} must be a list of strings")
    return values


def _int(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise EventPayloadError(f"{key} must be a non-negative integer")
    return value
