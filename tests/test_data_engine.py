"""engine/data.py on its own: bytes in; lines, examples, rendered tokens and reports out.

Pure tests: no database and no object store. The tokenizer is the real bundled SmolLM2 one,
converted once per session.
"""

import gzip
import io
import itertools
import json
import pickle
import struct
import zipfile

import pytest

from engine import data
from engine.base_models import load_tokenizer
from tests.helpers import SMOLLM2, jsonl

END = "<|im_end|>"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return load_tokenizer(SMOLLM2, tmp_path_factory.mktemp("models"))


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def read(content: bytes, chunk_size: int = 1 << 16, **options) -> list:
    _, items = data.open_dataset(data.chunks_of(content, chunk_size), **options)
    return list(items)


def turns(example: data.Example) -> list[tuple[str, str, bool]]:
    return [(m.role, m.content, m.trained) for m in example.messages]


def lines(content: bytes, chunk_size: int, **options) -> list:
    return list(data.iter_lines(data.chunks_of(content, chunk_size), **options))


def example_of(row: dict) -> data.Example:
    (example,) = read(jsonl([row]))
    return example


def with_a_weight_0_draft() -> dict:
    row = chat(("user", "q"), ("assistant", "draft"), ("user", "again"), ("assistant", "final"))
    row["messages"][1]["weight"] = 0
    return row


TWO_TURNS = chat(("user", "Hi"), ("assistant", "Hello!"), ("user", "And?"), ("assistant", "Bye."))
TRAINED = [f"Hello!{END}", f"Bye.{END}"]


# --- iter_lines ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_it_splits_lines_across_chunk_boundaries_and_keeps_a_last_line_without_newline(
    chunk_size,
):
    content = b"first\nsecond line\n\nthird"
    expected = [(1, b"first"), (2, b"second line"), (3, b""), (4, b"third")]
    assert lines(content, chunk_size) == expected


def test_it_leaves_carriage_returns_to_the_caller():
    assert lines(b"a\r\nb\r\n", 3) == [(1, b"a\r"), (2, b"b\r")]


def test_it_drops_the_cut_off_tail_of_a_truncated_stream():
    assert lines(b"one\ntwo\nthr", 2, truncated=True) == [(1, b"one"), (2, b"two")]


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_it_yields_an_overlong_line_as_none_and_keeps_counting_lines(chunk_size):
    content = b"12345678\n" + b"x" * 40 + b"\nafter\n" + b"y" * 9
    expected = [(1, b"12345678"), (2, None), (3, b"after"), (4, None)]
    assert lines(content, chunk_size, max_line_bytes=8) == expected


def test_it_reports_an_overlong_tail_even_when_the_stream_is_truncated():
    assert lines(b"z" * 50, 3, max_line_bytes=8, truncated=True) == [(1, None)]


# --- sniff_binary ----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_it_recognises_a_pickle(protocol):
    assert data.sniff_binary(pickle.dumps({"a": [1, 2]}, protocol=protocol)) == "a Python pickle"


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("train.jsonl", '{"text": "a"}\n')
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("head", "description"),
    [
        (_zip_bytes(), "a zip archive"),
        (gzip.compress(b'{"text": "a"}\n'), "a gzip archive"),
        (b"GGUF\x03\x00\x00\x00" + b"\x00" * 16, "a GGUF model file"),
        (struct.pack("<Q", 20) + b'{"__metadata__":{}}', "a safetensors file"),
        ('{"text": "a"}'.encode("utf-16-le"), "binary data (it contains NUL bytes)"),
    ],
    ids=["zip", "gzip", "gguf", "safetensors", "nul"],
)
def test_it_names_binary_files(head, description):
    assert data.sniff_binary(head) == description


@pytest.mark.parametrize("head", [jsonl([chat(("user", "a"))]), b"prompt,completion\na,b\n"])
def test_it_takes_json_and_csv_for_text(head):
    assert data.sniff_binary(head) is None


# --- open_dataset ----------------------------------------------------------------------------


def test_it_skips_blank_lines_in_jsonl_and_keeps_line_numbers():
    content = b'{"text": "a"}\n\n   \n{"text": "b"}\n'
    assert [(e.line, e.text) for e in read(content)] == [(1, "a"), (4, "b")]


def test_it_numbers_csv_records_by_their_first_line():
    content = b'prompt,completion\n"two\nlines",b\nc,"three\r\nline\nfield"\ne,f\n'
    examples = read(content, chunk_size=5, filename="data.csv")
    assert [e.line for e in examples] == [2, 4, 7]
    assert examples[0].messages[0].content == "two\nlines"
    assert examples[1].messages[1].content == "three\nline\nfield"


def test_it_reads_a_csv_header_behind_a_utf8_bom():
    (example,) = read(b"\xef\xbb\xbfPrompt,Completion\nhi,hello\n")
    assert turns(example) == [("user", "hi", False), ("assistant", "hello", True)]


@pytest.mark.parametrize(
    ("extra", "user_text"),
    [({}, "Translate."), ({"input": " "}, "Translate."), ({"input": "chat"}, "Translate.\n\nchat")],
)
def test_it_asks_alpaca_instructions_with_their_input(extra, user_text):
    example = example_of({"instruction": "Translate.", "output": "Plaudern", **extra})
    assert example.format == "alpaca"
    assert turns(example) == [("user", user_text, False), ("assistant", "Plaudern", True)]


def test_it_trains_only_the_completion_of_a_prompt():
    example = example_of({"prompt": "2+2?", "completion": "4"})
    assert turns(example) == [("user", "2+2?", False), ("assistant", "4", True)]


def test_it_does_not_train_assistant_turns_of_weight_0():
    example = example_of(with_a_weight_0_draft())
    assert [m.trained for m in example.messages] == [False, False, False, True]


def test_it_keeps_tool_turns_and_tool_calls_as_json_text():
    calls = [{"type": "function", "function": {"name": "weather", "arguments": "{}"}}]
    row = chat(("user", "Weather?"))
    row["messages"] += [
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    assert turns(example_of(row)) == [
        ("user", "Weather?", False),
        ("assistant", json.dumps(calls), True),
        ("tool", "sunny", False),
        ("assistant", "Sunny.", True),
    ]


def test_it_joins_content_given_as_text_parts():
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    row = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Hi"}]}
    assert example_of(row).messages[0].content == "Hello, world"


def test_it_fingerprints_identical_rows_alike_and_others_apart():
    same, twin, other, text = read(
        jsonl([chat(("user", "a"), ("assistant", "b")), chat(("user", "a"), ("assistant", "b"))])
        + jsonl([chat(("user", "a"), ("assistant", "c")), {"text": "a"}])
    )
    assert same.fingerprint() == twin.fingerprint()
    assert len({same.fingerprint(), other.fingerprint(), text.fingerprint()}) == 3


def test_it_numbers_a_csv_record_after_an_undecodable_line_by_its_own_line():
    error, example = read(b"prompt,completion\n\xff,x\na,b\n", filename="data.csv")
    assert error.line == 2
    assert example.line == 3


def test_it_numbers_lines_after_leading_blank_lines_whatever_the_chunk_size():
    assert [e.line for e in read(b'\n\n{"text": "a"}\n', chunk_size=1)] == [3]


# --- rendering -------------------------------------------------------------------------------


def trained_runs(rendered: data.Rendered, tokenizer) -> list[str]:
    pairs = zip(rendered.input_ids, rendered.trained, strict=True)
    return [
        tokenizer.decode([token for token, _ in run])
        for trained, run in itertools.groupby(pairs, key=lambda pair: pair[1])
        if trained
    ]


def test_it_trains_exactly_the_assistant_turns_and_their_end_token(tokenizer):
    example = example_of(TWO_TURNS)
    rendered, _ = data.render(example, tokenizer)
    spans = data.trained_char_spans(example, tokenizer, rendered.text)
    assert [rendered.text[start:end] for start, end in spans] == TRAINED
    assert trained_runs(rendered, tokenizer) == TRAINED


def test_its_segments_rebuild_the_rendered_text(tokenizer):
    rendered, offsets = data.render(example_of(TWO_TURNS), tokenizer)
    segments = rendered.segments(offsets)
    assert "".join(segment["text"] for segment in segments) == rendered.text
    assert [segment["text"] for segment in segments if segment["trained"]] == TRAINED


def test_it_trains_every_token_of_a_text_and_ends_it_with_eos(tokenizer):
    rendered, _ = data.render(data.Example(1, "text", text="Plain words here."), tokenizer)
    assert rendered.text == f"Plain words here.{tokenizer.eos_token}"
    assert all(rendered.trained)
    assert rendered.input_ids[-1] == tokenizer.eos_token_id


def test_it_renders_a_weight_0_turn_untrained(tokenizer):
    rendered, _ = data.render(example_of(with_a_weight_0_draft()), tokenizer)
    assert "draft" in rendered.text
    assert trained_runs(rendered, tokenizer) == [f"final{END}"]


def test_its_segments_rebuild_text_with_characters_split_across_tokens(tokenizer):
    rendered, offsets = data.render(example_of(chat(("user", "x"), ("assistant", "🤗"))), tokenizer)
    assert "".join(segment["text"] for segment in rendered.segments(offsets)) == rendered.text


def test_it_refuses_a_chat_opening_with_an_assistant_turn_with_a_line_error(tokenizer):
    with pytest.raises(data.DatasetError) as caught:
        data.validate(data.chunks_of(jsonl([chat(("assistant", "Hello!"))])), tokenizer)
    assert caught.value.errors[0].message.startswith("conversation starts with an assistant turn")


# --- validate --------------------------------------------------------------------------------


def test_it_reports_rows_tokens_duplicates_roles_and_rows_over_context(tokenizer):
    rows = [chat(("user", "hi"), ("assistant", "hello"))] * 2 + [
        chat(("system", "Be brief."), ("user", "Tell me a long story."), ("assistant", "No."))
    ]
    content = jsonl(rows) + b"not json\n"
    report = data.validate(data.chunks_of(content), tokenizer, context_length=30)
    examples = [item for item in read(content) if isinstance(item, data.Example)]
    counts = [len(data.render(example, tokenizer)[0].input_ids) for example in examples]
    assert (report.format, report.file_type, report.rows) == ("chat", "jsonl", 3)
    assert report.tokens == sum(counts)
    spread = report.tokens_per_row
    assert spread["min"] == min(counts) and spread["max"] == max(counts)
    assert spread["min"] <= spread["median"] <= spread["p95"] <= spread["max"]
    assert report.duplicate_rows == 1
    assert report.role_counts == {"user": 3, "assistant": 3, "system": 1}
    # The default system prompt makes the two short chats the long ones: 34, 34 and 27 tokens.
    assert report.rows_over_context == sum(1 for count in counts if count > 30) == 2
    assert report.error_count == 1 and report.errors[0].startswith("line 4: not valid JSON")
    assert [row["line"] for row in report.preview] == [1, 2, 3]


def test_it_lists_the_first_100_errors_and_counts_them_all(tokenizer):
    content = jsonl([{"text": "fine"}]) + b'{"messages": []}\n' * 150
    report = data.validate(data.chunks_of(content), tokenizer)
    assert report.rows == 1
    assert report.error_count == 150
    assert len(report.errors) == 100
    assert report.errors[-1] == 'line 101: "messages" is empty'


@pytest.mark.parametrize(
    ("content", "options", "code"),
    [
        (b"", {}, "empty_file"),
        (b"\n  \n", {}, "empty_file"),
        (pickle.dumps(["a"], protocol=4), {}, "binary_file"),
        (jsonl([chat(("user", "a"), ("assistant", "b")), {"text": "c"}]), {}, "mixed_formats"),
        (b'{"messages": []}\nnot json\n', {}, "no_valid_rows"),
        (b"question,answer\na,b\n", {"filename": "qa.csv"}, "missing_columns"),
        (jsonl([{"text": "a"}]), {"forced_format": "sharegpt"}, "invalid_format"),
    ],
    ids=["empty", "blank", "pickle", "mixed", "no-rows", "columns", "format"],
)
def test_it_refuses_an_unusable_file(tokenizer, content, options, code):
    with pytest.raises(data.DatasetError) as raised:
        data.validate(data.chunks_of(content), tokenizer, **options)
    assert raised.value.code == code


def test_it_gives_the_row_errors_of_a_file_without_usable_rows(tokenizer):
    with pytest.raises(data.DatasetError) as raised:
        data.validate(data.chunks_of(b'{"messages": []}\nnot json\n'), tokenizer)
    assert raised.value.error_count == 2
    assert [error.line for error in raised.value.errors] == [1, 2]


# --- check_head ------------------------------------------------------------------------------


def test_it_ignores_the_line_a_truncated_head_cuts_mid_json():
    head = jsonl([{"text": "whole row"}]) + b'{"text": "cut o'
    assert [type(item) for item in read(head, truncated=True)] == [data.Example]
    data.check_head(data.chunks_of(head))


def test_it_reports_an_overlong_first_line_in_the_head():
    head = b'{"text": "' + b"a" * (data.MAX_LINE_BYTES + 1)
    with pytest.raises(data.DatasetError) as raised:
        data.check_head(data.chunks_of(head))
    assert raised.value.code == "no_valid_rows"
    assert str(raised.value.errors[0]).startswith("line 1: longer than 2 MB")
