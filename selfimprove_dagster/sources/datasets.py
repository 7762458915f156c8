"""Named loaders for the shared public datasets (each folder with its LICENSE and
SOURCE.md): their files -> a problem table (`sources.tasks.load_dataset_file` /
`load_split_files`, which parse each record with `sources.records`).

    load_gsm8k(SHARED / "gsm8k/test.jsonl")
    load_commonsenseqa(SHARED / "commonsenseqa", n_train=200, n_eval=100)
    load_math500(SHARED / "math500/test.jsonl", n_train=100, n_eval=100)
    load_mbpp(SHARED / "mbpp", n_train=100, n_eval=100)
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from selfimprove_dagster.sources.tasks import load_dataset_file, load_split_files


def load_gsm8k(
    path: str | Path, n_train: int | None = None, n_eval: int | None = None, seed: int = 0
) -> pl.DataFrame:
    """GSM8K's `train.jsonl` / `test.jsonl`: test rows become eval, any other file train."""
    path = Path(path)
    eval_fraction = 1.0 if path.stem.lower() == "test" else 0.0
    return load_dataset_file(path, n_train, n_eval, seed, eval_fraction, task="gsm8k")


def load_commonsenseqa(
    folder: str | Path, n_train: int | None = None, n_eval: int | None = None, seed: int = 0
):
    """CommonsenseQA (`train.jsonl` -> train, `dev.jsonl` -> eval), multiple choice."""
    return _load_split_files(
        Path(folder), "train.jsonl", "dev.jsonl", n_train, n_eval, seed, "commonsenseqa"
    )


def load_math500(
    path: str | Path, n_train: int | None = None, n_eval: int | None = None, seed: int = 0
):
    """MATH-500 (one file, 500 problems): shuffled with `seed`, half train, half eval
    (at most 250 each); math verifier on the LaTeX `answer`."""
    return load_dataset_file(Path(path), n_train, n_eval, seed, eval_fraction=0.5, task="math500")


def load_mbpp(
    folder: str | Path, n_train: int | None = None, n_eval: int | None = None, seed: int = 0
):
    """MBPP (`train.jsonl` task_ids 511-974 -> train, `test.jsonl` 11-510 -> eval), code."""
    return _load_split_files(
        Path(folder), "train.jsonl", "test.jsonl", n_train, n_eval, seed, "mbpp"
    )


def _load_split_files(folder, train_name, eval_name, n_train, n_eval, seed, task):
    return load_split_files(
        folder / train_name, folder / eval_name, n_train, n_eval, seed, task=task
    )
