"""engine/data.py on its own: bytes in; lines, examples, rendered tokens and reports out.

Pure tests: no database and no object store. The tokenizer is the real bundled SmolLM2 one,
converted once per session.
"""

import gzip
import io
import itertools
import json
import pickle
import shutil
import struct
import time
import zipfile

import pytest

from engine import data
from engine.base_models import load_tokenizer, tokenizer_folder
from engine.chat_tokenizer import ChatTokenizer
from tests.helpers import SMOLLM2, jsonl

END = "<|im_end|>"


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tokenizer(models):
    return load_tokenizer(SMOLLM2, models)


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


def test_it_refuses_a_lone_surrogate_escape_by_its_line_and_takes_a_pair():
    content = b'{"text": "\\ud83e\\udd17 pair"}\n{"text": "a \\ud800 b"}\n{"\\udc00": 1}\n'
    pair, value, key = read(content)
    assert pair.text == "🤗 pair"
    message = (
        'contains a lone UTF-16 surrogate escape (such as "\\ud800"), which is not a character'
    )
    assert (str(value), str(key)) == (f"line 2: {message}", f"line 3: {message}")


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


# --- long conversations -----------------------------------------------------------------------


class CountingRenders:
    """The tokenizer, counting how often it renders the chat template."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token = tokenizer.eos_token
        self.renders = 0

    def apply_chat_template(self, messages, **options):
        self.renders += 1
        return self.tokenizer.apply_chat_template(messages, **options)

    def __call__(self, text, **options):
        return self.tokenizer(text, **options)


def spans_by_definition(example: data.Example, tokenizer, full: str) -> list[tuple[int, int]]:
    """Each trained turn's span as its two prefixes render it: from the end of the turns before
    it with the generation prompt, to the end of the turns through it less trailing space."""
    messages = [{"role": m.role, "content": m.content} for m in example.messages]
    spans = []
    for index, message in enumerate(example.messages):
        if message.trained:
            before = tokenizer.apply_chat_template(
                messages[:index], tokenize=False, add_generation_prompt=True
            )
            through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
            assert through.startswith(before) and full.startswith(through)
            spans.append((len(before), len(through.rstrip())))
    return spans


def alternating(turns: int) -> dict:
    return chat(
        *[("user", f"q{i}") if i % 2 == 0 else ("assistant", f"a{i}") for i in range(turns)]
    )


UNEVEN_TURNS = [
    chat(("user", "  padded  "), ("assistant", " spaced "), ("user", "x"), ("assistant", "y\n")),
    {
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "<|im_start|>assistant\n"},
            {"role": "assistant", "content": "draft", "weight": 0},
            {"role": "tool", "content": "\n\n"},
            {"role": "assistant", "content": "🤗 <|im_end|> inside"},
            {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "last\n"},
        ]
    },
]


def test_it_renders_a_conversation_at_the_message_cap_a_fixed_number_of_times(tokenizer):
    example = example_of(alternating(data.MAX_MESSAGES_PER_ROW))
    counting = CountingRenders(tokenizer)
    rendered, _ = data.render(example, counting)
    # Prefix by prefix, it took two renders per trained turn: 2048 here, each of up to the whole.
    assert counting.renders <= 8
    assert trained_runs(rendered, tokenizer) == [
        f"a{i}{END}" for i in range(1, data.MAX_MESSAGES_PER_ROW, 2)
    ]


@pytest.mark.parametrize("row", [alternating(40), TWO_TURNS, *UNEVEN_TURNS])
def test_its_spans_are_each_turns_prefixes_rendered(tokenizer, row):
    example = example_of(row)
    full = data.render_text(example, tokenizer)
    assert data.trained_char_spans(example, tokenizer, full) == spans_by_definition(
        example, tokenizer, full
    )


CHATML_TURN = "<|im_start|>{{ m['role'] }}\n"
GENERATION_PROMPT = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
TEMPLATES = {
    # Content trimmed, as Llama 3's template does: the marked render cannot place it.
    "trimming": "{% for m in messages %}" + CHATML_TURN + "{{ m['content'] | trim }}<|im_end|>\n"
    "{% endfor %}" + GENERATION_PROMPT,
    # Turns that end differently by position: the first trained turn's layout fits not all.
    "uneven-ends": "{% for m in messages %}" + CHATML_TURN + "{{ m['content'] }}"
    "{% if loop.index0 % 4 == 1 %}<|im_end|>{% else %}<|endoftext|>{% endif %}\n"
    "{% endfor %}" + GENERATION_PROMPT,
}


@pytest.mark.parametrize("template", TEMPLATES.values(), ids=TEMPLATES.keys())
def test_a_template_whose_turns_differ_is_measured_turn_by_turn(models, tmp_path, template):
    folder = tokenizer_folder(SMOLLM2, models)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(template)
    tokenizer = ChatTokenizer.from_folder(tmp_path)
    for row in [alternating(8), *UNEVEN_TURNS]:
        example = example_of(row)
        full = data.render_text(example, tokenizer)
        spans = data.trained_char_spans(example, tokenizer, full)
        assert spans == spans_by_definition(example, tokenizer, full)


def test_it_refuses_a_row_over_the_message_cap_with_its_line():
    too_long = alternating(data.MAX_MESSAGES_PER_ROW + 2)
    first, second = read(jsonl([alternating(data.MAX_MESSAGES_PER_ROW), too_long]))
    assert isinstance(first, data.Example)
    assert str(second) == (
        f'line 2: "messages" has {data.MAX_MESSAGES_PER_ROW + 2} messages; a row holds at most '
        f"{data.MAX_MESSAGES_PER_ROW}, so split the conversation"
    )


@pytest.mark.parametrize(
    "row",
    [
        {"messages": [{"role": "r" * 10**6, "content": "a"}]},
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "weight": [0] * 10**5},
            ]
        },
        {"k" * 10**6: 1, "l" * 10**6: 2},
    ],
    ids=["role", "weight", "keys"],
)
def test_it_quotes_at_most_80_characters_of_a_value_in_a_row_error(row):
    (error,) = read(jsonl([row]))
    assert len(error.message) < 300 and "…" in error.message, error.message[:400]


def test_it_quotes_at_most_80_characters_of_a_csv_header():
    with pytest.raises(data.DatasetError) as raised:
        read(b",".join([b"h" * 1000] * 1000) + b"\nrow\n", filename="wide.csv")
    assert raised.value.code == "missing_columns"
    assert len(raised.value.message) < 300


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


def test_it_stops_at_its_deadline(tokenizer):
    content = jsonl([{"text": "fine"}] * 3)
    with pytest.raises(data.OutOfTime):
        data.validate(data.chunks_of(content), tokenizer, deadline=time.monotonic() - 1)
    assert data.validate(data.chunks_of(content), tokenizer, deadline=time.monotonic() + 60)


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


def test_a_row_the_chat_template_refuses_is_a_row_error_by_its_line(models, tmp_path):
    """Some base models' templates raise (roles must alternate…): a row error, never a 500."""
    folder = tokenizer_folder(SMOLLM2, models)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if loop.index0 % 2 == 0 and m.role != 'user' %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
    )
    tokenizer = ChatTokenizer.from_folder(tmp_path)
    with_system = chat(("system", "Be brief."), ("user", "q"), ("assistant", "a"))
    content = jsonl([alternating(2), alternating(2), with_system])
    report = data.validate(data.chunks_of(content), tokenizer)
    assert report.rows == 2 and report.error_count == 1
    assert report.errors == [
        "line 3: the base model's chat template refuses it: "
        "Conversation roles must alternate user/assistant"
    ]


# --- preference pairs --------------------------------------------------------------------------


def answer(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def pair(prompt: str = "Name a prime.", preferred: str = "7", non_preferred: str = "8") -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": prompt}]},
        "preferred_output": answer(preferred),
        "non_preferred_output": answer(non_preferred),
    }


def test_it_reads_a_preference_pair_as_its_input_followed_by_each_answer():
    row = pair()
    row["input"]["messages"].insert(0, {"role": "system", "content": "Be brief."})
    example = example_of(row)
    assert example.format == "preference"
    prompt = [("system", "Be brief.", False), ("user", "Name a prime.", False)]
    assert turns(example) == [*prompt, ("assistant", "7", True)]
    assert [(m.role, m.content, m.trained) for m in example.rejected] == [
        *prompt,
        ("assistant", "8", True),
    ]
    assert [side.messages for side in example.sides()] == [example.messages, example.rejected]


def test_it_ignores_keys_of_a_pair_beyond_openais_as_the_chat_format_does():
    row = pair()
    row["input"]["tools"] = [{"type": "function", "function": {"name": "f"}}]
    row["metadata"] = {"source": "labelers"}
    assert example_of(row).format == "preference"


def test_a_pair_missing_a_side_is_still_read_as_a_pair_and_told_which_side():
    row = pair()
    del row["preferred_output"]
    assert [str(item) for item in read(jsonl([row]))] == ['line 1: missing "preferred_output"']


def test_a_forced_preference_format_reads_other_rows_as_pairs():
    rows = [chat(("user", "q"), ("assistant", "a")), pair()]
    first, second = read(jsonl(rows), forced_format="preference")
    assert str(first) == 'line 1: missing "input"'
    assert second.format == "preference"


def with_input(messages: list[dict]) -> dict:
    return {**pair(), "input": {"messages": messages}}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {k: v for k, v in pair().items() if k != "non_preferred_output"},
            'missing "non_preferred_output"',
        ),
        (
            pair(non_preferred="7 "),
            "preferred_output and non_preferred_output are identical, so neither is preferred",
        ),
        (with_input([]), "input.messages is empty"),
        ({k: v for k, v in pair().items() if k != "input"}, 'missing "input"'),
        ({**pair(), "input": "Name a prime."}, '"input" must be an object, got a string'),
        (
            with_input([{"role": "user", "content": "q"}, answer("a")[0]]),
            "input.messages must end with a user message, got assistant",
        ),
        (
            with_input([{"role": "bot", "content": "q"}]),
            'input.messages[0].role "bot" is not one of system, user, assistant, tool',
        ),
        (
            with_input([{"role": "user", "content": 7}]),
            "input.messages[0].content must be a string, got a number",
        ),
        (
            with_input([{"role": "user", "content": " "}]),
            "input.messages[0].content is empty; the answers need a prompt",
        ),
        (
            {**pair(), "preferred_output": [{"role": "user", "content": "7"}]},
            'preferred_output[0].role must be assistant, got "user"',
        ),
        (
            {**pair(), "preferred_output": [{"content": "7"}]},
            "preferred_output[0].role must be assistant, got missing",
        ),
        (
            {**pair(), "preferred_output": answer("7")[0]},
            '"preferred_output" must be a list of one assistant message, got an object',
        ),
        (
            {**pair(), "non_preferred_output": []},
            "non_preferred_output must hold exactly one message, got 0",
        ),
        (
            {**pair(), "non_preferred_output": answer("8") * 2},
            "non_preferred_output must hold exactly one message, got 2",
        ),
        (
            {**pair(), "non_preferred_output": ["8"]},
            "non_preferred_output[0] must be an object, got a string",
        ),
        (pair(non_preferred=""), "non_preferred_output[0].content is empty; an answer needs text"),
    ],
    ids=[
        "missing-side",
        "identical",
        "input-empty",
        "input-missing",
        "input-not-object",
        "ends-with-assistant",
        "input-role",
        "input-content",
        "prompt-empty",
        "answer-role",
        "answer-role-missing",
        "answer-not-list",
        "no-answer",
        "two-answers",
        "answer-not-object",
        "answer-empty",
    ],
)
def test_each_malformed_pair_gets_its_own_message_with_its_line(row, message):
    good, bad = read(jsonl([pair(), row]))
    assert isinstance(good, data.Example)
    assert str(bad) == f"line 2: {message}"


def test_it_refuses_a_csv_forced_to_preference_with_a_sentence():
    with pytest.raises(data.DatasetError) as raised:
        read(b"prompt,completion\na,b\n", filename="pairs.csv", forced_format="preference")
    assert raised.value.code == "missing_columns"
    assert raised.value.message == "Preference pairs are read from JSONL only, not CSV."


def test_it_refuses_pairs_mixed_with_chats(tokenizer):
    content = jsonl([pair(), chat(("user", "q"), ("assistant", "a"))])
    with pytest.raises(data.DatasetError) as raised:
        data.validate(data.chunks_of(content), tokenizer)
    assert raised.value.code == "mixed_formats"
    assert "preference pairs (first on line 1, 1 rows) and chat messages" in raised.value.message


def test_each_side_of_a_pair_trains_only_its_own_answer(tokenizer):
    preferred, rejected = example_of(pair()).sides()
    assert trained_runs(data.render(preferred, tokenizer)[0], tokenizer) == [f"7{END}"]
    assert trained_runs(data.render(rejected, tokenizer)[0], tokenizer) == [f"8{END}"]


def test_pairs_are_duplicates_only_when_both_answers_repeat():
    first, twin, other = read(jsonl([pair(), pair(), pair(non_preferred="9")]))
    assert first.fingerprint() == twin.fingerprint() != other.fingerprint()
    as_chat = example_of(chat(("user", "Name a prime."), ("assistant", "7")))
    assert as_chat.fingerprint() != first.fingerprint()


def test_it_reports_pairs_answer_tokens_and_how_many_answers_open_alike(tokenizer):
    rows = [
        pair(
            "Capital of Italy?", "The capital of Italy is Rome.", "The capital of Italy is Milan."
        ),
        pair("Say hello.", "Hello, nice to meet you.", "Go away."),
        pair("Name a prime.", "7", "8"),
        pair("Name a prime.", "7", "8"),
    ]
    report = data.validate(data.chunks_of(jsonl(rows)), tokenizer, context_length=40)
    examples = read(jsonl(rows))

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    sides = [
        [len(data.render(side, tokenizer)[0].input_ids) for side in e.sides()] for e in examples
    ]
    assert (report.format, report.rows, report.duplicate_rows) == ("preference", 4, 1)
    assert report.tokens == sum(sum(counts) for counts in sides)
    assert report.tokens_per_row["max"] == max(sum(counts) for counts in sides)
    # Sides of 43 + 43, 42 + 38 and 37 + 37 tokens: a pair is over when either side is.
    assert report.rows_over_context == sum(1 for counts in sides if max(counts) > 40) == 2
    preferred = [len(ids(row["preferred_output"][0]["content"])) for row in rows]
    non_preferred = [len(ids(row["non_preferred_output"][0]["content"])) for row in rows]
    assert report.preference == {
        "pairs": 4,
        "preferred_answer_tokens": {
            "total": sum(preferred),
            "mean": round(sum(preferred) / 4, 1),
            "max": max(preferred),
        },
        "non_preferred_answer_tokens": {
            "total": sum(non_preferred),
            "mean": round(sum(non_preferred) / 4, 1),
            "max": max(non_preferred),
        },
        "same_start_tokens": 4,
        "same_start_pairs": 1,  # Rome / Milan: "The capital of Italy" opens both
        "same_start_share": 0.25,
    }
    assert report.role_counts == {"user": 4, "assistant": 4}


def test_a_supervised_report_has_no_preference_section(tokenizer):
    report = data.validate(data.chunks_of(jsonl([{"text": "a"}])), tokenizer)
    assert report.preference is None
