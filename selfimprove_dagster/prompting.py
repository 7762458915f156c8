"""Prompt templates are data: plain-text files in `selfimprove_dagster/templates/`.

    render(load_template("judge_rubric.txt"), question=q, answer=a)

Placeholders are `{name}`. They are filled in one pass, so braces inside the values
(LaTeX, code, a question that quotes "{answer}") are left alone.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

from selfimprove_dagster.errors import SelfImproveError

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@cache
def load_template(name: str) -> str:
    path = files("selfimprove_dagster").joinpath("templates", name)
    if not path.is_file():
        raise SelfImproveError(
            f"No prompt template `{name}` in selfimprove_dagster/templates",
            "reinstall the package (`make install`) or fix the template name",
        )
    return path.read_text(encoding="utf-8").strip()


def render(template: str, **fields: str) -> str:
    """`template` with each `{name}` replaced by `fields[name]` (all must be given)."""
    missing = sorted(set(_PLACEHOLDER.findall(template)) - fields.keys())
    if missing:
        raise SelfImproveError(
            f"Prompt template needs values for {missing}", "pass them to render()"
        )
    return _PLACEHOLDER.sub(lambda m: str(fields[m.group(1)]), template)
