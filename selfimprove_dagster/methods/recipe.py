"""Which self-improvement recipe a round runs: one `method` setting, the same assets.

    star                          verifier (ground truth) critic, SFT      (STaR / ReST-EM)
    self_consistency              majority-vote pseudo-labels, SFT         (LMSI, no labels)
    self_judge                    the policy judges itself, DPO pairs      (Self-Rewarding)
    self_refine                   = star+self_refine                       (Re-ReST / SELF)
    star+self_refine              rejected answers refined from feedback, refined
    self_consistency+self_refine    answers that pass join the SFT set (source=refined)
    self_verify                   the policy's own likelihood picks one sample, SFT
                                  (SFT-sharpening, no labels)
    grpo, rloo                    online RL (TRL) in `checkpoint`, reward = the verifier;
                                  rollouts -> table `rollouts` (see methods/grpo.py)

Every recipe fills `critiques` (one row per generation, plus one per refined answer,
each naming its critic and giving a score and critique text) and `filtered` (SFT rows,
or DPO pairs: chosen in `completion`, loser in `rejected_completion`). The assets in
`assets/rounds.py` call `critique_round`, `select_training_set`, `training_examples`
and `method_metrics`; the critics live in `star`, `consistency`, `judge`, `refine`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from selfimprove_dagster.engines.base import GenerationEngine, Sampling
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.ids import content_hash
from selfimprove_dagster.methods import consistency, grpo, judge, refine, self_verify, star
from selfimprove_dagster.progress import LogFn
from selfimprove_dagster.store.schemas import METRIC_COLUMNS

CRITICS = ("star", "self_consistency", "self_judge", "self_verify")
ONLINE = grpo.ALGORITHMS  # online RL: the critic is the verifier, the trainer samples
REFINE = "self_refine"
METHODS = (*CRITICS, *ONLINE, REFINE, "star+self_refine", "self_consistency+self_refine")


@dataclass(frozen=True)
class Recipe:
    critic: str  # star | self_consistency | self_judge | self_verify | grpo | rloo
    refine: bool = False  # Self-Refine on top: rejected answers get feedback and a retry

    @property
    def online(self) -> bool:
        """Online RL (grpo, rloo): `checkpoint` samples and trains; rollouts are data."""
        return self.critic in ONLINE

    @property
    def objective(self) -> str:
        """The training objective: preference pairs train with DPO, RL methods with
        their own trainer (grpo / rloo), the rest with SFT."""
        if self.online:
            return self.critic
        return "dpo" if self.critic == "self_judge" else "sft"

    @property
    def name(self) -> str:
        return f"{self.critic}+{REFINE}" if self.refine else self.critic


def parse_method(text: str) -> Recipe:
    """`star`, `self_consistency`, `self_judge`, `self_refine` or `<critic>+self_refine`."""
    parts = [p.strip() for p in text.strip().lower().split("+") if p.strip()]
    refine_on = REFINE in parts
    critics = [p for p in parts if p != REFINE]
    unknown = [p for p in critics if p not in (*CRITICS, *ONLINE)]
    if unknown or len(critics) > 1 or not parts:
        raise SelfImproveError(
            f"Unknown method `{text}`",
            f"use one of: {', '.join(METHODS)} (SELFIMPROVE_METHOD)",
        )
    recipe = Recipe(critics[0] if critics else "star", refine_on)
    if recipe.refine and recipe.critic not in ("star", "self_consistency"):
        raise SelfImproveError(
            f"self_refine does not compose with {recipe.critic} (only with a critic whose "
            "verdict a refined answer can pass)",
            "use star+self_refine or self_consistency+self_refine",
        )
    return recipe


@dataclass(frozen=True)
class MethodSettings:
    """The knobs of the critics (defaults: resources.MethodResource)."""

    vote_threshold: float = 0.5  # self-consistency: least share of samples on the majority
    judge_accept_points: float = 4.0  # self-judge: rubric points (0..5) that count as accept
    judge_margin: float = 0.2  # self-judge: least score gap (0..1) of a preference pair
    judge_samples: int = 3  # self-judge: sampled judgements averaged per answer
    judge_temperature: float = 0.7  # self-judge: sampling temperature of the judge
    judge_max_new_tokens: int = 8  # self-judge: budget of the judge's reply (a score)
    refine_feedback: str = "critic"  # self-refine: "critic" (Re-ReST) or "self" (SELF)
    refine_max: int = 200  # self-refine: rejected samples refined per round
    refine_probe: int = 50  # self-refine: accepted samples refined to count breakage
    critique_max_new_tokens: int = 48  # self-refine with self feedback: critique budget
    rl_prompt_filter: str = "signal_first"  # grpo/rloo: which train prompts (grpo.py)
    rl_prompts: int = 32  # grpo/rloo: prompts trained on (= steps x prompts per step)
    seed: int = 0  # grpo/rloo: order of the prompts trained on
    rationalize: bool = False  # star: STaR rationalization of unsolved prompts (rationalize.py)
    rationalize_samples: int = 2  # star: hinted samples per unsolved prompt
    rationalize_max: int = 200  # star: unsolved prompts rationalized per round


@dataclass
class RoundCritiques:
    critiques: pl.DataFrame  # one row per generation (+ one per refined answer)
    refinements: pl.DataFrame | None  # the refined answers, with their feedback


def critique_round(
    recipe: Recipe,
    generations: pl.DataFrame,
    prompts: pl.DataFrame,
    load_policy: Callable[[], GenerationEngine],
    sampling: Sampling,
    settings: MethodSettings,
    log: LogFn | None = None,
    answer_format: str = "short",
) -> RoundCritiques:
    """Run the recipe's critic over the round's generations, then Self-Refine if on,
    then STaR rationalization if on (star only: `settings.rationalize`).

    `load_policy` builds the round's policy engine; it is called only when the recipe
    needs the model (judge, refinement), and the engine is closed afterwards.
    `answer_format` is the round's prompt format: with `rationale` the verifier rejects
    a sample cut off at the token limit before a final answer (`star.critique_generations`).
    """
    rationalizing = settings.rationalize and recipe.critic == "star"
    needs_model = recipe.critic in ("self_judge", "self_verify") or recipe.refine or rationalizing
    engine = load_policy() if needs_model else None
    try:
        critiques = _first_critique(
            recipe, generations, prompts, engine, sampling, settings, log, answer_format
        )

        def finish(done: RoundCritiques) -> RoundCritiques:
            if not rationalizing:
                return done
            return _with_rationalization(
                done, engine, generations, prompts, sampling, settings, log, answer_format
            )

        if not recipe.refine:
            return finish(RoundCritiques(critiques, None))
        selected = refine.select_for_refinement(
            generations, critiques, settings.refine_max, settings.refine_probe
        )
        if log:
            log(f"self-refine: {selected.height} samples ({settings.refine_feedback} feedback)")
        refinements = refine.refine_samples(
            engine,
            selected,
            _feedback_mode(settings.refine_feedback),
            sampling,
            settings.critique_max_new_tokens,
            log=log,
        )
        refined = refine.critique_refinements(
            refinements, _labels(recipe, critiques, prompts), _references(prompts), prompts
        )
        return finish(
            RoundCritiques(pl.concat([critiques, refined], how="diagonal_relaxed"), refinements)
        )
    finally:
        if engine is not None:
            engine.close()


def _with_rationalization(
    done: RoundCritiques, engine, generations, prompts, sampling, settings, log, answer_format
) -> RoundCritiques:
    """STaR rationalization after the verifier: hinted rationales for unsolved train
    prompts, their critiques appended, the accepted ones trainable (`refinements` rows
    with source=rationalized; see methods/rationalize.py)."""
    from selfimprove_dagster.methods import rationalize

    round_ = generations["round"][0] if generations.height else ""
    unsolved = rationalize.unsolved_prompts(prompts, done.critiques, settings.rationalize_max)
    rationales, critiques = rationalize.rationalize(
        engine,
        unsolved,
        round_,
        sampling,
        settings.rationalize_samples,
        log=log,
        reject_cut_off=answer_format == "rationale",
    )
    all_critiques = pl.concat([done.critiques, critiques], how="diagonal_relaxed")
    side = [f for f in (done.refinements, rationales) if f is not None]
    return RoundCritiques(all_critiques, pl.concat(side, how="diagonal_relaxed"))


def _first_critique(recipe, generations, prompts, engine, sampling, settings, log, answer_format):
    if recipe.critic == "star" or recipe.online:  # RL: the verifier is the reward
        return star.critique_generations(generations, prompts, answer_format)
    if recipe.critic == "self_verify":
        return self_verify.critique_by_likelihood(engine, generations, prompts, log=log)
    if recipe.critic == "self_consistency":
        return consistency.critique_by_majority(generations, prompts, settings.vote_threshold)
    judge_sampling = Sampling(
        temperature=settings.judge_temperature,
        top_k=sampling.top_k,
        max_new_tokens=settings.judge_max_new_tokens,
        seed=sampling.seed,
    )
    return judge.critique_by_judge(
        engine,
        generations,
        prompts,
        judge_sampling,
        settings.judge_samples,
        settings.judge_accept_points,
        log=log,
    )


def _feedback_mode(value: str) -> refine.Feedback:
    if value not in ("critic", "self"):
        raise SelfImproveError(
            f"Unknown refine feedback `{value}`",
            "use `critic` (the critic's message, Re-ReST) or `self` (the policy's own "
            "critique, SELF) in SELFIMPROVE_REFINE_FEEDBACK",
        )
    return value  # type: ignore[return-value]


def _references(prompts: pl.DataFrame) -> dict[str, object]:
    return dict(zip(prompts["prompt_id"], prompts["answer"], strict=True))


def _labels(recipe: Recipe, critiques: pl.DataFrame, prompts: pl.DataFrame) -> dict:
    """What a refined answer must state to pass: the reference (star) or the pseudo-label
    (self-consistency: ground truth stays hidden from selection)."""
    if recipe.critic == "self_consistency":
        return dict(critiques.select("prompt_id", "pseudo_label").unique("prompt_id").iter_rows())
    return _references(prompts)


def select_training_set(
    recipe: Recipe,
    generations: pl.DataFrame,
    critiques: pl.DataFrame,
    refinements: pl.DataFrame | None,
    max_per_prompt: int,
    settings: MethodSettings,
) -> pl.DataFrame:
    """The round's `filtered` table: accepted answers (SFT) or preference pairs (DPO)."""
    if recipe.objective == "dpo":
        return judge.preference_pairs(generations, critiques, settings.judge_margin)
    if recipe.online:
        return grpo.select_rl_prompts(
            generations, critiques, settings.rl_prompts, settings.rl_prompt_filter, settings.seed
        )
    return star.filter_accepted(generations, critiques, max_per_prompt, refinements)


def select_round_training_set(
    recipe: Recipe,
    store,
    round_: str,
    max_per_prompt: int,
    settings: MethodSettings,
    use_refinements: bool = False,
) -> pl.DataFrame:
    """`select_training_set` over the round's tables in `store` (`refinements` only
    when the round refines or rationalizes and wrote them)."""
    refinements = (
        store.read(round_, "refinements")
        if use_refinements and store.has(round_, "refinements")
        else None
    )
    return select_training_set(
        recipe,
        store.read(round_, "generations"),
        store.read(round_, "critiques"),
        refinements,
        max_per_prompt,
        settings,
    )


def selection_figures(filtered: pl.DataFrame, generations: pl.DataFrame) -> dict:
    """What the `filtered` step reports: kept fraction, prompt coverage, rows written
    by a refiner or from a hint, and the training set's content hash."""
    n_prompts = generations["prompt_id"].n_unique()
    covered = filtered["prompt_id"].n_unique()
    return {
        "kept_fraction": filtered.height / max(generations.height, 1),
        "prompts_covered": covered,
        "prompt_coverage": covered / max(n_prompts, 1),
        "refined_rows": int((filtered["source"] == "refined").sum()),
        "rationalized_rows": int((filtered["source"] == "rationalized").sum()),
        "content_hash": filtered_content_hash(filtered),
    }


def training_examples(
    recipe: Recipe, filtered: pl.DataFrame, prompts: pl.DataFrame | None = None
) -> list[dict[str, str]]:
    """Rows for `training.train_lora(recipe.objective, ...)`; online RL also takes each
    prompt's verifier columns from `prompts` (its reward judges every task type)."""
    if recipe.objective == "dpo":
        return filtered.select(
            "prompt", chosen=pl.col("completion"), rejected=pl.col("rejected_completion")
        ).to_dicts()
    if recipe.online:
        return grpo.training_examples(filtered, prompts)
    return star.training_examples(filtered)


def filtered_content_hash(filtered: pl.DataFrame) -> str:
    """What the checkpoint was trained on (a DPO pair's loser counts too; an RL round
    trains on prompts and their reference answers)."""
    if "reward_mean" in filtered.columns:  # grpo.select_rl_prompts
        return content_hash(filtered.select("prompt_id", "prompt", "answer").to_dicts())
    if "rejected_completion" not in filtered.columns:
        return star.filtered_content_hash(filtered)
    columns = ["generation_id", "prompt", "completion", "rejected_completion"]
    return content_hash(filtered.select(columns).to_dicts())


def check_round_prompts(recipe: Recipe, prompts: pl.DataFrame) -> None:
    """Refuse, before anything is sampled, a round whose task types the recipe cannot
    handle (self_consistency needs answers that can be voted on: not code)."""
    if recipe.critic == "self_consistency":
        consistency.check_votable(star.train_prompts(prompts))


def method_metrics(
    recipe: Recipe, critiques: pl.DataFrame, filtered: pl.DataFrame | None = None
) -> dict:
    """The recipe's own health figures (ground truth only measures, never selects);
    pair figures need the round's `filtered` pairs. Every round stores all of
    `schemas.METRIC_COLUMNS`, None where they do not apply."""
    metrics: dict[str, object] = dict.fromkeys(METRIC_COLUMNS)
    if recipe.critic == "self_consistency":
        metrics |= consistency.pseudo_label_quality(critiques)
    if recipe.critic == "self_judge":
        metrics |= judge.judge_quality(critiques, filtered)
    if recipe.critic == "self_verify":
        metrics |= self_verify.pick_quality(critiques)
    if recipe.refine:
        metrics |= refine.refinement_stats(critiques)
    return {"method": recipe.name, **metrics}
