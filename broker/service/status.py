"""The one table mapping BrokerError classes to gRPC status codes."""

from __future__ import annotations

import grpc

from broker import errors

STATUS_BY_ERROR: dict[type[errors.BrokerError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UndecodableRequest: grpc.StatusCode.INVALID_ARGUMENT,  # requests that fail to decode
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ConfigurationError: grpc.StatusCode.INTERNAL,
}


def status_for(error: errors.BrokerError) -> grpc.StatusCode:
    """The status code for an error: the nearest mapped class in its MRO; INTERNAL if none."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.INTERNAL


def trailing_details(error: errors.BrokerError) -> tuple[tuple[str, bytes], ...]:
    """google.rpc.Status details for errors that carry them (RetryInfo on RESOURCE_EXHAUSTED,
    and on UNAVAILABLE when the store gave up on contention)."""
    if not isinstance(error, errors.ResourceExhausted | errors.Contention):
        return ()
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2

    retry = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=max(1, round(error.retry_after_seconds)))
    )
    detail = any_pb2.Any()
    detail.Pack(retry)
    status = status_pb2.Status(
        code=status_for(error).value[0], message=error.message, details=[detail]
    )
    return (("grpc-status-details-bin", status.SerializeToString()),)
