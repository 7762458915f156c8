"""Where a round's prompts come from.

Built-in task families and user datasets (`tasks`), the weighted mix of sources that
builds a round's `prompts` table (`mix`), the adaptive curriculum (`curriculum`) and
Self-Instruct synthesis with its ROUGE-L dedup (`synthesis`, `rouge`).

Promise: every train/eval prompt row carries a stable `prompt_id`, its `split`, its
`source`, and an `answer` (verified or marked `answer_verified=false`); the held-out
set depends on the seed alone, so it is the same every round.
"""
