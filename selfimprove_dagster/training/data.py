"""Training rows -> the `datasets.Dataset`s TRL's SFT and DPO trainers read
(conversational rows: TRL applies the chat template and, for prompt-completion rows,
computes the loss on the completion tokens only)."""

from __future__ import annotations


def sft_dataset(examples: list[dict[str, str]]):
    """Conversational prompt-completion rows -> a `datasets.Dataset`."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # tokenizing a few hundred rows takes < 1 s; keep the log clean

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": e["prompt"]}],
                "completion": [{"role": "assistant", "content": e["completion"]}],
            }
            for e in examples
        ]
    )


def dpo_dataset(pairs: list[dict[str, str]]):
    """Conversational preference rows (prompt, chosen, rejected) -> a `datasets.Dataset`."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": p["prompt"]}],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}],
            }
            for p in pairs
        ]
    )
