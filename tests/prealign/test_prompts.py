"""Prompt formats: named-field templates (Alpaca), chat messages, and nothing dropped without a word."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

from dskd_scale.prealign.pipeline import PrealignConfig, run_prealign
from dskd_scale.prealign.prompts import (
    ALPACA_WITH_INPUT,
    PromptFormat,
    PromptFormatError,
    RowError,
    RowRenderer,
    chat_renderer,
    template_fields,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CHAT_JINJA = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_alpaca_template_reproduces_the_prompts_of_the_dolly_assets_exactly(dolly_slice):
    # The shared Dolly files keep `instruction`, `input` and the prompt DSKD built from them with Alpaca's template.
    renderer = RowRenderer(PromptFormat(template="alpaca", ignore_fields=("prompt",)))
    rows = [json.loads(line) for line in dolly_slice(1000).read_text(encoding="utf-8").splitlines()]
    with_input = sum(bool(row["input"].strip()) for row in rows)
    assert 0 < with_input < len(rows)  # both variants (with and without ### Input) are exercised
    for number, row in enumerate(rows, start=1):
        prompt, response, unused = renderer.render(row, f"dev.jsonl:{number}")
        assert (prompt, response, unused) == (row["prompt"], row["output"], [])


def test_alpaca_by_hand():
    renderer = RowRenderer(PromptFormat(template="alpaca"))
    prompt, _, _ = renderer.render({"instruction": "Add.", "input": "1 2", "output": "3"}, "x")
    assert prompt.endswith("### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n")
    prompt, _, _ = renderer.render({"instruction": "Add.", "input": "  ", "output": "3"}, "x")
    assert prompt.endswith("### Instruction:\nAdd.\n\n### Response:\n") and "Input" not in prompt
    prompt, _, _ = renderer.render({"instruction": "Add.", "output": "3"}, "x")  # no input field at all
    assert "Input" not in prompt


def test_custom_template_fills_named_fields_and_keeps_literal_braces():
    renderer = RowRenderer(PromptFormat(template="Q{{x}}: {question}\nContext: {context}\nA: ", response_field="a"))
    prompt, response, _ = renderer.render({"question": "why?", "context": "none", "a": "because"}, "f:1")
    assert (prompt, response) == ("Q{x}: why?\nContext: none\nA: ", "because")


@pytest.mark.parametrize(("template", "message"), [
    ("no fields here {", "Single '{'"),
    ("plain text", "not a built-in"),
    ("{0} positional", "not a plain {name} field"),
    ("{a.b}", "not a plain {name} field"),
    ("{a:>10}", "not a plain {name} field"),
    ("{a!r}", "not a plain {name} field"),
])
def test_bad_templates_are_refused_naming_the_setting(template, message):
    problems = PromptFormat(template=template).problems()
    assert problems and problems[0].startswith("template") and message in problems[0]


def test_template_settings_that_cannot_work():
    assert "the answer would be in the prompt" in PromptFormat(template="{q} {output}").problems()[0]
    assert "which the template uses" in PromptFormat(template="{q}", ignore_fields=("q",)).problems()[0]
    assert "exclude each other" in PromptFormat(template="{q}", chat_template="student").problems()[0]
    assert template_fields("{b} {a} {b}") == ["b", "a"]
    with pytest.raises(PromptFormatError, match="names no field"):
        template_fields("{{}}")


def test_template_row_errors_name_the_row_and_the_field():
    renderer = RowRenderer(PromptFormat(template="{instruction}\n{input}\n"))
    with pytest.raises(RowError, match=r"^a\.jsonl:7: missing field 'input' \(fields present: \['instruction', "
                                       r"'output'\]\)") as caught:
        renderer.render({"instruction": "i", "output": "o"}, "a.jsonl:7")
    assert caught.value.reason == "missing_field"
    with pytest.raises(RowError, match=r"a\.jsonl:8: field\(s\) \['text'\] not used by the template") as caught:
        renderer.render({"instruction": "i", "input": "x", "output": "o", "text": "i x o"}, "a.jsonl:8")
    assert caught.value.reason == "unused_field"
    ignoring = RowRenderer(PromptFormat(template="{instruction}\n{input}\n", ignore_fields=("text",)))
    assert ignoring.render({"instruction": "i", "input": "x", "output": "o", "text": "t"}, "a:9")[2] == []
    # empty and non-text fields are not content that could be lost
    assert renderer.render({"instruction": "i", "input": "x", "output": "o", "id": 3, "note": " "}, "a:10")[2] == []


def test_fields_format_reports_unused_text_unless_the_prompt_contains_it():
    renderer = RowRenderer(PromptFormat(prompt_field="instruction"))
    # Alpaca rows read with --prompt-field instruction: the input would be lost, and is reported
    _, _, unused = renderer.render({"instruction": "Sum", "input": "1 2", "output": "3"}, "x")
    assert unused == ["input"]
    # a Dolly-layout row: instruction/input already inside the templated prompt field
    fields = RowRenderer(PromptFormat())
    row = {"instruction": "Sum", "input": "1 2", "prompt": "### Sum\n### 1 2\n", "output": "3"}
    assert fields.render(row, "x")[2] == []


def _chat_row(*messages):
    return {"messages": [{"role": role, "content": content} for role, content in messages]}


def test_chat_rows_render_the_prompt_with_one_template_and_train_on_the_last_reply(tmp_path, load_tokenizer, demo):
    jinja = tmp_path / "chat.jinja"
    jinja.write_text(CHAT_JINJA, encoding="utf-8")
    student = load_tokenizer(demo["student_tokenizer"])
    renderer = RowRenderer(PromptFormat(chat_template=str(jinja)), chat_renderer(student, str(jinja)))
    prompt, response, _ = renderer.render(_chat_row(("system", "Be brief."), ("user", "Capital of France?"),
                                                    ("assistant", "Paris.")), "c.jsonl:1")
    assert prompt == "<|system|>\nBe brief.\n<|user|>\nCapital of France?\n<|assistant|>\n" and response == "Paris."
    for row, message in [
        (_chat_row(("user", "hi")), "the last message must be the assistant's reply"),
        (_chat_row(("assistant", "hi")), "a prompt message is needed"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, r"messages\[0\] must be an object"),
        ({"messages": "hi"}, "must be a non-empty list"),
        ({"prompt": "p", "output": "o"}, "missing field 'messages'"),
    ]:
        with pytest.raises(RowError, match=rf"c\.jsonl:2: .*{message}"):
            renderer.render(row, "c.jsonl:2")


def test_chat_renderer_drops_a_leading_bos_text_the_tokenizer_adds_itself(load_tokenizer, demo):
    student = copy.deepcopy(load_tokenizer(demo["student_tokenizer"]))
    assert student("x")["input_ids"][0] == student.bos_token_id  # the demo's unigram student adds BOS
    student.chat_template = "{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}"
    assert chat_renderer(student, "student")([{"role": "user", "content": "hi"}]) == "[hi]"
    teacher = copy.deepcopy(load_tokenizer(demo["teacher_tokenizer"]))
    if teacher("x")["input_ids"][:1] != [teacher.bos_token_id]:  # a tokenizer that adds no BOS keeps the text
        teacher.chat_template = student.chat_template
        assert chat_renderer(teacher, "teacher")([{"role": "user", "content": "hi"}]) == f"{teacher.bos_token}[hi]"
    student.chat_template = None
    with pytest.raises(PromptFormatError, match="has no chat template; give a Jinja file"):
        chat_renderer(student, "student")


def test_chat_run_end_to_end_records_the_format_in_the_manifest(tmp_path, demo):
    jinja = tmp_path / "chat.jinja"
    jinja.write_text(CHAT_JINJA, encoding="utf-8")
    data = tmp_path / "chat.jsonl"
    rows = [_chat_row(("user", f"What is {i} plus {i}?"), ("assistant", f"It is {2 * i}.")) for i in range(30)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    config = PrealignConfig(teacher_tokenizer=str(demo["teacher_tokenizer"]),
                            student_tokenizer=str(demo["student_tokenizer"]), data=(str(data),),
                            out=str(tmp_path / "out"), chat_template=str(jinja), max_length=64, workers=1)
    manifest = run_prealign(config)
    assert manifest["stats"]["examples"] == 30 and manifest["stats"]["aligned_pairs"] > 0
    entry = manifest["prompt_format"]
    assert entry["kind"] == "chat" and entry["chat_template"] == str(jinja) and len(entry["chat_template_sha256"]) == 64


def _run_tool(argv, capsys):
    sys.path.insert(0, str(PROJECT_ROOT / "tools"))
    try:
        import prealign as tool
    finally:
        sys.path.pop(0)
    return tool.main(argv), capsys.readouterr().err


def test_tool_template_flags(tmp_path, demo, capsys):
    data = tmp_path / "alpaca.jsonl"
    data.write_text(json.dumps({"instruction": "Name a colour.", "input": "", "output": "Red."}) + "\n"
                    + json.dumps({"instruction": "Add", "input": "1 2", "output": "3", "text": "Add 1 2 3"}) + "\n",
                    encoding="utf-8")
    base = ["--teacher-tokenizer", str(demo["teacher_tokenizer"]), "--student-tokenizer",
            str(demo["student_tokenizer"]), "--data", str(data), "--out", str(tmp_path / "out"), "--workers", "1"]
    code, err = _run_tool([*base, "--template", "alpaca"], capsys)
    assert code == 2 and "alpaca.jsonl:2: field(s) ['text'] not used by the template" in err
    code, err = _run_tool([*base, "--template", "alpaca", "--prompt-field", "instruction"], capsys)
    assert code == 2 and "--prompt-field is not used with --template" in err
    code, err = _run_tool([*base, "--template", "alpaca", "--ignore-fields", "text"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["prompt_format"]["template"] == ALPACA_WITH_INPUT
    assert manifest["prompt_format"]["ignore_fields"] == ["text"] and manifest["stats"]["examples"] == 2
    code, err = _run_tool([*base, "--template", r"Q: {instruction}\n{input}\nA: ", "--ignore-fields", "text"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["prompt_format"]["template"] == "Q: {instruction}\n{input}\nA: "  # \n from a shell is a newline
