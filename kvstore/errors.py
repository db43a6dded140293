"""Every error kvstore reports, in one table.

Each :class:`ErrorCode` has a stable name, the gRPC status it travels as and a
one-line meaning.  Servers raise :class:`KVStoreError`; the gRPC layer turns it
into ``context.abort(status, "<CODE>: message")`` with the code name in the
trailing metadata key ``kvstore-error``; clients turn it back into the same
exception class, so callers can ``except KVStoreError as e: e.code``.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

import grpc

ERROR_METADATA_KEY = "kvstore-error"
LEADER_METADATA_KEY = "kvstore-leader"
"""Trailing metadata of a NOT_LEADER answer: the address of the leader, when known."""
RETRY_METADATA_KEY = "kvstore-retry-after-ms"
"""Trailing metadata of a transient refusal: how long the server suggests waiting before a retry."""


class ErrorCode(enum.Enum):
    """(gRPC status, meaning) for each error kvstore can report."""

    INVALID_ARGUMENT = (grpc.StatusCode.INVALID_ARGUMENT, "a request field is malformed or out of range")
    BAD_TOKENS = (grpc.StatusCode.INVALID_ARGUMENT, "tokens empty or outside [0, 2^31)")
    BAD_KEYS = (grpc.StatusCode.INVALID_ARGUMENT, "page keys are not a multiple of 16 bytes")
    BAD_SIZE = (grpc.StatusCode.INVALID_ARGUMENT, "buffer size does not match the namespace layout")
    BAD_RANGE = (grpc.StatusCode.INVALID_ARGUMENT, "layer, head or tp range out of range")
    TOO_LARGE = (grpc.StatusCode.RESOURCE_EXHAUSTED, "request exceeds a configured size limit")
    NO_ROOM = (grpc.StatusCode.RESOURCE_EXHAUSTED, "no node has room")
    QUOTA_EXCEEDED = (grpc.StatusCode.RESOURCE_EXHAUSTED, "namespace quota reached")
    NAMESPACE_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "namespace is not registered")
    SESSION_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "put session unknown or expired")
    LEASE_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "read lease unknown, released or expired")
    EXTRA_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "no extra of that name for that sequence")
    NODE_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "node is not registered")
    NAMESPACE_MISMATCH = (
        grpc.StatusCode.FAILED_PRECONDITION,
        "namespace exists with a different layout or fingerprint",
    )
    NOT_LEADER = (grpc.StatusCode.FAILED_PRECONDITION, "this master is not the leader")
    STALE_INCARNATION = (
        grpc.StatusCode.FAILED_PRECONDITION,
        "node restarted; placement refers to an old incarnation",
    )
    BAD_GRANT = (
        grpc.StatusCode.UNAUTHENTICATED,
        "grant signature invalid, expired or not covering the request",
    )
    NODE_DRAINED = (
        grpc.StatusCode.FAILED_PRECONDITION,
        "node was drained and unregistered (tiers); restart it to rejoin",
    )
    UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, "a service could not be reached")
    DEADLINE = (grpc.StatusCode.DEADLINE_EXCEEDED, "an operation did not finish in time")
    INTERNAL = (grpc.StatusCode.INTERNAL, "a bug: please report it")

    @property
    def status(self) -> grpc.StatusCode:
        return self.value[0]

    @property
    def meaning(self) -> str:
        return self.value[1]


class KVStoreError(Exception):
    """A kvstore failure with a documented :class:`ErrorCode`.

    ``leader`` (NOT_LEADER: the leader's address, when known) and ``retry_after_ms``
    (a transient refusal: when a retry may succeed) travel as trailing metadata.
    """

    def __init__(
        self, code: ErrorCode, message: str = "", *, leader: str = "", retry_after_ms: int = 0
    ) -> None:
        self.code = code
        self.message = message or code.meaning
        self.leader = leader
        self.retry_after_ms = retry_after_ms
        super().__init__(f"{code.name}: {self.message}")

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        items = [(ERROR_METADATA_KEY, self.code.name)]
        if self.leader:
            items.append((LEADER_METADATA_KEY, self.leader))
        if self.retry_after_ms > 0:
            items.append((RETRY_METADATA_KEY, str(int(self.retry_after_ms))))
        return tuple(items)

    @property
    def status(self) -> grpc.StatusCode:
        return self.code.status


def from_rpc_error(err: grpc.RpcError) -> KVStoreError:
    """Rebuild a :class:`KVStoreError` from a failed call."""
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    details = err.details() if hasattr(err, "details") else str(err)
    status = err.code() if hasattr(err, "code") else None
    return from_status(status, details, trailing, fallback=str(err))


def from_status(
    status: grpc.StatusCode | None, details: str | None, trailing: Any, fallback: str = ""
) -> KVStoreError:
    """The :class:`KVStoreError` a call ending with this status, details and trailing metadata means."""
    code_name = leader = retry = ""
    for key, raw in trailing or ():
        value = raw if isinstance(raw, str) else raw.decode(errors="replace")
        if key == ERROR_METADATA_KEY:
            code_name = value
        elif key == LEADER_METADATA_KEY:
            leader = value
        elif key == RETRY_METADATA_KEY:
            retry = value
    if code_name in ErrorCode.__members__:
        code = ErrorCode[code_name]
        prefix = f"{code_name}: "
        message = details[len(prefix) :] if details and details.startswith(prefix) else (details or "")
        return KVStoreError(code, message, leader=leader, retry_after_ms=int(retry) if retry.isdigit() else 0)
    if status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return KVStoreError(ErrorCode.DEADLINE, details or "")
    if status == grpc.StatusCode.UNAVAILABLE:
        return KVStoreError(ErrorCode.UNAVAILABLE, details or "")
    for code in ErrorCode:
        if code.status == status:
            return KVStoreError(code, details or "")
    return KVStoreError(ErrorCode.INTERNAL, details or fallback)


def from_fields(code_name: str, message: str, leader: str = "", retry_after_ms: int = 0) -> KVStoreError:
    """The error a Call stream answer carries (``CallResponse``): the same one the unary call would raise."""
    code = ErrorCode.__members__.get(code_name, ErrorCode.INTERNAL)
    if code.name != code_name:  # a newer server's code: keep its name in the text
        message = f"{code_name}: {message}"
    return KVStoreError(code, message, leader=leader, retry_after_ms=retry_after_ms)


def unexpected_error(exc: BaseException, where: str) -> KVStoreError:
    """What a request that failed with anything but a KVStoreError answers: INTERNAL (a bug, logged)."""
    import logging

    logging.getLogger("kvstore.rpc").error("unhandled error in %s", where, exc_info=exc)
    return KVStoreError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")


_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])


def grpc_errors(handler: _Handler) -> _Handler:
    """Decorate an async servicer method: KVStoreError -> gRPC status with code metadata.

    Anything else is a bug: it becomes INTERNAL with the exception text, and the
    service keeps serving.
    """

    @wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except KVStoreError as exc:
            context.set_trailing_metadata(exc.trailing_metadata())
            await context.abort(exc.status, str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary of a request
            import logging

            logging.getLogger("kvstore.rpc").exception("unhandled error in %s", handler.__name__)
            context.set_trailing_metadata(((ERROR_METADATA_KEY, ErrorCode.INTERNAL.name),))
            await context.abort(grpc.StatusCode.INTERNAL, f"INTERNAL: {type(exc).__name__}: {exc}")

    return wrapper  # type: ignore[return-value]
