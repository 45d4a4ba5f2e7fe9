"""The event codec: every Effects shape survives a trip through an event row (as JSON), errors come
back as the same BrokerError class with the same message, and anything unknown is refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker import errors
from broker.cluster.events import (
    ERROR_CLASSES,
    EventPayloadError,
    effects_to_payload,
    payload_to_effects,
)
from broker.outcomes import Effects, EndAttach, EndSessions, TrustChanged
from broker.store import DuplicateKey

TD = "example.test"


def trip(effects: Effects) -> Effects:
    """Encode, store as JSON text (as both backends do), decode."""
    return payload_to_effects(json.loads(json.dumps(effects_to_payload(effects))), TD)


def same(a: Effects, b: Effects) -> None:
    assert a.end_sessions == b.end_sessions
    assert a.revocations_changed == b.revocations_changed
    assert a.trust is None and b.trust is None
    assert len(a.end_attach) == len(b.end_attach)
    for x, y in zip(a.end_attach, b.end_attach, strict=True):
        assert (x.device_id, x.epoch, type(x.error), x.error.message) == (
            y.device_id,
            y.epoch,
            type(y.error),
            y.error.message,
        )


SHAPES = {
    "empty": Effects(),
    "revocations only": Effects(revocations_changed=True),
    "device revoked": Effects(
        end_sessions=(EndSessions("device revoked", ("s-1", "s-2"), device_id="cam-1"),),
        end_attach=(EndAttach("cam-1", errors.Unauthenticated("device certificate revoked")),),
        revocations_changed=True,
    ),
    "app signed out": Effects(
        end_sessions=(EndSessions("app instance signed out", (), app_id="app-1"),),
        revocations_changed=True,
    ),
    "share revoked": Effects(
        end_sessions=(EndSessions("share revoked", ("s-9",), device_id="cam-2", user_id="u-1"),)
    ),
    "ownership reset": Effects(end_sessions=(EndSessions("ownership reset", device_id="cam-3"),)),
    "fenced attach": Effects(
        end_attach=(
            EndAttach("cam-4", errors.Unauthenticated("replaced by a newer Attach"), epoch=7),
            EndAttach("cam-5", errors.Unavailable("broker draining"), epoch=1),
        )
    ),
    "several": Effects(
        end_sessions=(
            EndSessions("a", ("s-1",)),
            EndSessions("b", (), device_id="cam-1", user_id="u-1", app_id="app-1"),
        ),
        end_attach=(EndAttach("cam-1", errors.FailedPrecondition("x"), 3),),
        revocations_changed=False,
    ),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_effects_shape_round_trips(name: str) -> None:
    same(trip(SHAPES[name]), SHAPES[name])


@pytest.mark.parametrize("code", sorted(ERROR_CLASSES))
def test_every_error_class_comes_back_as_itself(code: str) -> None:
    error = ERROR_CLASSES[code]("the reason the caller sees")
    back = trip(Effects(end_attach=(EndAttach("cam-1", error, 2),))).end_attach[0].error
    assert type(back) is type(error)
    assert back.message == "the reason the caller sees"


def test_every_error_class_but_the_request_decoders_is_carried() -> None:
    tree = {c.__name__ for c in vars(errors).values() if isinstance(c, type)}
    tree = {n for n in tree if issubclass(getattr(errors, n), errors.BrokerError)}
    assert set(ERROR_CLASSES) == tree - {"UndecodableRequest"}


def test_a_store_error_travels_as_its_broker_errors_parent() -> None:
    effects = Effects(end_attach=(EndAttach("cam-1", DuplicateKey("dup"), 1),))
    assert effects_to_payload(effects)["end_attach"][0]["error"]["code"] == "AlreadyExists"
    assert type(trip(effects).end_attach[0].error) is errors.AlreadyExists


def test_an_error_outside_the_table_travels_as_its_nearest_parent() -> None:
    class Local(errors.Unauthenticated):
        pass

    for error, parent in [
        (errors.UndecodableRequest("X"), errors.InvalidArgument),
        (Local("m"), errors.Unauthenticated),
    ]:
        back = trip(Effects(end_attach=(EndAttach("cam-1", error, 1),))).end_attach[0].error
        assert type(back) is parent
        assert back.message == error.message


def test_trust_changes_are_not_serialized() -> None:
    from broker.pki.trust import TrustBundle

    bundle = TrustBundle.__new__(TrustBundle)
    with pytest.raises(EventPayloadError, match=r"pki\.reloaded"):
        effects_to_payload(Effects(trust=TrustChanged(bundle, True, ())))


def payload_with_error(error: Any) -> dict[str, Any]:
    payload = effects_to_payload(SHAPES["device revoked"])
    payload["end_attach"][0]["error"] = error
    return payload


@pytest.mark.parametrize(
    "error",
    [
        {"code": "Exception", "message": "x"},
        {"code": "SystemExit", "message": "x"},
        {"code": "UndecodableRequest", "message": "x"},
        {"code": "unauthenticated", "message": "x"},
        {"code": "", "message": "x"},
        {"message": "x"},
        {"code": "Unauthenticated"},
        "Unauthenticated",
    ],
)
def test_an_unknown_or_malformed_error_is_refused(error: Any) -> None:
    with pytest.raises(EventPayloadError):
        payload_to_effects(payload_with_error(error), TD)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p.pop("v"),
        lambda p: p.update(v=2),
        lambda p: p.update(end_sessions="x"),
        lambda p: p.pop("end_attach"),
        lambda p: p.update(revocations_changed="yes"),
        lambda p: p["end_sessions"][0].update(session_ids=[1]),
        lambda p: p["end_sessions"][0].pop("reason"),
        lambda p: p["end_attach"][0].update(epoch=-1),
        lambda p: p["end_attach"][0].update(epoch=True),
        lambda p: p["end_attach"][0].update(device_id=None),
    ],
)
def test_a_malformed_payload_is_refused(mutate: Any) -> None:
    payload = effects_to_payload(SHAPES["device revoked"])
    mutate(payload)
    with pytest.raises(EventPayloadError, match=TD):
        payload_to_effects(payload, TD)


def test_a_payload_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(EventPayloadError):
        payload_to_effects([], TD)
