"""Prompt formats: how a data row becomes the (prompt, response) text pair that both tokenizers see.

Three formats, chosen by the settings (``PromptFormat``):
- fields (default): ``prompt`` and ``response`` are two fields of the row, used as they are;
- template (``template``): the prompt is a text with named fields, ``{instruction}``, filled from the row; the
  built-in ``alpaca`` is the Stanford Alpaca prompt, whose ``### Input:`` section is left out when ``input`` is
  empty. Every field the template names must exist in every row, and every non-empty text field of a row must be
  used by the template or the response, or be listed in ``ignore_fields``: nothing is dropped without a word;
- chat (``chat_template``): the row holds ``messages``, a list of ``{"role", "content"}``; the last message is the
  assistant's reply (the response) and the messages before it are rendered by one chat template into the
  prompt (the student's or the teacher's, or a Jinja file). Both tokenizers then see that same text, which
  exact token alignment needs (docs/data.md explains why, and what it means for chat models).

A response given as a list of strings (Dolly's multi-reference ``output``) trains on its first element.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
    "\n\n### Response:\n"
)
ALPACA_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
# name -> (template, template used when the optional field is empty, the optional field)
BUILTIN_TEMPLATES: dict[str, tuple[str, str | None, str | None]] = {
    "alpaca": (ALPACA_WITH_INPUT, ALPACA_WITHOUT_INPUT, "input"),
}
CHAT_TEMPLATE_SOURCES = ("student", "teacher")


class PromptFormatError(ValueError):
    """Settings of a prompt format that cannot work (names the setting)."""


class RowError(ValueError):
    """A row that does not fit the prompt format; ``reason`` is one of ``sources.DROP_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def template_fields(template: str, setting: str = "template") -> list[str]:
    """The named fields of ``template`` in order of first use; only plain ``{name}`` fields are allowed."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:  # a lone "{" or "}"
        raise PromptFormatError(f"{setting}: {error} (write a literal brace as {{{{ or }}}})") from error
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise PromptFormatError(f"{setting}: field {{{name}{'!' + conversion if conversion else ''}"
                                    f"{':' + spec if spec else ''}}} is not a plain {{name}} field")
        if name not in names:
            names.append(name)
    if not names:
        raise PromptFormatError(f"{setting}: the template names no field; write the row's fields as {{name}}")
    return names


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptFormat:
    """How rows become (prompt, response); see the module docstring. ``template`` is a built-in name, a file or
    the template text; ``chat_template`` is ``student``, ``teacher`` or a Jinja file."""

    prompt_field: str = "prompt"
    response_field: str = "output"
    template: str | None = None
    chat_template: str | None = None
    messages_field: str = "messages"
    ignore_fields: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "chat" if self.chat_template else "template" if self.template else "fields"

    def problems(self) -> list[str]:
        """Every problem of the settings (empty when they can work)."""
        problems = []
        if self.template and self.chat_template:
            problems.append("template and chat_template exclude each other (a chat row has no named fields)")
        if self.kind == "fields" and self.prompt_field == self.response_field:
            problems.append(f"prompt_field and response_field are both {self.prompt_field!r}")
        if self.kind == "template":
            try:
                used = set(self.template_texts()[2])
            except PromptFormatError as error:
                problems.append(str(error))
            else:
                if self.response_field in used:
                    problems.append(f"template uses the response field {self.response_field!r}: the answer would "
                                    "be in the prompt")
                overlap = sorted(used & set(self.ignore_fields))
                if overlap:
                    problems.append(f"ignore_fields lists {overlap}, which the template uses")
        if self.kind == "chat" and self.chat_template not in CHAT_TEMPLATE_SOURCES \
                and not Path(self.chat_template).is_file():
            problems.append(f"chat_template {self.chat_template!r}: give 'student', 'teacher' or a Jinja file")
        return problems

    def template_texts(self) -> tuple[str, str | None, list[str], str | None]:
        """(template, template without the optional field, all fields used, the optional field)."""
        assert self.template is not None
        if self.template in BUILTIN_TEMPLATES:
            full, short, optional = BUILTIN_TEMPLATES[self.template]
        elif "{" not in self.template and Path(self.template).is_file():
            full, short, optional = Path(self.template).read_text(encoding="utf-8"), None, None
        elif "{" not in self.template:
            raise PromptFormatError(f"template {self.template!r}: not a built-in ({sorted(BUILTIN_TEMPLATES)}), "
                                    "not a file, and names no {field}")
        else:
            full, short, optional = self.template, None, None
        return full, short, template_fields(full), optional

    def used_fields(self) -> set[str]:
        if self.kind == "chat":
            return {self.messages_field}
        prompt = set(self.template_texts()[2]) if self.kind == "template" else {self.prompt_field}
        return prompt | {self.response_field}

    def manifest_entry(self) -> dict[str, Any]:
        """What the manifest records about the format (enough to rebuild the same text)."""
        entry: dict[str, Any] = {"kind": self.kind, "ignore_fields": sorted(self.ignore_fields),
                                 "response_list": "a list-valued response trains on its first element"}
        if self.kind == "fields":
            entry.update(prompt=self.prompt_field, response=self.response_field)
        elif self.kind == "template":
            full, short, _, optional = self.template_texts()
            entry.update(template=full, response=self.response_field)
            if short is not None:
                entry.update(template_without_optional=short, optional_field=optional)
        else:
            entry.update(messages=self.messages_field, chat_template=self.chat_template,
                         response="the content of the last message, which must have role 'assistant'")
        return entry


def _text(record: Mapping[str, Any], field: str, location: str, *, response: bool = False) -> str:
    if field not in record:
        raise RowError("missing_field", f"{location}: missing field {field!r} (fields present: {sorted(record)})")
    value = record[field]
    if response and isinstance(value, list):
        if not value:
            raise RowError("empty_response", f"{location}: field {field!r} is an empty list")
        value = value[0]
    if not isinstance(value, str):
        kind = "a string (or a list of strings)" if response else "a string"
        got = "no value (null)" if value is None else type(value).__name__
        raise RowError("non_string_field", f"{location}: field {field!r} must be {kind}, got {got}")
    return value


def _non_empty(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, list):
        return any(isinstance(item, str) and item.strip() for item in value)
    return False


class RowRenderer:
    """Applies a ``PromptFormat`` to rows. ``render_chat(messages) -> prompt text`` renders chat prompts (built by
    the pipeline from a tokenizer; only needed for the chat format)."""

    def __init__(self, prompt_format: PromptFormat,
                 render_chat: Callable[[list[dict[str, str]]], str] | None = None) -> None:
        self.format = prompt_format
        self.render_chat = render_chat
        self.used = prompt_format.used_fields()
        if prompt_format.kind == "template":
            self.full, self.short, _, self.optional = prompt_format.template_texts()

    def unused_fields(self, record: Mapping[str, Any], prompt: str) -> list[str]:
        """Non-empty text fields of the row that neither the prompt nor the response uses, and whose text does not
        appear in the prompt either (Dolly-layout rows keep ``instruction`` beside an already templated
        ``prompt``), minus ``ignore_fields``."""
        return sorted(name for name, value in record.items()
                      if name not in self.used and name not in self.format.ignore_fields and _non_empty(value)
                      and not (isinstance(value, str) and value.strip() in prompt))

    def render(self, record: Any, location: str) -> tuple[str, str, list[str]]:
        """(prompt, response, unused fields) of one row.

        Raises:
            RowError: the row does not fit the format (its ``reason`` is a drop reason; the message names
                ``location`` and the field).
        """
        if not isinstance(record, Mapping):
            raise RowError("malformed_json", f"{location}: a row must be an object, got {type(record).__name__}")
        if self.format.kind == "chat":
            prompt, response = self._chat(record, location)
        else:
            response = _text(record, self.format.response_field, location, response=True)
            if self.format.kind == "template":
                prompt = self._template(record, location)
            else:
                prompt = _text(record, self.format.prompt_field, location)
        if not response.strip():
            raise RowError("empty_response", f"{location}: the response is empty")
        unused = self.unused_fields(record, prompt)
        if unused and self.format.kind == "template":
            raise RowError("unused_field", f"{location}: field(s) {unused} not used by the template (name them in "
                                           "the template, or pass --ignore-fields to leave them out on purpose)")
        return prompt, response, unused

    def render_prompt(self, record: Any, location: str) -> str:
        """The prompt alone, for rows that may have no response yet (``tools/generate.py``); the same text
        ``render`` gives. A chat row's trailing assistant message, if any, is the gold reply and is left out.

        Raises:
            RowError: the row does not fit the format (the message names ``location`` and the field).
        """
        if not isinstance(record, Mapping):
            raise RowError("malformed_json", f"{location}: a row must be an object, got {type(record).__name__}")
        if self.format.kind == "template":
            return self._template(record, location)
        if self.format.kind == "fields":
            return _text(record, self.format.prompt_field, location)
        messages = record.get(self.format.messages_field)
        if isinstance(messages, list) and messages and isinstance(messages[-1], Mapping) \
                and messages[-1].get("role") != "assistant":
            # no gold reply: render every message, with a placeholder reply that the chat check then drops
            record = {**record, self.format.messages_field: [*messages, {"role": "assistant", "content": ""}]}
        return self._chat(record, location)[0]

    def _template(self, record: Mapping[str, Any], location: str) -> str:
        template = self.full
        if self.short is not None:
            optional = record.get(self.optional)
            if optional is None or (isinstance(optional, str) and not optional.strip()):
                template = self.short
        values = {name: _text(record, name, location) for name in template_fields(template)}
        return template.format(**values)

    def _chat(self, record: Mapping[str, Any], location: str) -> tuple[str, str]:
        field = self.format.messages_field
        messages = record.get(field)
        if messages is None:
            raise RowError("missing_field", f"{location}: missing field {field!r} (fields present: "
                                            f"{sorted(record)})")
        if not isinstance(messages, list) or not messages:
            raise RowError("bad_messages", f"{location}: field {field!r} must be a non-empty list of messages")
        cleaned = []
        for number, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise RowError("bad_messages", f"{location}: {field}[{number}] must be an object with string "
                                               f"'role' and 'content', got {message!r:.80}")
            cleaned.append({"role": message["role"], "content": message["content"]})
        if cleaned[-1]["role"] != "assistant":
            raise RowError("bad_messages", f"{location}: the last message must be the assistant's reply (the "
                                           f"response), got role {cleaned[-1]['role']!r}")
        if len(cleaned) < 2:
            raise RowError("bad_messages", f"{location}: {field} holds only the reply; a prompt message is needed")
        assert self.render_chat is not None, "the chat format needs a renderer"
        return self.render_chat(cleaned[:-1]), cleaned[-1]["content"]


def chat_renderer(tokenizer: Any, chat_template: str) -> Callable[[list[dict[str, str]]], str]:
    """``messages -> prompt text``: ``tokenizer``'s chat template (or the Jinja file ``chat_template``) with the
    generation prompt added. A leading BOS *text* is removed when the tokenizer adds its BOS token itself, so
    the row does not start with two BOS."""
    jinja = None if chat_template in CHAT_TEMPLATE_SOURCES else Path(chat_template).read_text(encoding="utf-8")
    if jinja is None and not getattr(tokenizer, "chat_template", None):
        raise PromptFormatError(f"chat_template {chat_template}: the {chat_template} tokenizer "
                                f"{tokenizer.name_or_path} has no chat template; give a Jinja file instead")
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]

    def render(messages: list[dict[str, str]]) -> str:
        text = tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=True)
        return text[len(bos):] if adds_bos and text.startswith(bos) else text

    return render
