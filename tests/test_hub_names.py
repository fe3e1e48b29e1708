"""Models and tokenizers named by a folder or a Hub id (dskd_scale/utils/hub.py), without network access: the
loader is a stand-in that fails the way transformers does offline."""

from __future__ import annotations

import pytest

from dskd_scale.utils.hub import OFFLINE_HINT, is_hub_id, load_pretrained


class _BadInput(ValueError):
    pass


def _offline_loader(name, **kwargs):
    raise OSError("We couldn't connect to 'https://huggingface.co' to load the files\nCheck your connection.")


def test_hub_ids_and_paths(tmp_path):
    assert is_hub_id("gpt2") and is_hub_id("Qwen/Qwen2.5-1.5B") and is_hub_id("meta-llama/Llama-3.2-1B")
    assert not is_hub_id("/abs/model") and not is_hub_id("./model") and not is_hub_id("a/b/c")
    assert not is_hub_id("~/model") and not is_hub_id("")
    (tmp_path / "gpt2").mkdir()
    assert not is_hub_id(str(tmp_path / "gpt2"))


def test_a_folder_is_loaded_as_a_folder(tmp_path):
    seen = []
    assert load_pretrained(lambda name, **kw: seen.append((name, kw)) or "ok", str(tmp_path), key="student.path",
                           what="model", error_type=_BadInput, dtype="bf16") == "ok"
    assert seen == [(str(tmp_path), {"dtype": "bf16"})]


def test_unreachable_hub_and_missing_folder_are_one_clear_error():
    with pytest.raises(_BadInput) as caught:
        load_pretrained(_offline_loader, "Qwen/Qwen2.5-1.5B", key="teacher.tokenizer", what="tokenizer",
                        error_type=_BadInput)
    message = str(caught.value)
    assert message.startswith("teacher.tokenizer: tokenizer 'Qwen/Qwen2.5-1.5B' is not a local folder and could not "
                              "be loaded from the Hugging Face Hub (We couldn't connect")
    assert OFFLINE_HINT in message and "\n" not in message
    with pytest.raises(_BadInput, match=r"^student.path: model folder '/no/such/model' does not exist"):
        load_pretrained(_offline_loader, "/no/such/model", key="student.path", what="model", error_type=_BadInput)
