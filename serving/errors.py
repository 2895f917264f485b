"""The one error type the server answers with: OpenAI's `{"error": {...}}` body and an HTTP status.

Kept apart from `protocol` (pydantic) and `generation` (torch) because both raise it: a bad
parameter is found while validating, a prompt too long for the context only once it is tokenized
by the model that will answer.
"""

from __future__ import annotations

from typing import Any

from lightspan.errors import LightspanError


class APIError(LightspanError):
    """A request the server refuses, rendered as OpenAI's `{"error": {...}}` body."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    """A 400 about one request parameter."""
    return APIError(message, param=param, code=code)
