"""Error types of the server, each with a readable message and a stable code.

Every failure a caller can see is one of these, so the HTTP layer maps them to status codes in
one place and the Ray-handle client re-raises the same types. A request is always either
answered or failed with one of these; nothing is dropped silently.
"""

from __future__ import annotations


class ModelEngineError(Exception):
    """Base of every error the server reports to a caller."""

    code: str = "internal_error"
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message}


class InvalidRequest(ModelEngineError):
    """The request itself is wrong (field named in the message); retrying it cannot help."""

    code = "invalid_request"
    http_status = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field

    @property
    def reason(self) -> str:
        """The message without the field it names (also for one rebuilt by `error_from_wire`)."""
        return self.message.removeprefix(f"{self.field}: ") if self.field else self.message

    def within(self, container: str) -> "InvalidRequest":
        """The same refusal named from the caller's side: `input_ids` -> `requests[3].input_ids`."""
        return InvalidRequest(self.reason, f"{container}.{self.field}" if self.field else container)

    def to_wire(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "field": self.field}


class Overloaded(ModelEngineError):
    """The bounded queue is full; the caller should retry after `retry_after_s` (None: the
    server's configured hint, `http.retry_after_s`, sent as the Retry-After header)."""

    code = "overloaded"
    http_status = 429

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def to_wire(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "retry_after_s": self.retry_after_s}

    def with_hint(self, default_s: float) -> "Overloaded":
        """This refusal carrying a hint: its own, else the server's configured one (what a
        client waits before it resends the request)."""
        return self if self.retry_after_s is not None else Overloaded(self.message, default_s)


class ServerShuttingDown(ModelEngineError):
    """The server stopped accepting requests (drain on shutdown)."""

    code = "shutting_down"
    http_status = 503


class DeadlineExceeded(ModelEngineError):
    """The request waited longer than its deadline (queue, pause, or weight version wait)."""

    code = "deadline_exceeded"
    http_status = 504


class WorkerFailed(ModelEngineError):
    """The engine or a worker process failed while computing the request's batch."""

    code = "worker_failed"
    http_status = 503


class WeightSyncError(ModelEngineError):
    """A weight update was rejected (missing/unknown tensor, shape, dtype, checksum, timeout)."""

    code = "weight_sync_failed"
    http_status = 409


class Forbidden(ModelEngineError):
    """The configuration does not allow what an (authenticated) admin call asks for: a transport
    endpoint outside the allow-list, a weight folder outside the weight roots. The message names
    the setting to change, never what exists on the server."""

    code = "forbidden"
    http_status = 403


ERROR_TYPES: dict[str, type[ModelEngineError]] = {
    cls.code: cls
    for cls in (
        ModelEngineError,
        InvalidRequest,
        Overloaded,
        ServerShuttingDown,
        DeadlineExceeded,
        WorkerFailed,
        WeightSyncError,
        Forbidden,
    )
}


def error_from_wire(payload: dict[str, object]) -> ModelEngineError:
    """Rebuild the typed error a server sent, so clients raise the same types everywhere."""
    code = str(payload.get("code", "internal_error"))
    message = str(payload.get("message", "unknown error"))
    cls = ERROR_TYPES.get(code, ModelEngineError)
    if cls is InvalidRequest:
        error: ModelEngineError = InvalidRequest.__new__(InvalidRequest)
        ModelEngineError.__init__(error, message)
        error.field = payload.get("field")  # type: ignore[attr-defined]
        return error
    if cls is Overloaded:
        wait = payload.get("retry_after_s")
        return Overloaded(message, None if wait is None else float(wait))  # type: ignore[arg-type]
    return cls(message)
