"""engine/chat_tokenizer.py, the web's torch-free tokenizer, gives what transformers' tokenizer of
the same base model gives: the same rendered text, token ids, offsets and trained tokens, and so
the same validation report."""

import json

import pytest

from engine import data
from engine.base_models import load_tokenizer, tokenizer_folder
from engine.chat_tokenizer import ChatTokenizer
from tests.helpers import SMOLLM2, jsonl

ROWS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {
        "messages": [
            {"role": "system", "content": "You answer in French."},
            {"role": "user", "content": "Thank you, dear 👋 — ça va?\n\n  indented\ttab"},
            {"role": "assistant", "content": "Merci ! Très bien. <|im_end|> inside"},
            {"role": "user", "content": "数字 12345 and code `x = {'a': 1}`"},
            {"role": "assistant", "content": "   leading spaces\nand a last line\n"},
        ]
    },
    {"prompt": "Translate: cat", "completion": " chat"},
    {"instruction": "Add", "input": "2 + 2", "output": "4"},
    {"text": "Plain text, trained whole. Ünïcödé and emoji 🚀."},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    cache = tmp_path_factory.mktemp("models")
    return load_tokenizer(SMOLLM2, cache), ChatTokenizer.from_folder(
        tokenizer_folder(SMOLLM2, cache)
    )


@pytest.mark.parametrize("row", ROWS, ids=lambda row: next(iter(row)))
def test_it_renders_and_tokenizes_every_format_as_transformers_does(tokenizers, row):
    reference, torch_free = tokenizers
    (example,) = list(data.open_dataset(data.chunks_of(jsonl([row])))[1])
    expected, expected_offsets = data.render(example, reference)
    rendered, offsets = data.render(example, torch_free)
    assert rendered.text == expected.text
    assert rendered.input_ids == expected.input_ids
    assert rendered.trained == expected.trained
    assert [tuple(o) for o in offsets] == [tuple(o) for o in expected_offsets]


def test_it_adds_the_same_generation_prompt(tokenizers):
    reference, torch_free = tokenizers
    messages = [{"role": "user", "content": "Why?"}]
    assert torch_free.apply_chat_template(
        messages, add_generation_prompt=True
    ) == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_its_validation_report_equals_the_one_transformers_gives(tokenizers):
    reference, torch_free = tokenizers
    content = jsonl(ROWS[:2] * 3) + b'{"messages": "not a list"}\n'
    reports = [
        data.validate(data.chunks_of(content), tokenizer, filename="rows.jsonl").as_dict()
        for tokenizer in tokenizers
    ]
    assert json.dumps(reports[0], sort_keys=True) == json.dumps(reports[1], sort_keys=True)
    assert reports[0]["rows"] == 6 and reports[0]["error_count"] == 1
