"""Default-deny authorization: every RPC admits exactly one identity kind (I3), taken from the
verified peer certificate (I1) and re-checked against the store on every call (I7).

Also the single place where BrokerErrors become gRPC statuses (request bodies that fail to decode
included: INVALID_ARGUMENT, never grpc's UNKNOWN), and where unexpected exceptions become INTERNAL
(fail closed, I10).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import grpc

from broker.errors import (
    BrokerError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    UndecodableRequest,
)
from broker.identity.spiffe import Kind
from broker.logs import bind_peer
from broker.service.metrics import BrokerMetrics, MethodMetrics
from broker.service.peer import ANONYMOUS_CALLER, Caller, peer_pem
from broker.service.requests import begin_rpc, with_request_id
from broker.service.status import status_for, trailing_details

log = logging.getLogger("broker.rpc")

_current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("broker_caller")

# How long a refused stream's first message is waited for (see _take_first_message).
FIRST_MESSAGE_WAIT = 0.5

Authenticator = Callable[[grpc.aio.ServicerContext, Kind], Awaitable[Caller]]


def current_caller() -> Caller:
    """The verified caller of the RPC being served; raises if called outside an RPC."""
    return _current_caller.get()


async def abort_with(context: grpc.aio.ServicerContext, error: BrokerError) -> None:
    """End the RPC with the status mapped from error."""
    await context.abort(status_for(error), error.message, with_request_id(trailing_details(error)))


class IdentityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps each handler so it runs only for a caller of the method's one allowed kind."""

    def __init__(
        self,
        acl: Mapping[str, Kind],
        authenticate: Authenticator,
        shed: Callable[[Kind], None] | None = None,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self._acl = dict(acl)
        self._authenticate = authenticate
        self._shed = shed
        self._metrics = metrics
        # Wrapped handlers by method, built once: wrapping per call cost a handler object, its
        # closures and a decoder lookup on every RPC.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        required = self._acl.get(method)
        observed = None if self._metrics is None else self._metrics.for_method(method, required)
        wrapped = _wrap(handler, method, required, self._authenticate, self._shed, observed)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _message_type(deserializer: Callable[[bytes], Any], method: str) -> str:
    """The protobuf type a deserializer parses (generated FromString is bound to its class)."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return name if isinstance(name, str) else f"request message for {method}"


def _decoder(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any]:
    """The handler's deserializer, raising UndecodableRequest (INVALID_ARGUMENT through the status
    table) instead of whatever the protobuf runtime raises, which grpc would report as UNKNOWN
    with internal names."""
    if deserializer is None:
        return lambda raw: raw
    parse = deserializer
    message_type = _message_type(parse, method)

    def decode(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception:
            raise UndecodableRequest(message_type) from None

    return decode


def _writing(inner: Callable[..., Any]) -> Callable[..., Awaitable[None]]:
    """A streaming handler in the context.write style; async generators (grpcio-reflection's
    servicer) are adapted so every handler runs inside the same guard."""
    if not inspect.isasyncgenfunction(inner):
        return cast(Callable[..., Awaitable[None]], inner)

    async def write_all(request: Any, context: grpc.aio.ServicerContext) -> None:
        async for response in inner(request, context):
            await context.write(response)

    return write_all


def _wrap(
    handler: grpc.RpcMethodHandler,
    method: str,
    required: Kind | None,
    authenticate: Authenticator,
    shed: Callable[[Kind], None] | None,
    observed: MethodMetrics | None = None,
) -> grpc.RpcMethodHandler:
    async def admit(context: grpc.aio.ServicerContext) -> None:
        if required is None or required is Kind.NOBODY:  # default deny
            raise PermissionDenied(f"{method} is not served on this listener")
        if shed is not None:
            shed(required)  # before any work: an overloaded broker refuses cheaply and early
        caller = await authenticate(context, required)
        _current_caller.set(caller)
        bind_peer(caller.identity.spiffe_id)  # log lines of this call name the verified peer

    # Unary requests arrive as bytes (no deserializer) and are decoded after the identity check;
    # streamed requests are decoded by context.read(), inside the handler, so in the same guard.
    decode = _decoder(handler.request_deserializer, method)
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await _guarded(
                context, method, admit, lambda: inner_uu(decode(raw), context), observed=observed
            )

        return grpc.unary_unary_rpc_method_handler(unary_unary, None, handler.response_serializer)
    if handler.stream_stream is not None:
        inner_ss = _writing(handler.stream_stream)

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            return await _guarded(
                context,
                method,
                admit,
                lambda: inner_ss(requests, context),
                first_message=context.read,
                observed=observed,
            )

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, decode, handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_us = _writing(handler.unary_stream)

        async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await _guarded(
                context, method, admit, lambda: inner_us(decode(raw), context), observed=observed
            )

        return grpc.unary_stream_rpc_method_handler(unary_stream, None, handler.response_serializer)
    raise TypeError(f"{method}: client-streaming RPCs are not used by this API")


async def _guarded(
    context: grpc.aio.ServicerContext,
    method: str,
    admit: Callable[[grpc.aio.ServicerContext], Awaitable[None]],
    call: Callable[[], Awaitable[Any]],
    first_message: Callable[[], Awaitable[Any]] | None = None,
    observed: MethodMetrics | None = None,
) -> Any:
    begin_rpc(context, method)  # request id: on every log line of this call, echoed in trailers
    admitted = False
    code = grpc.StatusCode.OK  # for metrics: how the call ended
    started = time.perf_counter()
    recorded = False

    def record() -> None:
        # Before an abort: the client has its status as soon as abort sends it, and a scrape
        # that follows must already count the call.
        nonlocal recorded
        if observed is not None and not recorded:
            recorded = True
            observed.finished(code, time.perf_counter() - started, admitted)

    try:
        await admit(context)
        admitted = True
        if observed is not None:
            observed.admitted()
        return await call()
    except grpc.aio.AbortError:
        code = _aborted_code(context)
        raise
    except asyncio.CancelledError:  # the client went away (or the server is stopping)
        code = grpc.StatusCode.CANCELLED
        raise
    except BrokerError as error:
        code = status_for(error)
        if observed is not None and isinstance(error, ResourceExhausted):
            observed.refused(error.limit)
        log.info("rpc refused method=%s code=%s reason=%s", method, code.name, error.message)
        if not admitted and first_message is not None:
            await _take_first_message(first_message)
        record()
        await abort_with(context, error)
    except Exception:
        # Fail closed (I10): log the cause, tell the caller nothing internal.
        code = grpc.StatusCode.INTERNAL
        log.exception("rpc failed method=%s", method)
        record()
        await context.abort(
            grpc.StatusCode.INTERNAL, "internal error; the request was not carried out"
        )
    finally:
        record()


def _aborted_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status a handler aborted with (abort_with inside a stream handler)."""
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


async def _take_first_message(read: Callable[[], Awaitable[Any]]) -> None:
    """Read the client's first message (bounded) before refusing a stream it already writes to.

    A grpc.aio client whose write is still in flight when the server's status and RST_STREAM
    arrive reports INTERNAL "Internal error from Core" instead of that status (grpc/grpc#36066):
    a camera refused at Attach (busy, unauthenticated) would never see the RetryInfo or the
    reason. Taking its hello first lets the write complete, so the real status reaches it."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(read(), FIRST_MESSAGE_WAIT)


def anonymous_authenticator() -> Authenticator:
    """For the bootstrap listener, which never asks for a client certificate."""

    async def authenticate(context: grpc.aio.ServicerContext, required: Kind) -> Caller:
        if required is not Kind.ANONYMOUS:
            raise PermissionDenied("this listener serves only the Bootstrap service")
        return ANONYMOUS_CALLER

    return authenticate


def certificate_authenticator(
    parse: Callable[[bytes, Kind], Caller],
    check: Callable[[Caller], Awaitable[None]] | None,
) -> Authenticator:
    """For listeners that require a client certificate: identity from it, checked, kind matched."""

    async def authenticate(context: grpc.aio.ServicerContext, required: Kind) -> Caller:
        pem = peer_pem(context)
        if pem is None:
            raise Unauthenticated("a client certificate is required")
        caller = parse(pem, required)
        if check is not None:
            await check(caller)
        if caller.identity.kind is not required:
            raise PermissionDenied(
                f"this RPC is for {required.value} identities, not {caller.identity.kind.value}"
            )
        return caller

    return authenticate
