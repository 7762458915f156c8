"""The six steps of a self-improvement round (one partition per round), one module per
stage, each body a call to the core function named beside it:

    prompts      assets/generate.py  -> sources.mix.round_prompts
    generations  assets/generate.py  -> methods.star.sample_generations
    critiques    assets/critique.py  -> methods.recipe.critique_round
    filtered     assets/critique.py  -> methods.recipe.select_round_training_set
    checkpoint   assets/train.py     -> methods.checkpoint.train_round
    eval_scores  assets/evaluate.py  -> evaluation.score_round

Round N's policy is round N−1's checkpoint, or the best one so far with `policy=best`
(`evolution.round_policy`); `critiques`, `checkpoint` and `eval_scores` read it back
from the round's `generations` (`RoundStore.generation_policy`), so they always agree.
"""

from assets.critique import critiques, filtered
from assets.evaluate import eval_scores
from assets.generate import generations, prompts
from assets.train import checkpoint

ROUND_ASSETS = [prompts, generations, critiques, filtered, checkpoint, eval_scores]
