"""JSON for /v1, encoded by orjson: a page of 100 jobs spent a quarter of its time in the
standard library's encoder (bench/api_load.py). It also writes ``orjson.Fragment``s, JSON text
put in as it is (the job object's JSON columns, jobs/api/serializers.py::verbatim_json)."""

from __future__ import annotations

import orjson
from rest_framework.renderers import JSONRenderer
from rest_framework.utils.encoders import JSONEncoder

# What orjson cannot encode by itself (lazy translations, decimals…) goes through DRF's encoder.
_fallback = JSONEncoder().default


class FastJSONRenderer(JSONRenderer):
    """DRF's JSONRenderer through orjson: compact, UTF-8, and a NaN or an infinity (never valid
    JSON) written as null rather than refused."""

    def render(self, data, accepted_media_type=None, renderer_context=None) -> bytes:
        if data is None:
            return b""
        return orjson.dumps(data, default=_fallback)
