"""The error every serving layer answers a client with."""

from __future__ import annotations


class ApiError(Exception):
    """An error answered to the client as ``{"error": message}`` with HTTP ``status_code``.

    400: what the client sent; 404: unknown model or version; 413: body over the limit;
    415: unsupported encoding; 503: the model is not ready or cannot be loaded.
    """

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
