"""Request ids: every RPC gets one (the client's ``x-request-id`` metadata value when it is
sane, else a random one), bound for the log lines of the call (broker.logs) and echoed back in
the trailing metadata, so that a firmware author can quote it."""

from __future__ import annotations

import grpc

from broker.logs import REQUEST_ID_HEADER, bind_rpc, current_rpc, request_id_from


def begin_rpc(context: grpc.aio.ServicerContext, method: str) -> str:
    """Bind this call's request id and method for logging; set the x-request-id trailer."""
    offered = None
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            offered = value
            break
    request_id = request_id_from(offered)
    bind_rpc(request_id, method)
    context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
    return request_id


def with_request_id(
    trailing: tuple[tuple[str, str | bytes], ...],
) -> tuple[tuple[str, str | bytes], ...]:
    """Trailing metadata for an abort: what it carries plus the call's x-request-id (an abort
    with metadata replaces the trailer begin_rpc set)."""
    rpc = current_rpc()
    return trailing if rpc is None else (*trailing, (REQUEST_ID_HEADER, rpc.request_id))
