"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status, never a
traceback. `from_tops_error` words the runtime's errors for an API client (the request's field names
instead of the CLI's flags)."""

from __future__ import annotations

import re

from ..errors import ContextLengthError, InputError, TopsError

# the CLI's flags in the runtime's messages -> the request's fields
_FLAGS = (("--max-new-tokens", "max_tokens"), ("--keep-ratio", "keep_ratio"), ("--keep", "keep"), ("--budget", "budget"))


class ApiError(Exception):
    """An error answer: `status`, and the body's message, type, param and code. `code` is also the
    error's kind in the metrics (tops_serve_errors_total{kind=...})."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code or type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, code: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def for_api(message: str) -> str:
    """A runtime message, its CLI flags named as the request's fields."""
    for flag, field in _FLAGS:
        message = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", field, message)
    return message


def from_tops_error(exc: TopsError) -> ApiError:
    """The runtime's typed errors as answers: bad input is the client's (400), anything else the
    server's (500)."""
    message = for_api(str(exc))
    if isinstance(exc, ContextLengthError):
        return ApiError(400, message, param="messages", code="context_length_exceeded")
    if isinstance(exc, InputError):
        param = next((field for flag, field in _FLAGS if field in message.split(" ", 1)[0]), None)
        return ApiError(400, message, param=param, code="invalid_input")
    return ApiError(500, message, type="server_error", code="server_error")


def internal(exc: BaseException) -> ApiError:
    """An unexpected failure: one line naming it (the server's log has the traceback)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return ApiError(500, f"internal error: {type(exc).__name__}: {first}", type="server_error", code="internal_error")
