"""Default-deny authorization: every RPC admits exactly one identity kind (I3), taken from the
verified peer certificate (I1) and re-checked against the store on every call (I7).

Also the single place where BrokerErrors become gRPC statuses, and where unexpected exceptions
become INTERNAL (fail closed, I10).
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc

from broker.errors import BrokerError, PermissionDenied, Unauthenticated
from broker.identity.spiffe import Kind
from broker.service.peer import ANONYMOUS_CALLER, Caller, peer_pem
from broker.service.status import status_for, trailing_details

log = logging.getLogger("broker.rpc")

_current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("broker_caller")

Authenticator = Callable[[grpc.aio.ServicerContext, Kind], Awaitable[Caller]]


def current_caller() -> Caller:
    """The verified caller of the RPC being served; raises if called outside an RPC."""
    return _current_caller.get()


async def abort_with(context: grpc.aio.ServicerContext, error: BrokerError) -> None:
    """End the RPC with the status mapped from error."""
    await context.abort(status_for(error), error.message, trailing_details(error))


class IdentityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps each handler so it runs only for a caller of the method's one allowed kind."""

    def __init__(self, acl: Mapping[str, Kind], authenticate: Authenticator) -> None:
        self._acl = dict(acl)
        self._authenticate = authenticate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        required = self._acl.get(method)
        return _wrap(handler, method, required, self._authenticate)


def _wrap(
    handler: grpc.RpcMethodHandler, method: str, required: Kind | None, authenticate: Authenticator
) -> grpc.RpcMethodHandler:
    async def admit(context: grpc.aio.ServicerContext) -> None:
        if required is None or required is Kind.NOBODY:  # default deny
            raise PermissionDenied(f"{method} is not served on this listener")
        _current_caller.set(await authenticate(context, required))

    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await _guarded(context, method, admit, lambda: inner_uu(request, context))

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_stream is not None:
        inner_ss = handler.stream_stream
        if inspect.isasyncgenfunction(inner_ss):
            raise TypeError(f"{method}: write streaming handlers with context.read/write")

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            return await _guarded(context, method, admit, lambda: inner_ss(requests, context))

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream
        if inspect.isasyncgenfunction(inner_us):
            raise TypeError(f"{method}: write streaming handlers with context.write")

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await _guarded(context, method, admit, lambda: inner_us(request, context))

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    raise TypeError(f"{method}: client-streaming RPCs are not used by this API")


async def _guarded(
    context: grpc.aio.ServicerContext,
    method: str,
    admit: Callable[[grpc.aio.ServicerContext], Awaitable[None]],
    call: Callable[[], Awaitable[Any]],
) -> Any:
    try:
        await admit(context)
        return await call()
    except grpc.aio.AbortError:
        raise
    except BrokerError as error:
        log.info(
            "rpc refused method=%s code=%s reason=%s", method, status_for(error).name, error.message
        )
        await abort_with(context, error)
    except Exception:
        # Fail closed (I10): log the cause, tell the caller nothing internal.
        log.exception("rpc failed method=%s", method)
        await context.abort(
            grpc.StatusCode.INTERNAL, "internal error; the request was not carried out"
        )


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
