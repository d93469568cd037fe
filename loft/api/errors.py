"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging

from django.core.exceptions import PermissionDenied
from django.http import Http404, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from loft.storage import StorageError

logger = logging.getLogger(__name__)


class LoftAPIError(exceptions.APIException):
    """An error with OpenAI's fields, raised by views for failures DRF has no class for."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = status.HTTP_400_BAD_REQUEST,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        details: dict | None = None,
    ):
        super().__init__(detail=message, code=code)
        self.status_code = status_code
        self.error_type = type
        self.param = param
        self.error_code = code
        self.details = details  # more than a sentence can hold, e.g. every line's error


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status_code: int, message: str, type: str, **fields) -> JsonResponse:
    return JsonResponse(error_body(message, type, **fields), status=status_code)


def _first_validation_error(detail, path: str = "") -> tuple[str | None, str]:
    """The first (param, message) of a nested ValidationError detail."""
    if isinstance(detail, dict):
        for field, inner in detail.items():
            param = field if field != "non_field_errors" else None
            nested = f"{path}.{param}" if path and param else (param or path)
            return _first_validation_error(inner, nested or "")
    if isinstance(detail, list) and detail:
        return _first_validation_error(detail[0], path)
    return (path or None), str(detail)


def _first_code(codes) -> str | None:
    while isinstance(codes, dict | list) and codes:
        codes = next(iter(codes.values())) if isinstance(codes, dict) else codes[0]
    return codes if isinstance(codes, str) else None


_TYPE_BY_STATUS = {
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_exception_handler(exc, context):
    """DRF's exception handler, re-shaped; anything unexpected becomes a logged server_error."""
    if isinstance(exc, StorageError):
        logger.error("object storage failed: %s", exc)
        exc = LoftAPIError(
            "Object storage is unavailable right now; nothing was stored. Try again shortly.",
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            type="server_error",
            code="storage_unavailable",
        )
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or "Not found.")
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or None)

    response = drf_exception_handler(exc, context)
    if response is None:
        logger.exception("Unhandled error in %s", context.get("view"), exc_info=exc)
        return Response(
            error_body("The server had an error while processing your request.", "server_error"),
            status=status.HTTP_500_INTERNAL_SERVER_ERROR,
        )

    if isinstance(exc, LoftAPIError):
        body = error_body(str(exc.detail), exc.error_type, exc.param, exc.error_code)
        if exc.details:
            body["details"] = exc.details
    elif isinstance(exc, exceptions.ValidationError):
        param, message = _first_validation_error(exc.detail)
        text = f"{param}: {message}" if param else message
        body = error_body(text, "invalid_request_error", param, _first_code(exc.get_codes()))
    else:
        code = exc.get_codes() if isinstance(exc.get_codes(), str) else None
        body = error_body(
            str(exc.detail),
            _TYPE_BY_STATUS.get(response.status_code, "invalid_request_error"),
            None,
            code,
        )
    response.data = body
    return response
