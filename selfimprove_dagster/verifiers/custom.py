"""Your own verifier, named as `package.module:function` in the `verifier` setting or column.

The function is called as `function(completion, row)` (row: the problem row as a
dict) and returns a `Verdict`, a bool, or a (correct, extracted, reason) tuple:

    # my_checks.py
    from selfimprove_dagster.verifiers.verdict import Verdict

    def exact(completion, row):
        text = completion.strip()
        ok = text == row["answer"]
        return Verdict(ok, text, "correct" if ok else "wrong_answer")

    SELFIMPROVE_VERIFIER=my_checks:exact selfimprove run
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.verifiers.verdict import Verdict


@cache
def load_custom(name: str) -> Callable[[str, Mapping[str, Any]], Verdict]:
    """The verifier `module:function`, wrapped so it always returns a Verdict."""
    module_name, _, function_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SelfImproveError(
            f"custom verifier {name!r}: cannot import module {module_name!r} ({err})",
            "put the module on the Python path (e.g. install your package, or run from its folder)",
        ) from err
    function = getattr(module, function_name, None)
    if not callable(function):
        raise SelfImproveError(
            f"custom verifier {name!r}: {module_name} has no function {function_name!r}",
            "name a function `(completion, row) -> Verdict | bool` as 'module:function'",
        )

    def verify_row(completion: str, row: Mapping[str, Any]) -> Verdict:
        return as_verdict(function(completion, dict(row)), name)

    return verify_row


def as_verdict(value: object, name: str = "custom verifier") -> Verdict:
    """A custom verifier's return value as a Verdict (Verdict, bool, or 3-tuple)."""
    if isinstance(value, Verdict):
        return value
    if isinstance(value, bool):
        return Verdict(value, None, "correct" if value else "wrong_answer")
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[0], bool):
        return Verdict(value[0], None if value[1] is None else str(value[1]), str(value[2]))
    raise SelfImproveError(
        f"{name} returned {type(value).__name__} ({value!r:.60})",
        "return a Verdict, a bool, or a (correct, extracted, reason) tuple",
    )
