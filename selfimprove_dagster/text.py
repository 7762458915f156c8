"""Small text helpers every stage shares (this module imports nothing of the project).

last_message_text([{"role": "assistant", "content": "42"}])  -> "42"
normalize_prompt("What is 23 + 45?")                         -> "what is 23 + 45"
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Any


def last_message_text(value: Any) -> str:
    """The text of a completion or prompt: a string as it is; a conversation (TRL hands
    conversational rows over as [{"role": ..., "content": ...}, ...]) as the content of
    its last message; None as ""."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    return str(value)


def normalize_prompt(text: str) -> str:
    """Comparable form of a prompt: Unicode-normalized, lowercase, whitespace collapsed,
    trailing punctuation and spaces stripped ("What is 23 + 45?" -> "what is 23 + 45").

    A multiple-choice prompt's option lines ("A. bank", "(B) mall") lose their labels
    and are sorted, so the same question with its choices shuffled is the same prompt.
    The one normalizer: dataset dedupe, the train/eval split and the contamination gate
    all compare prompts with it.
    """
    text = _canonical_choices(unicodedata.normalize("NFKC", text))
    return " ".join(text.lower().split()).rstrip(string.punctuation + " ")


# An option line of a multiple-choice prompt: "A. text", "B) text", "(C) text".
_CHOICE_LINE_RE = re.compile(r"^\s*\(?[A-J][.)]\)?\s+(.+?)\s*$")


def _canonical_choices(text: str) -> str:
    lines = text.splitlines()
    options = [m.group(1) for line in lines if (m := _CHOICE_LINE_RE.match(line))]
    if len(options) < 2:
        return text
    stem = [line for line in lines if not _CHOICE_LINE_RE.match(line)]
    return "\n".join([*stem, *sorted(o.lower() for o in options)])
