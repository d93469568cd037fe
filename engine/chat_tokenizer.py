"""A base model's tokenizer and chat template without torch or transformers, for the web.

Validating an upload renders every row through the base model's chat template and counts its
tokens. transformers' tokenizer does this, but importing transformers imports torch, and the
web is a plain Django process. This reads the same files transformers saved
(``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``) with the ``tokenizers``
package (Rust, the library transformers' fast tokenizers wrap) and renders the template with
jinja2 configured as transformers configures it, so ids, offsets and text are the same
(tests/test_chat_tokenizer.py compares the two).

Only the calls engine/data.py makes are offered: ``tokenizer(text or texts,
add_special_tokens=False, return_offsets_mapping=...)``, ``apply_chat_template(messages,
tokenize=False, add_generation_prompt=...)`` and ``eos_token``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' own filter: jinja's escapes HTML characters, which a prompt must keep.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _compile(template: str) -> jinja2.Template:
    """As transformers compiles a chat template (chat_template_utils.py): sandboxed, trimmed
    blocks, loop controls, and the same three helpers."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(template)


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<|im_end|>", ...} in older configs
        return value.get("content")
    return value


class ChatTokenizer:
    def __init__(self, tokenizer: Tokenizer, chat_template: str | None, special_tokens: dict):
        self._tokenizer = tokenizer
        self._template = _compile(chat_template) if chat_template else None
        self._special_tokens = special_tokens
        self.eos_token = special_tokens.get("eos_token")

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTokenizer:
        """The tokenizer transformers saved in ``folder`` (``save_pretrained``)."""
        config = json.loads((folder / "tokenizer_config.json").read_text())
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else None
        template = template or config.get("chat_template")
        special = {name: _token_text(config.get(name)) for name in SPECIAL_TOKENS}
        return cls(
            Tokenizer.from_file(str(folder / "tokenizer.json")),
            template,
            {name: value for name, value in special.items() if value is not None},
        )

    def apply_chat_template(
        self, messages: list[dict], *, tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        if tokenize:
            raise ValueError("ChatTokenizer renders text only; tokenize it with __call__.")
        if self._template is None:
            raise ValueError("This tokenizer has no chat template.")
        return self._template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self._special_tokens,
        )

    def __call__(
        self,
        text: str | list[str],
        *,
        add_special_tokens: bool = True,
        return_offsets_mapping: bool = False,
    ) -> dict:
        """``{"input_ids": …}`` (and ``"offset_mapping"``), for one text or a list of them."""
        texts = [text] if isinstance(text, str) else list(text)
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        result: dict = {"input_ids": [e.ids for e in encodings]}
        if return_offsets_mapping:
            result["offset_mapping"] = [e.offsets for e in encodings]
        if isinstance(text, str):
            result = {key: value[0] for key, value in result.items()}
        return result
