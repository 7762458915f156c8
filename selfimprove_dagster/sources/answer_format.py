"""How the policy is asked to answer: `short` (just the answer) or `rationale`.

    short      "What is 23 + 45? Answer with just the number."      (16 new tokens do)
    rationale  "... Think step by step. Then write the final answer on its own last line
               as "Answer: <number>"."                                (needs ~200 tokens)

STaR (Zelikman et al., 2022) trains on rationales: reasoning, then the answer. The
verifiers read the final "Answer: X" line (numeric, multiple choice and math all look
for "answer is / Answer:" first). Code rows are asked for one ```python block in both
formats. Templates live in `selfimprove_dagster/templates/answer_*.txt`.

`hinted_prompt` is STaR's rationalization prompt: the question with the reference
answer as a hint (`templates/rationalize_hint.txt`); the hint is never trained on.
"""

from __future__ import annotations

import polars as pl

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.prompting import load_template, render

FORMATS = ("short", "rationale")
# New-token budget a rationale needs (SmolLM2 writes 60-150 tokens of reasoning).
RATIONALE_MAX_NEW_TOKENS = 256
# The built-in tasks' short-answer instruction, removed before asking for a rationale.
SHORT_INSTRUCTION = " Answer with just the number."
# What the final line should look like, per verifier (shown in the instruction).
ANSWER_SHAPES = {
    "numeric": "<number>",
    "multiple_choice": "<letter>",
    "math": "<final answer>",
}


def check_format(answer_format: str) -> str:
    if answer_format not in FORMATS:
        raise SelfImproveError(
            f"unknown answer format {answer_format!r}",
            f"set SELFIMPROVE_ANSWER_FORMAT to one of {', '.join(FORMATS)}",
        )
    return answer_format


def format_prompt(question: str, verifier: str | None, answer_format: str) -> str:
    """The prompt the policy sees for `question` under `answer_format`."""
    check_format(answer_format)
    verifier = verifier or "numeric"
    if verifier == "code":
        return render(load_template("answer_code.txt"), question=question)
    if answer_format == "short":
        if verifier == "multiple_choice":
            return render(load_template("answer_short_choice.txt"), question=question)
        return question
    return render(
        load_template("answer_rationale.txt"),
        question=_bare_question(question),
        answer_shape=ANSWER_SHAPES.get(verifier, "<answer>"),
    )


def apply_answer_format(problems: pl.DataFrame, answer_format: str) -> pl.DataFrame:
    """`problems` with each prompt rewritten by `format_prompt` (prompt_id follows the
    text: a short and a rationale run of the same task are different prompts)."""
    from selfimprove_dagster.ids import prompt_id

    verifiers = (
        problems["verifier"].to_list()
        if "verifier" in problems.columns
        else [None] * problems.height
    )
    prompts = [
        format_prompt(q, v, answer_format)
        for q, v in zip(problems["prompt"].to_list(), verifiers, strict=True)
    ]
    return problems.with_columns(
        prompt=pl.Series(prompts, dtype=pl.String),
        prompt_id=pl.Series([prompt_id(p) for p in prompts], dtype=pl.String),
    )


def hinted_prompt(prompt: str, answer: str) -> str:
    """STaR rationalization: `prompt` with the reference `answer` given as a hint."""
    return render(
        load_template("rationalize_hint.txt"), question=_bare_question(prompt), answer=answer
    )


def _bare_question(prompt: str) -> str:
    """The question without a format instruction it already carries."""
    for instruction in (SHORT_INSTRUCTION, _rationale_tail()):
        if instruction and instruction.strip() in prompt:
            prompt = prompt.split(instruction.strip())[0].rstrip()
    return prompt


def _rationale_tail() -> str:
    return load_template("answer_rationale.txt").split("{question}", 1)[1].split("{")[0].strip()
