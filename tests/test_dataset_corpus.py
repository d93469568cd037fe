"""A corpus of malformed uploads: each gets its own sentence, and none leaves a row or an object.

The files and what each must answer are in tests/data/malformed/ (cases.json); the 50 MB single
line is made here rather than committed. tests/data/preference.jsonl is the well-formed
preference file the malformed ones (preference_*) break.
"""

import json
import time
from pathlib import Path

import pytest

from engine import data
from jobs.datasets import chat_tokenizer_for
from jobs.models import BaseModel, File
from tests.helpers import objects_of, upload

CORPUS = Path(__file__).parent / "data" / "malformed"
CASES = json.loads((CORPUS / "cases.json").read_text())
PREFERENCE_PAIRS = Path(__file__).parent / "data" / "preference.jsonl"
PICKLE_MARKER = Path("/tmp/loft-pickle-was-loaded")


def assert_rejected_leaving_nothing(response, code: str, message: str, org) -> None:
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == code
    assert message in error["message"], error["message"]
    assert error["param"] == "file"
    assert File.objects.count() == 0
    assert objects_of(org) == []


@pytest.mark.django_db
@pytest.mark.parametrize("case", CASES, ids=[case["file"] for case in CASES])
def test_each_malformed_file_gets_its_own_message(case, api_a, tenant_a):
    PICKLE_MARKER.unlink(missing_ok=True)
    extra = {"format": case["format"]} if "format" in case else {}
    response = upload(api_a, (CORPUS / case["file"]).read_bytes(), case["file"], **extra)
    assert_rejected_leaving_nothing(response, case["code"], case["message"], tenant_a.org)
    assert not PICKLE_MARKER.exists(), "an uploaded pickle was deserialized"


@pytest.mark.django_db
def test_a_50_mb_single_line_is_refused_without_holding_it(api_a, tenant_a):
    line = b'{"text": "' + b"a" * (50 * 2**20) + b'"}'
    response = upload(api_a, line, "one_line.jsonl")
    assert_rejected_leaving_nothing(
        response, "no_valid_rows", "line 1: longer than 2 MB", tenant_a.org
    )


@pytest.mark.django_db
def test_a_row_of_57k_tiny_messages_is_refused_quickly_by_its_line(api_a, tenant_a):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    row = json.dumps({"messages": turns * 28_500}, separators=(",", ":")).encode()
    assert len(row) < data.MAX_LINE_BYTES  # a line the reader takes whole
    chat_tokenizer_for(BaseModel.default())  # prepared once per host, not part of the timing
    started = time.monotonic()
    response = upload(api_a, row + b"\n")
    # Rendered turn by turn, this row took some 20 CPU-minutes and then passed.
    assert time.monotonic() - started < 30
    assert_rejected_leaving_nothing(
        response, "no_valid_rows", 'line 1: "messages" has 57000 messages', tenant_a.org
    )


@pytest.mark.django_db
def test_rejections_list_every_line_error_up_to_100_and_the_total(api_a, tenant_a):
    content = b'{"messages": []}\n' * 150
    response = upload(api_a, content)
    assert_rejected_leaving_nothing(response, "no_valid_rows", "(and 145 more)", tenant_a.org)
    details = response.json()["details"]
    assert details["error_count"] == 150
    assert len(details["errors"]) == 100
    assert details["errors"][99] == 'line 100: "messages" is empty'


def test_the_corpus_is_large_enough():
    assert len(CASES) + 1 >= 25


@pytest.mark.django_db
@pytest.mark.parametrize("fields", [{}, {"format": "preference"}], ids=["detected", "forced"])
def test_a_well_formed_preference_file_is_taken_with_a_report_of_its_pairs(api_a, fields):
    response = upload(api_a, PREFERENCE_PAIRS.read_bytes(), "pairs.jsonl", **fields)
    body = response.json()
    assert body["status"] == "processed", body
    assert (body["format"], body["rows"], body["validation"]["error_count"]) == ("preference", 3, 0)
    pairs = body["validation"]["preference"]
    assert pairs["pairs"] == 3
    preferred, non_preferred = (
        pairs["preferred_answer_tokens"],
        pairs["non_preferred_answer_tokens"],
    )
    assert preferred["total"] > non_preferred["total"] > 0
    # Rome / Milan: "The capital of Italy is" opens both answers.
    assert (pairs["same_start_pairs"], pairs["same_start_share"]) == (1, 0.333)
