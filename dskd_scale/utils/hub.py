"""Models and tokenizers given as a local folder or a Hugging Face Hub id, with one clear error for each failure.

A name that exists on disk is a folder. Otherwise a name shaped like a Hub id (``gpt2``, ``Qwen/Qwen2.5-1.5B``) is
loaded through ``from_pretrained`` (network, or the local Hub cache with ``HF_HUB_OFFLINE=1``); anything else is a
missing folder. transformers retries an unreachable Hub for about a minute before it fails.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
OFFLINE_HINT = ("without network access, download it where there is access (huggingface-cli download NAME "
                "--local-dir DIR) and give DIR, or set HF_HUB_OFFLINE=1 to use the local Hub cache")


def is_hub_id(name: str) -> bool:
    """True for a name that is not on disk and reads as ``name`` or ``owner/name``."""
    return not Path(name).exists() and _HUB_ID.fullmatch(name) is not None and not name.endswith((".", "-"))


def load_pretrained(load: Callable[..., T], name: str, *, key: str, what: str,
                    error_type: Callable[[str], Exception], **kwargs: Any) -> T:
    """``load(name, **kwargs)`` (a ``from_pretrained``) for a folder or a Hub id.

    Raises:
        error_type: ``name`` is neither an existing folder nor a Hub id, or the Hub could not provide it (the
            message names ``key`` and says what to do offline).
    """
    if Path(name).exists():
        return load(name, **kwargs)
    if not is_hub_id(name):
        raise error_type(f"{key}: {what} folder {name!r} does not exist (a Hub id reads NAME or OWNER/NAME)")
    try:
        return load(name, **kwargs)
    except OSError as error:  # transformers reports a missing repo and an unreachable Hub as OSError
        raise error_type(f"{key}: {what} {name!r} is not a local folder and could not be loaded from the Hugging "
                         f"Face Hub ({str(error).splitlines()[0]}); {OFFLINE_HINT}") from error
