"""How many sequences go into one forward pass: the arithmetic every trainer shares.

Peak training memory grows with sequences per forward pass x their length x the
vocabulary: the logits and their gradient dominate (SmolLM2's vocabulary is 49,152
tokens, so 16 sequences of 400 tokens hold 1.3 GB per copy of the logits; a GSM8K
rationale round with batch 16 was OOM-killed at 12 GB RSS). A batch of long sequences
is split into micro-batches accumulated into the same optimizer step, so the update
(`batch_size` examples) and the step count stay what they were.

    micro_batch_size(16, longest_example_tokens("sft", rows, tok), MICRO_BATCH_TOKENS)
"""

from __future__ import annotations

# Tokens per forward pass (SFT, DPO, GRPO, RLOO) by default: see `micro_batch_size`.
MICRO_BATCH_TOKENS = 2048
# Tokens the chat template adds to a prompt (role markers), counted into its length.
TEMPLATE_OVERHEAD_TOKENS = 16


def micro_batch_size(batch_size: int, longest_tokens: int, token_budget: int) -> int:
    """Sequences per forward pass: the largest divisor of `batch_size` whose micro-batch
    of `longest_tokens`-token sequences fits in `token_budget` tokens (at least 1). A
    divisor, so gradient accumulation adds up to exactly `batch_size` examples."""
    fits = max(1, token_budget // max(1, longest_tokens))
    return max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= fits)


def longest_example_tokens(objective: str, examples: list[dict[str, str]], tokenizer) -> int:
    """Tokens in the longest training sequence (the chat template's few extra tokens
    included). DPO runs chosen and rejected in one forward pass: both count."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    if objective == "dpo":
        lengths = [
            2 * count(e["prompt"]) + count(e["chosen"]) + count(e["rejected"]) for e in examples
        ]
    else:
        lengths = [count(e["prompt"]) + count(e["completion"]) for e in examples]
    return max(lengths, default=0) + TEMPLATE_OVERHEAD_TOKENS


def longest_rl_tokens(examples: list[dict], max_completion_length: int, tokenizer) -> int:
    """Tokens in the longest RL sequence: the longest prompt plus a full completion."""
    longest_prompt = max(
        (len(tokenizer(e["prompt"], add_special_tokens=False).input_ids) for e in examples),
        default=0,
    )
    return longest_prompt + max_completion_length + TEMPLATE_OVERHEAD_TOKENS
