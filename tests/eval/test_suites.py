"""Each suite end to end with a scripted model: prompts, stop strings, scoring and per-example records."""

from __future__ import annotations

import json

import pytest

from dskd_scale.eval import prompts as P
from dskd_scale.eval.data import load_gsm8k, load_humaneval, load_instruction_suite, load_mbpp
from dskd_scale.eval.metrics import rouge_l
from dskd_scale.eval.suites import evaluate_code, evaluate_gsm8k, evaluate_instruction_following

pytestmark = pytest.mark.assets


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_instruction_following_scores_and_records(asset, oracle, tmp_path):
    examples = load_instruction_suite(asset("data/dolly/valid.jsonl"), limit=6).examples
    # three perfect answers, three answers that are another example's reference
    texts = [e.reference if i < 3 else examples[i - 3].reference for i, e in enumerate(examples)]
    model = oracle({e.prompt: t for e, t in zip(examples, texts, strict=True)})
    result = evaluate_instruction_following(
        model, model.tokenizer, examples, seeds=(10, 20), batch_size=4, records_dir=tmp_path, name="dolly"
    )
    expected = sum(rouge_l(t, e.reference) for e, t in zip(examples, texts, strict=True)) / 6
    assert result["metrics"]["rougeL"] == pytest.approx(expected)
    assert result["metrics"]["exact_match"] == pytest.approx(50.0)
    assert set(result["runs"]) == {"10", "20"} and result["metrics"]["rougeL_std"] == 0.0
    assert result["decoding"]["no_repeat_ngram_size"] == 6 and result["decoding"]["top_k"] == 0
    assert model.batch_sizes == [4, 2, 4, 2]
    records = _records(tmp_path / "dolly.10.jsonl")
    assert [r["index"] for r in records] == list(range(6))  # dataset order, whatever the batching
    assert records[0]["source"].endswith("valid.jsonl:1") and records[0]["prompt"] == examples[0].prompt
    for record, text in zip(records, texts, strict=True):
        assert record["generation"] == text and record["finish"] == "eos"
        assert record["rougeL"] == pytest.approx(rouge_l(text, record["reference"]))


def test_instruction_following_accepts_plain_rows_and_greedy(oracle):
    rows = [{"prompt": "Q: say hi\nA:", "output": "hi"}, {"prompt": "Q: say bye\nA:", "output": ["bye", "ciao"]}]
    model = oracle({"Q: say hi\nA:": " Hi!", "Q: say bye\nA:": "ciao"})
    result = evaluate_instruction_following(model, model.tokenizer, rows, greedy=True)
    assert list(result["runs"]) == ["greedy"] and result["decoding"]["greedy"] is True
    assert result["metrics"]["exact_match"] == pytest.approx(100.0)


def test_empty_generations_are_counted_not_dropped(oracle):
    rows = [{"prompt": "first", "output": "x"}, {"prompt": "second", "output": "y"}]
    model = oracle({"first": "", "second": "y"})
    result = evaluate_instruction_following(model, model.tokenizer, rows, seeds=(1,))
    assert result["generation"]["empty_generations"] == 1
    assert result["num_examples"] == 2 and result["metrics"]["rougeL"] == pytest.approx(50.0)


def test_gsm8k_accuracy_with_stop_at_next_question(asset, oracle, tmp_path):
    examples = load_gsm8k(asset("data/gsm8k/test.jsonl"), limit=4).examples
    shots = load_gsm8k(asset("data/gsm8k/train.jsonl"), limit=2).examples
    completions = {}
    for i, e in enumerate(examples):
        solution = e.extra["solution"] if i % 2 == 0 else "I think it is 123456.\n#### 123456"
        completions[P.gsm8k_prompt(e, shots)] = f" {solution}\n\nQuestion: What is 999 + 1?\nAnswer: #### 1000"
    model = oracle(completions)
    result = evaluate_gsm8k(model, model.tokenizer, examples, shots=shots, records_dir=tmp_path)
    assert result["metrics"]["accuracy"] == pytest.approx(50.0)
    records = _records(tmp_path / "gsm8k.greedy.jsonl")
    assert all("Question:" not in r["generation"] and r["finish"] == "stop" for r in records)
    assert [r["predicted"] for r in records[1::2]] == ["123456", "123456"]
    assert records[0]["prompt"].startswith("Question: " + shots[0].prompt)
    assert "<<" not in records[0]["prompt"]  # calculator annotations removed from the shots


def test_humaneval_pass_at_1_runs_programs_in_the_sandbox(asset, oracle):
    examples = load_humaneval(asset("data/humaneval/HumanEval.jsonl.gz"), limit=4).examples
    # canonical bodies followed by junk after a top-level def (cut by the stop strings), except one wrong body
    texts = [e.reference + "\ndef junk(:\n" for e in examples[:3]] + ["    return None\n"]
    model = oracle({e.prompt: t for e, t in zip(examples, texts, strict=True)})
    result = evaluate_code(model, model.tokenizer, examples, task="humaneval", workers=2)
    assert result["metrics"]["pass@1"] == pytest.approx(75.0)
    assert result["generation"]["execution_passed"] == 3 and result["generation"]["execution_failed"] == 1
    assert result["sandbox"]["timeout_s"] > 0


def test_mbpp_few_shot_prompt_and_pass_at_1(asset, oracle):
    suite, shots = load_mbpp(asset("data/mbpp/sanitized-mbpp.json"), limit=3)
    prompt = P.mbpp_prompt(suite.examples[0], shots)
    assert prompt.count("[BEGIN]") == 4 and prompt.count("[DONE]") == 3 and prompt.endswith("[BEGIN]\n")
    model = oracle({P.mbpp_prompt(e, shots): e.reference + "\n[DONE]\nmore junk" for e in suite.examples})
    result = evaluate_code(model, model.tokenizer, suite.examples, task="mbpp", shots=shots, workers=2)
    assert result["metrics"]["pass@1"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="task must be"):
        evaluate_code(model, model.tokenizer, suite.examples, task="apps")


def test_chat_template_path_extracts_the_code_block(asset, oracle):
    from transformers import AutoTokenizer

    from dskd_scale.eval.loading import ensure_pad_token

    tokenizer = AutoTokenizer.from_pretrained(asset("tokenizers/gpt2"))
    ensure_pad_token(tokenizer)
    examples = load_humaneval(asset("data/humaneval/HumanEval.jsonl.gz"), limit=2).examples
    with pytest.raises(ValueError, match="has no chat template"):
        evaluate_code(oracle({}, tokenizer), tokenizer, examples, task="humaneval", use_chat_template=True)
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    replies = {
        P.chat_prompt(tokenizer, P.CODE_SYSTEM_PROMPT, e.prompt): f"Sure:\n```python\n{e.prompt}{e.reference}```\nDone."
        for e in examples
    }
    assert all(prompt.startswith("<system>") and prompt.endswith("<assistant>") for prompt in replies)
    model = oracle(replies, tokenizer)
    result = evaluate_code(model, tokenizer, examples, task="humaneval", use_chat_template=True, workers=2)
    assert result["metrics"]["pass@1"] == pytest.approx(100.0)
