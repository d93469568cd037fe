"""Requests that carry a NUL character are refused with 400 before any view sees them.

PostgreSQL's text cannot hold NUL: a query such as ``?purpose=%00`` reaches a filter and psycopg
raises ValueError, a 500. No field of Loft's has a use for NUL, so rather than guard every
filter, ``RejectNulMiddleware`` looks where one can arrive: the path, the query string, a
form's fields (url-encoded; a multipart body is left to the view, which may stream its file
elsewhere) and a JSON body's strings (``\\u0000``). Under /v1 the answer is in OpenAI's error
shape; elsewhere a sentence.
"""

from __future__ import annotations

import re

from django.conf import settings
from django.http import HttpResponseBadRequest

from loft.api.errors import error_response

MESSAGE = "The request contains a NUL character (%00 or \\u0000), which Loft does not accept."
# A JSON escape \u0000 is a backslash not itself escaped (an odd run of backslashes) then u0000.
JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def carries_nul(request) -> bool:
    if "\x00" in request.path:
        return True
    query = request.META.get("QUERY_STRING", "")
    if "%00" in query or "\x00" in query:
        return True
    content_type = request.content_type or ""
    if content_type == "application/x-www-form-urlencoded":
        return any(
            "\x00" in key or any("\x00" in v for v in values)
            for key, values in request.POST.lists()
        )
    if content_type == "application/json" and _body_fits_in_memory(request):
        return bool(JSON_NUL.search(request.body)) or b"\x00" in request.body
    return False


def _body_fits_in_memory(request) -> bool:
    """Whether reading the body here is harmless: Django refuses to hold more than
    DATA_UPLOAD_MAX_MEMORY_SIZE, and a larger body is the view's to stream."""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return False
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return limit is None or length <= limit


class RejectNulMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if carries_nul(request):
            if request.path.startswith("/v1/"):
                return error_response(
                    400, MESSAGE, "invalid_request_error", code="invalid_character"
                )
            return HttpResponseBadRequest(MESSAGE, content_type="text/plain; charset=utf-8")
        return self.get_response(request)
