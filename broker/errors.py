"""The one error tree of the broker core.

Core modules raise these; ``broker.service.status`` maps each class to exactly one gRPC status code.
Messages are shown to callers (firmware authors), so they say what to fix and never carry secrets.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error the broker reports to a caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(BrokerError):
    """The request is malformed; fixing the request can make it succeed."""


class UndecodableRequest(InvalidArgument):
    """A request message is not valid protobuf for its type, or has a string field that is not
    valid UTF-8. Raised by the decoder the service layer installs, before any handler runs."""

    def __init__(self, message_type: str) -> None:
        super().__init__(
            f"request is not a valid {message_type} message: "
            "malformed protobuf or a string field that is not valid UTF-8"
        )
        self.message_type = message_type


class Unauthenticated(BrokerError):
    """The caller's credentials are missing, unknown, expired or revoked."""


class PermissionDenied(BrokerError):
    """The caller is authenticated but may not do this (or the secret it presented is not valid)."""


class NotFound(BrokerError):
    """The named object does not exist."""


class AlreadyExists(BrokerError):
    """The object to create exists already."""


class FailedPrecondition(BrokerError):
    """The system is not in a state where this can be done (e.g. the device is revoked)."""


class ResourceExhausted(BrokerError):
    """A rate limit or capacity limit was hit; retry later. ``limit`` names which one (the
    limiter's scope, e.g. "login.user", or "core_queue"), for metrics and audit, never the client."""

    def __init__(self, message: str, retry_after_seconds: float = 1.0, limit: str = "") -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
        self.limit = limit


class Unavailable(BrokerError):
    """Transient: the broker cannot serve this right now."""


class ConfigurationError(BrokerError):
    """The broker is misconfigured; raised at start-up, never per request."""


class Contention(Unavailable):
    """The store kept hitting serialization failures for this request; retry after a moment."""

    def __init__(self, message: str, retry_after_seconds: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
