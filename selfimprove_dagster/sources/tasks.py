"""Where prompts and reference answers come from: built-in tasks and dataset files.

Every source yields a *problem table*, a polars DataFrame with the columns of
`PROBLEM_SCHEMA`:

- `prompt_id`: stable hash of the prompt (`ids.prompt_id`), the lineage join key
- `prompt`:    the question given to the model
- `answer`:    the reference answer as its verifier reads it (numeric: canonical number
               string; multiple choice: the label; math: LaTeX; code: the reference code)
- `split`:     "train" (the model practises on it) or "eval" (held out, scored only)
- `task`:      the task name, or the dataset file's stem
- `verifier`:  which verifier judges answers to it (numeric, multiple_choice, math, code,
               or module:function; `verifiers.dispatch`)
- `choices`, `tests`, `test_setup`, `entry_point`: what the multiple-choice and code
               verifiers need (null elsewhere; `sources.datasets` reads every shape)

Train and eval never share a prompt (compared by `text.normalize_prompt`),
so held-out accuracy is not inflated by training on the test questions.

    make_task("addition_2digit", n_train=200, n_eval=200, seed=0)
    make_task("addition_digits", n_train=200, n_eval=200, seed=0, difficulty=3)
    load_dataset_file("my_problems.jsonl", n_train=None, n_eval=100, seed=0)
    load_dataset_file("mine.jsonl", 100, 50, 0, drop_contaminated=True)  # drop near-copies
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import polars as pl

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.ids import prompt_id
from selfimprove_dagster.sources.records import parse_record
from selfimprove_dagster.text import normalize_prompt

PROBLEM_SCHEMA: dict[str, pl.DataType] = {
    "prompt_id": pl.String(),
    "prompt": pl.String(),
    "answer": pl.String(),
    "split": pl.String(),
    "task": pl.String(),
    "verifier": pl.String(),
    "choices": pl.String(),  # JSON object label -> text (multiple choice)
    "tests": pl.List(pl.String()),  # code: test statements
    "test_setup": pl.String(),  # code: run before the tests
    "entry_point": pl.String(),  # code: the function the tests call
}
# The columns a verifier may read besides `answer` (carried by the round's prompts).
VERIFIER_COLUMNS = ("verifier", "choices", "tests", "test_setup", "entry_point")

# Appended to built-in prompts: the small model then tends to reply with a bare number.
ANSWER_INSTRUCTION = " Answer with just the number."

# A generator gets this many draws per problem requested (plus a floor) before
# `make_task` concludes the task has too few distinct problems.
DRAWS_PER_PROBLEM = 50
MIN_DRAWS = 1000

# Split labels accepted in a dataset file's `split` column, mapped to ours.
SPLIT_ALIASES = {
    "train": "train",
    "eval": "eval",
    "test": "eval",
    "validation": "eval",
    "valid": "eval",
    "val": "eval",
    "dev": "eval",
}

SUPPORTED_SUFFIXES = (".jsonl", ".parquet")


# --- built-in task generators ----------------------------------------------------


def addition_2digit(rng: random.Random) -> tuple[str, str]:
    """ "What is A + B?" with A, B uniform in 10..99 (8,100 distinct problems)."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?{ANSWER_INSTRUCTION}", str(a + b)


_NAMES = ("Sam", "Mia", "Leo", "Ava", "Ben", "Zoe", "Max", "Lily", "Omar", "Nina")
_OBJECTS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "balloons")
_ADD_TEMPLATES = (
    "{name} has {a} {obj} and buys {b} more. How many {obj} does {name} have now?",
    "{name} had {a} {obj}. Then {name} found {b} more. How many {obj} does {name} have in total?",
    "There are {a} {obj} in a box. {name} puts in {b} more. How many {obj} are in the box now?",
)
_SUBTRACT_TEMPLATES = (
    "{name} has {a} {obj} and gives away {b}. How many {obj} does {name} have left?",
    "{name} had {a} {obj} and lost {b} of them. How many {obj} does {name} have now?",
    "There are {a} {obj} in a basket. {name} takes out {b}. How many {obj} are left?",
)


def word_problems(rng: random.Random) -> tuple[str, str]:
    """One-step add/subtract story problems, operands 2..50, never a negative answer."""
    subtract = rng.random() < 0.5
    template = rng.choice(_SUBTRACT_TEMPLATES if subtract else _ADD_TEMPLATES)
    name, obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
    a, b = rng.randint(2, 50), rng.randint(2, 50)
    if subtract:
        a, b = max(a, b), min(a, b)  # take away at most what is there
    answer = a - b if subtract else a + b
    prompt = template.format(name=name, obj=obj, a=a, b=b) + ANSWER_INSTRUCTION
    return prompt, str(answer)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "addition_2digit": addition_2digit,
    "word_problems": word_problems,
}
# Distinct problems (by `problem_key`) each built-in task can give: 90 x 90 sums; 49 x 49
# sums plus 49 x 50 / 2 differences (a >= b) for the word problems.
TASK_SIZES = {"addition_2digit": 90 * 90, "word_problems": 49 * 49 + 49 * 50 // 2}


# --- task families: difficulty is a parameter of the generator ---------------------


def addition(rng: random.Random, digits: int = 2, operands: int = 2) -> tuple[str, str]:
    """ "What is A + B (+ C ...)?" with `operands` numbers of exactly `digits` digits
    (one digit: 0..9). `addition(rng, 2, 2)` asks what `addition_2digit` asks."""
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    numbers = [rng.randint(low, high) for _ in range(operands)]
    return f"What is {' + '.join(map(str, numbers))}?{ANSWER_INSTRUCTION}", str(sum(numbers))


@dataclass(frozen=True)
class TaskFamily:
    """A verifiable task whose difficulty is a parameter: band -> problem generator.

    Higher bands are harder. The adaptive curriculum (`curriculum.py`) picks the band a
    round trains on; every problem row records its band.
    """

    name: str
    bands: dict[int, Callable[[random.Random], tuple[str, str]]]
    band_names: dict[int, str]  # what a band means, for metadata and the README
    verifier: str = "numeric"  # the verifier that judges its problems (all arithmetic)


FAMILIES: dict[str, TaskFamily] = {
    # Band = digits per operand: 1-digit (100 distinct problems) .. 4-digit.
    "addition_digits": TaskFamily(
        "addition_digits",
        {d: partial(addition, digits=d, operands=2) for d in (1, 2, 3, 4)},
        {d: f"{d}-digit + {d}-digit" for d in (1, 2, 3, 4)},
    ),
    # Band = number of 2-digit operands: A + B .. A + B + C + D.
    "addition_operands": TaskFamily(
        "addition_operands",
        {k: partial(addition, digits=2, operands=k) for k in (2, 3, 4)},
        {k: f"{k} two-digit operands" for k in (2, 3, 4)},
    ),
}


def task_generator(
    name: str, difficulty: int | None = None
) -> Callable[[random.Random], tuple[str, str]]:
    """The problem generator of a built-in task, or of one band of a task family."""
    if name in FAMILIES:
        family = FAMILIES[name]
        if difficulty not in family.bands:
            raise SelfImproveError(
                f"task family {name!r} has no difficulty {difficulty!r}",
                f"pass difficulty as one of {', '.join(map(str, sorted(family.bands)))}",
            )
        return family.bands[difficulty]
    if name not in TASKS:
        raise SelfImproveError(
            f"unknown task {name!r}",
            f"use one of {', '.join(sorted([*TASKS, *FAMILIES]))}, or load a dataset file",
        )
    if difficulty is not None:
        raise SelfImproveError(
            f"task {name!r} has no difficulty levels (got difficulty={difficulty})",
            f"drop the difficulty, or use a task family: {', '.join(sorted(FAMILIES))}",
        )
    return TASKS[name]


def task_size(name: str, difficulty: int | None = None) -> int | None:
    """How many distinct problems the built-in task `name` (or band `difficulty` of the
    task family `name`) can give; None when not known."""
    generator = task_generator(name, difficulty)
    if isinstance(generator, partial) and generator.func is addition:
        digits, operands = generator.keywords["digits"], generator.keywords["operands"]
        return (10 if digits == 1 else 9 * 10 ** (digits - 1)) ** operands
    return TASK_SIZES.get(name)


def draw_problems(
    generator: Callable[[random.Random], tuple[str, str]],
    n: int,
    rng: random.Random,
    exclude: set[object] = frozenset(),  # type: ignore[assignment]
) -> list[tuple[str, str]]:
    """Up to `n` distinct problems (by `problem_key`) not in `exclude`; fewer when the
    generator runs out within its draw budget (a 1-digit band has only 100 problems)."""
    problems: dict[object, tuple[str, str]] = {}
    for _ in range(DRAWS_PER_PROBLEM * n + MIN_DRAWS):
        if len(problems) >= n:
            break
        prompt, answer = generator(rng)
        key = problem_key(prompt, answer)
        if key not in exclude:
            problems.setdefault(key, (prompt, answer))
    return list(problems.values())


def make_task(
    name: str, n_train: int, n_eval: int, seed: int, difficulty: int | None = None
) -> pl.DataFrame:
    """`n_train` + `n_eval` distinct problems from the built-in task `name`, or from
    band `difficulty` of the task family `name` (`FAMILIES`).

    Eval problems are drawn first, so the held-out set depends only on (seed, n_eval):
    changing `n_train` never changes what the model is scored on.
    """
    generator = task_generator(name, difficulty)
    _check_count("n_train", n_train)
    _check_count("n_eval", n_eval)
    _check_task_size(name, difficulty, n_train, n_eval)
    rng = random.Random(seed)
    wanted, max_draws = n_train + n_eval, DRAWS_PER_PROBLEM * (n_train + n_eval) + MIN_DRAWS
    problems: dict[object, tuple[str, str]] = {}  # problem key -> (prompt, answer)
    for _ in range(max_draws):
        if len(problems) == wanted:
            break
        prompt, answer = generator(rng)
        problems.setdefault(problem_key(prompt, answer), (prompt, answer))
    if len(problems) < wanted:
        raise SelfImproveError(
            f"task {name!r} gave only {len(problems)} distinct problems in {max_draws} draws, "
            f"{wanted} were requested (n_train={n_train}, n_eval={n_eval})",
            "ask for fewer problems (smaller n_train / n_eval)",
        )
    drawn = [_simple(p, a) for p, a in problems.values()]
    eval_, train = drawn[:n_eval], drawn[n_eval:]
    return _problem_table(train, eval_, task=name)


def _check_task_size(name: str, difficulty: int | None, n_train: int, n_eval: int) -> None:
    """Asking for more problems than a task has fails at once (drawing until the draw
    budget runs out takes minutes for a count like 100,000,000)."""
    size = task_size(name, difficulty)
    if size is None or n_train + n_eval <= size:
        return
    band = "" if difficulty is None else f" (difficulty {difficulty})"
    fix = (
        f"lower n_train to at most {size - n_eval:,} with n_eval={n_eval:,}"
        if n_eval < size
        else f"lower n_eval below {size:,} and n_train with it"
    )
    raise SelfImproveError(
        f"task {name!r}{band} has {size:,} distinct problems; n_train={n_train:,} + "
        f"n_eval={n_eval:,} asks for {n_train + n_eval:,}",
        f"ask for fewer problems (smaller n_train / n_eval): {fix}; or load a dataset file "
        "(dataset_path) for more",
    )


# --- dataset files -----------------------------------------------------------------


def load_dataset_file(
    path: str | Path,
    n_train: int | None,
    n_eval: int | None,
    seed: int,
    eval_fraction: float = 0.5,
    *,
    task: str | None = None,
    verifier: str | None = None,
    drop_contaminated: bool = False,
    contamination_threshold: float = 0.9,
    dropped: list[dict] | None = None,
) -> pl.DataFrame:
    """A problem table from a user's `.jsonl` or `.parquet` file.

    Any record shape of `sources.datasets` (plain prompt + numeric answer, GSM8K,
    multiple choice, MATH, MBPP, HumanEval); `verifier` is the default verifier of rows
    without a `verifier` column. A `split` column (train / eval, or test / validation
    for eval) is used as is, in file order; without one the rows are shuffled with
    `seed` and `eval_fraction` of them become eval. Duplicate prompts are dropped (the
    first wins; a prompt in both splits stays in eval only), then the first `n_train` /
    `n_eval` of each split are kept (None keeps all). `task` names the rows (default:
    the file's stem).

    `drop_contaminated`: train rows that near-duplicate an eval row (the test of the
    `check_no_contamination_prompts` gate, at `contamination_threshold`) are dropped
    here instead of blocking the round; each is appended to `dropped` (when given) as
    {prompt, answer, eval_prompt, match ("exact"/"near"), similarity}, so the caller can
    record them (the prompts step writes them to `prompt_candidates`, drop reason
    `contaminated`).
    """
    path = Path(path)
    _check_optional_count("n_train", n_train)
    _check_optional_count("n_eval", n_eval)
    if path.is_dir():  # a folder of split files: train.jsonl + dev/test/validation.jsonl
        train_file, eval_file = _split_files(path)
        return load_split_files(
            train_file,
            eval_file,
            n_train,
            n_eval,
            seed,
            task=task or path.name,
            verifier=verifier,
            drop_contaminated=drop_contaminated,
            contamination_threshold=contamination_threshold,
            dropped=dropped,
        )
    if not 0.0 <= eval_fraction <= 1.0:
        raise SelfImproveError(
            f"eval_fraction={eval_fraction} is outside 0..1", "pass a fraction such as 0.5"
        )
    records = _read_records(path)
    rows = [parse_record(r, f"row {i} of {path}", verifier) for i, r in enumerate(records, start=1)]
    if "split" in _columns(records):
        train, eval_ = _split_by_column(path, records, rows)
    else:
        train, eval_ = _split_by_fraction(_dedupe(rows), seed, eval_fraction)
    return _finish(
        path,
        train,
        eval_,
        (n_train, n_eval),
        task or path.stem,
        (drop_contaminated, contamination_threshold, dropped),
        found=_held(rows),
    )


def load_split_files(
    train_path: str | Path,
    eval_path: str | Path,
    n_train: int | None,
    n_eval: int | None,
    seed: int,
    *,
    task: str,
    verifier: str | None = None,
    drop_contaminated: bool = False,
    contamination_threshold: float = 0.9,
    dropped: list[dict] | None = None,
) -> pl.DataFrame:
    """A problem table from a train file and an eval file (CommonsenseQA, MBPP): each
    is shuffled with `seed`, then the first `n_train` / `n_eval` are kept."""
    parts = []
    for path in (Path(train_path), Path(eval_path)):
        records = _read_records(path)
        rows = [parse_record(r, f"row {i} of {path}", verifier) for i, r in enumerate(records, 1)]
        random.Random(seed).shuffle(rows)
        parts.append(rows)
    return _finish(
        Path(eval_path),
        parts[0],
        parts[1],
        (n_train, n_eval),
        task,
        (drop_contaminated, contamination_threshold, dropped),
    )


# --- helpers -------------------------------------------------------------------------


def _finish(path, train, eval_, counts, task, contamination, found: str = ""):
    """Dedupe, keep eval out of train, take the counts, drop contaminated train rows.
    `found`: what the file held (rows, distinct prompts), for the message of a count
    that is too high."""
    (n_train, n_eval), (drop_contaminated, threshold, dropped_out) = counts, contamination
    train, eval_ = _dedupe(train), _dedupe(eval_)
    eval_keys = {normalize_prompt(r["prompt"]) for r in eval_}
    train = [r for r in train if normalize_prompt(r["prompt"]) not in eval_keys]
    eval_ = _take(path, "n_eval", "eval", eval_, n_eval, found)
    if drop_contaminated:
        from selfimprove_dagster.quality.gates import contamination_matches

        matches = contamination_matches(
            [r["prompt"] for r in train], [r["prompt"] for r in eval_], threshold
        )
        if dropped_out is not None:
            answers = {r["prompt"]: r.get("answer") for r in train}
            dropped_out.extend(
                {
                    "prompt": text,
                    "answer": answers.get(text),
                    "eval_prompt": e,
                    "match": kind,
                    "similarity": round(ratio, 3),
                }
                for text, (e, kind, ratio) in matches.items()
            )
        train = [r for r in train if r["prompt"] not in matches]
    train = _take(path, "n_train", "train", train, n_train, found)
    return _problem_table(train, eval_, task=task)


def problem_key(prompt: str, answer: str) -> object:
    """Two generated problems are the same problem when they have the same numbers in
    the same order and the same answer: "Sam has 23 apples and buys 29 more" and "Mia
    has 23 cards and buys 29 more" differ only in names, so they must not land in
    both train and eval (the contamination gate would rightly flag them)."""
    numbers = tuple(re.findall(r"\d+", prompt))
    return (numbers, answer) if numbers else normalize_prompt(prompt)


def _simple(prompt: str, answer: str) -> dict:
    return {"prompt": prompt, "answer": answer, "verifier": "numeric"}


def _problem_table(train: list[dict], eval_: list[dict], task: str) -> pl.DataFrame:
    rows = [{**r, "split": "train"} for r in train] + [{**r, "split": "eval"} for r in eval_]
    return pl.DataFrame(
        {
            "prompt_id": [prompt_id(r["prompt"]) for r in rows],
            "prompt": [r["prompt"] for r in rows],
            "answer": [r["answer"] for r in rows],
            "split": [r["split"] for r in rows],
            "task": [task] * len(rows),
            **{c: [r.get(c) for r in rows] for c in VERIFIER_COLUMNS},
        },
        schema=PROBLEM_SCHEMA,
    )


# File names of a dataset folder's splits, in order of preference.
TRAIN_FILES = ("train.jsonl", "train.parquet")
EVAL_FILES = ("dev.jsonl", "test.jsonl", "validation.jsonl", "eval.jsonl", "test.parquet")


def _split_files(folder: Path) -> tuple[Path, Path]:
    train = next((folder / n for n in TRAIN_FILES if (folder / n).is_file()), None)
    eval_ = next((folder / n for n in EVAL_FILES if (folder / n).is_file()), None)
    if train is None or eval_ is None:
        raise SelfImproveError(
            f"dataset folder {folder} needs a train file ({', '.join(TRAIN_FILES)}) and an "
            f"eval file ({', '.join(EVAL_FILES)})",
            "point dataset_path at one file, or add the missing split file",
        )
    return train, eval_


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SelfImproveError(f"{name}={value!r} is not a count", f"pass {name} as an int >= 0")


def _check_optional_count(name: str, value: int | None) -> None:
    if value is not None:
        _check_count(name, value)


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise SelfImproveError(
            f"dataset file {path} does not exist",
            "check the path (relative paths resolve from the working directory)",
        )
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise SelfImproveError(
            f"dataset file {path} has unsupported extension {suffix or '(none)'!r}",
            f"save it as {' or '.join(SUPPORTED_SUFFIXES)}",
        )
    records = _read_jsonl(path) if suffix == ".jsonl" else _read_parquet(path)
    if not records:
        raise SelfImproveError(
            f"dataset file {path} is empty", "add rows with a prompt and a numeric answer"
        )
    return records


def _read_parquet(path: Path) -> list[dict]:
    try:
        return pl.read_parquet(path).to_dicts()
    except (pl.exceptions.PolarsError, OSError) as err:
        raise SelfImproveError(
            f"dataset file {path} is not a readable Parquet file ({str(err).splitlines()[0]})",
            "write it again (e.g. with polars' write_parquet), or give a .jsonl file",
        ) from err


def _read_jsonl(path: Path) -> list[dict]:
    # Read line by line rather than with polars: answers may mix numbers and strings,
    # and a broken line should be reported by its line number.
    records = []
    with path.open(encoding="utf-8") as f:
        try:
            lines = list(enumerate(f, start=1))
        except UnicodeDecodeError as err:
            raise SelfImproveError(
                f"dataset file {path} is not UTF-8 text (byte {err.start}: {err.reason})",
                "convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`)",
            ) from err
        for line_number, line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SelfImproveError(
                    f"line {line_number} of {path} is not valid JSON ({err.msg})",
                    "write one JSON object per line",
                ) from err
            if not isinstance(record, dict):
                raise SelfImproveError(
                    f"line {line_number} of {path} is not a JSON object",
                    'write one object per line, e.g. {"prompt": "...", "answer": 42}',
                )
            records.append(record)
    return records


def _columns(records: Iterable[dict]) -> set[str]:
    return {key for record in records for key in record}


def _split_by_column(
    path: Path, records: list[dict], rows: list[dict]
) -> tuple[list[dict], list[dict]]:
    train, eval_ = [], []
    for row, (record, problem) in enumerate(zip(records, rows, strict=True), start=1):
        label = str(record.get("split", "")).strip().lower()
        if label not in SPLIT_ALIASES:
            raise SelfImproveError(
                f"row {row} of {path} has split {record.get('split')!r}",
                f"use one of {', '.join(SPLIT_ALIASES)} (or drop the `split` column)",
            )
        (train if SPLIT_ALIASES[label] == "train" else eval_).append(problem)
    return train, eval_


def _split_by_fraction(
    rows: list[dict], seed: int, eval_fraction: float
) -> tuple[list[dict], list[dict]]:
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    n_eval = round(len(shuffled) * eval_fraction)
    return shuffled[n_eval:], shuffled[:n_eval]


def _dedupe(rows: list[dict]) -> list[dict]:
    seen: dict[str, dict] = {}
    for row in rows:
        seen.setdefault(normalize_prompt(row["prompt"]), row)
    return list(seen.values())


def _held(rows: list[dict]) -> str:
    distinct = len(_dedupe(rows))
    return f"{len(rows)} rows, {distinct} distinct prompt{'' if distinct == 1 else 's'}"


def _take(
    path: Path, knob: str, split: str, rows: list[dict], n: int | None, found: str = ""
) -> list[dict]:
    if n is None:
        return rows
    held = f" ({found})" if found else ""
    if n > len(rows) and not rows:
        # "lower n_eval to at most 0" would leave a round with nothing to score or train on.
        raise SelfImproveError(
            f"{knob}={n} but {path} leaves no distinct {split} problems{held}: a row whose "
            "prompt repeats an earlier one is dropped, and a prompt in both splits stays in "
            "eval only",
            f"add rows with prompts of their own (the {split} split needs at least one), or "
            "give the file a `split` column",
        )
    if n > len(rows):
        raise SelfImproveError(
            f"{knob}={n} but {path} has only {len(rows)} distinct {split} problems{held}",
            f"lower {knob} to at most {len(rows)}, or pass None to use them all",
        )
    return rows[:n]
