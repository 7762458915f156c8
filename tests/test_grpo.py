"""Online RL rounds (method=grpo / rloo): prompt selection, the reward, rollouts and
per-step health as rows, the RL WARN monitors, real GRPO on the tiny model (2 steps),
and one grpo round through Dagster with every gate."""

from __future__ import annotations

import os

import dagster as dg
import duckdb
import polars as pl
import pytest

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.methods import grpo
from selfimprove_dagster.methods.recipe import parse_method
from selfimprove_dagster.quality import monitors
from selfimprove_dagster.quality.rl_health import health_summary
from selfimprove_dagster.store.schemas import ROLLOUTS_TABLE
from selfimprove_dagster.training import TrainParams, train_lora
from selfimprove_dagster.training.params import RLParams
from selfimprove_dagster.training.rl import rl_config_args, rl_dataset, rl_micro_batch
from selfimprove_dagster.verifiers.reward import format_reward, make_verifier_reward

TINY_RL = RLParams(steps=2, prompts_per_step=2, num_generations=2, max_completion_length=4)


# --- pure functions ------------------------------------------------------------------


def _exploration(rewards: dict[str, list[int]]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """generations + critiques frames with the given per-prompt verdicts (1 = accept)."""
    gens, crits = [], []
    for pid, verdicts in rewards.items():
        for i, ok in enumerate(verdicts):
            gid = f"{pid}-{i}"
            gens.append(
                {
                    "round": "round_000",
                    "generation_id": gid,
                    "prompt_id": pid,
                    "sample_index": i,
                    "prompt": f"prompt {pid}",
                    "completion": f"answer {i}",
                }
            )
            crits.append(
                {
                    "generation_id": gid,
                    "verdict": "accept" if ok else "reject",
                    "reference_answer": "7",
                }
            )
    return pl.DataFrame(gens), pl.DataFrame(crits)


def test_select_rl_prompts_puts_prompts_with_signal_first():
    generations, critiques = _exploration(
        {
            "mixed": [0, 1, 0, 1],  # reward variance: GRPO learns here
            "never": [0, 0, 0, 0],  # no signal under the start policy
            "always": [1, 1, 1, 1],  # no signal either, and nothing to learn
        }
    )
    picked = grpo.select_rl_prompts(generations, critiques, 2, "signal_first", seed=0)
    assert picked["prompt_id"].to_list() == ["mixed", "never"]
    mixed = picked.row(0, named=True)
    assert mixed["source"] == grpo.SOURCE
    assert mixed["reward_mean"] == 0.5 and mixed["reward_std"] == 0.5 and mixed["has_signal"]
    # The row's generation is the prompt's best sample (lineage), never an SFT target.
    assert mixed["generation_id"] == "mixed-1" and mixed["answer"] == "7"
    assert picked.row(1, named=True)["selected_reason"] == "never_solved"


def test_select_rl_prompts_rejects_an_unknown_filter():
    generations, critiques = _exploration({"p": [0, 1]})
    with pytest.raises(SelfImproveError, match="Unknown RL prompt filter"):
        grpo.select_rl_prompts(generations, critiques, 1, "hardest", seed=0)


def test_verifier_reward_scores_with_the_verifier_and_logs_the_verdicts():
    logged: dict[str, list] = {}
    reward = make_verifier_reward()
    completions = [
        [{"role": "assistant", "content": "42"}],
        [{"role": "assistant", "content": "41"}],
        [{"role": "assistant", "content": "no idea"}],
    ]
    scores = reward(
        prompts=[None] * 3,
        completions=completions,
        answer=["42", "42", "42"],
        prompt_id=["a", "a", "a"],
        completion_ids=[[1], [1, 2], [1, 2, 3]],
        trainer_state=None,
        log_extra=lambda column, values: logged.__setitem__(column, values),
    )
    assert scores == [1.0, 0.0, 0.0]
    assert logged["reason"] == ["correct", "wrong_answer", "no_answer"]
    assert logged["extracted_answer"] == ["42", "41", None]
    assert logged["completion_tokens"] == [1, 2, 3]


def test_a_rationale_rollout_cut_off_at_the_limit_earns_no_last_number_reward():
    """With `cut_off_at` (rationale rounds) a rollout of the full token budget is judged
    without the last-number fallback; one that wrote its final answer line still earns."""
    unfinished = "Step 1: 40 + 2 is 42, then"  # the right number, mid-reasoning
    finished = "40 + 2 = 42.\nAnswer: 42"
    kwargs = {"prompts": [None] * 3, "answer": ["42"] * 3, "prompt_id": ["a"] * 3}
    completions = [unfinished, finished, unfinished]
    ids = [[0] * 8, [0] * 8, [0] * 5]  # budget 8: the first two hit it

    assert make_verifier_reward()(completions=completions, completion_ids=ids, **kwargs) == [
        1.0,
        1.0,
        1.0,
    ]
    logged: dict[str, list] = {}
    cut = make_verifier_reward(cut_off_at=8)(
        completions=completions,
        completion_ids=ids,
        log_extra=lambda column, values: logged.__setitem__(column, values),
        **kwargs,
    )
    assert cut == [0.0, 1.0, 1.0]
    assert logged["reason"] == ["cut_off", "correct", "correct"]


def test_the_trainer_resource_rejects_cut_off_rollouts_only_in_rationale_rounds():
    from selfimprove_dagster.resources import TrainerResource

    trainer = TrainerResource()
    assert trainer.rl_params("rationale").reject_cut_off
    assert not trainer.rl_params("short").reject_cut_off
    assert trainer.params("grpo", "rationale").rl.reject_cut_off


def test_the_reward_judges_a_multiple_choice_round_by_its_prompts_verifier():
    # The trainer's rows carry each prompt's verifier columns, so a CommonsenseQA-style
    # round is rewarded by the multiple-choice verifier, not read as numbers.
    filtered = pl.DataFrame({"prompt": ["Q?"], "answer": ["B"], "prompt_id": ["p"]})
    prompts = pl.DataFrame(
        {
            "prompt_id": ["p"],
            "verifier": ["multiple_choice"],
            "choices": ['{"A": "a cat", "B": "a dog"}'],
        }
    )
    rows = grpo.training_examples(filtered, prompts)
    assert rows == [{"prompt": "Q?", "answer": "B", "prompt_id": "p", **prompts.row(0, named=True)}]
    # What TRL hands the reward: every dataset column but the prompt, one value per rollout.
    example = rl_dataset(rows)[0]
    columns = {k: [v] * 2 for k, v in example.items() if k != "prompt"}
    assert columns["verifier"] == ["multiple_choice"] * 2
    scores = make_verifier_reward()(
        prompts=["Q?"] * 2, completions=["The answer is (B).", "A"], **columns
    )
    assert scores == [1.0, 0.0]


def test_format_reward_wants_just_a_number():
    assert format_reward(["57", "The answer is 57", " 57.\n"]) == [1.0, 0.0, 1.0]


def test_rl_config_needs_a_batch_that_divides_by_the_group():
    bad = RLParams(prompts_per_step=3, num_generations=2)
    assert bad.batch_size == 6  # fine: 3 prompts x 2 completions
    args = rl_config_args("grpo", bad, {"bf16": False, "max_length": 512})
    assert args["per_device_train_batch_size"] == 6 and "max_length" not in args
    assert args["gradient_accumulation_steps"] == 1  # one batch per step: all rollouts seen
    odd = RLParams(prompts_per_step=2, num_generations=4, extra={"num_generations": 3})
    assert rl_config_args("rloo", odd, {})["num_generations"] == 3  # extra wins
    assert "loss_type" not in rl_config_args("rloo", odd, {})


def test_rl_micro_batches_split_the_forward_pass_not_the_step():
    rl = RLParams(prompts_per_step=8, num_generations=4)  # 32 rollouts per step
    args = rl_config_args("grpo", rl, {}, micro_batch=8)
    assert args["per_device_train_batch_size"] == 8
    assert args["gradient_accumulation_steps"] == 4  # TRL: one generation batch per step
    with pytest.raises(SelfImproveError, match="does not divide"):
        rl_config_args("grpo", rl, {}, micro_batch=5)


class _WordTokenizer:
    """One token per word: enough for counting prompt lengths."""

    def __call__(self, text, add_special_tokens=False):
        return type("Encoded", (), {"input_ids": text.split()})()


def test_rl_micro_batch_fits_the_longest_prompt_and_completion_in_the_budget():
    rl = RLParams(prompts_per_step=8, num_generations=4, max_completion_length=100)
    examples = [{"prompt": "word " * 100}, {"prompt": "short"}]
    # longest sequence: 100 prompt + 100 completion + 16 template = 216 tokens
    assert rl_micro_batch(rl, examples, _WordTokenizer(), 2048) == 8  # 9 fit: divisor 8
    assert rl_micro_batch(rl, examples, _WordTokenizer(), 200) == 1
    short = RLParams(prompts_per_step=8, num_generations=4, max_completion_length=16)
    one_word = [{"prompt": "What is 2 + 3?"}]  # the default task: the whole step at once
    assert rl_micro_batch(short, one_word, _WordTokenizer(), 2048) == 32


def _logged(steps: int = 2) -> pl.DataFrame:
    """TRL's completions rows for 2 steps x 1 prompt x 2 rollouts (one right each)."""
    rows = []
    for step in range(1, steps + 1):
        for ok in (True, False):
            rows.append(
                {
                    "step": step,
                    "prompt": "What is 3 + 4?",
                    "completion": "7" if ok else "8",
                    "verifier_reward": float(ok),
                    "prompt_id": "p",
                    "reference_answer": "7",
                    "correct": ok,
                    "extracted_answer": "7" if ok else "8",
                    "reason": "correct" if ok else "wrong_answer",
                    "completion_tokens": 2,
                    "advantage": 1.0 if ok else -1.0,
                }
            )
    return pl.DataFrame(rows)


def test_rollout_rows_have_generation_and_critique_columns_and_step_ids():
    rollouts = grpo.rollout_rows(_logged(), "round_003", "ckpt", TINY_RL, ["verifier_reward"])
    assert rollouts.height == 4
    assert rollouts["generation_id"].n_unique() == 4  # the step is part of the id
    assert rollouts["policy_version"].to_list() == [0, 0, 1, 1]
    assert rollouts["verdict"].to_list() == ["accept", "reject", "accept", "reject"]
    assert rollouts["advantage"].to_list() == [1.0, -1.0, 1.0, -1.0]
    assert set(rollouts["phase"]) == {"rollout"}
    from selfimprove_dagster.methods.critique_rows import CRITIQUE_SCHEMA

    assert set(CRITIQUE_SCHEMA) <= set(rollouts.columns)
    assert {"prompt", "completion", "policy", "sample_index"} <= set(rollouts.columns)


def _steps(rewards, entropies, lengths, truncated=0.0) -> pl.DataFrame:
    history = [
        {
            "step": i + 1,
            "reward": r,
            "reward_std": 0.3,
            "frac_reward_zero_std": 0.5,
            "entropy": e,
            "completions/mean_length": n,
            "completions/clipped_ratio": truncated,
            "loss": 0.1,
        }
        for i, (r, e, n) in enumerate(zip(rewards, entropies, lengths, strict=True))
    ]
    history.append({"train_runtime": 1.0, "step": len(rewards)})  # the summary: skipped
    return grpo.step_rows(history, "round_000")


def test_rl_health_monitors_pass_a_healthy_run_and_warn_on_collapse():
    healthy = _steps([0.3, 0.4, 0.5, 0.6], [2.0, 1.9, 1.8, 1.7], [8, 8, 9, 9])
    assert healthy.height == 4 and healthy["kl"].is_null().all()  # beta=0: no KL logged
    assert monitors.rl_reward_collapsed(healthy).passed
    assert monitors.rl_entropy_collapsed(healthy).passed
    assert monitors.rl_length_blew_up(healthy).passed
    # planted: reward 0.6 -> 0.1, entropy 2.0 -> 0.4, length 8 -> 30 tokens
    sick = _steps([0.6, 0.5, 0.2, 0.1], [2.0, 1.0, 0.6, 0.4], [8, 12, 20, 30], truncated=0.7)
    reward = monitors.rl_reward_collapsed(sick)
    assert not reward.passed and "Reward collapsed" in reward.message
    assert not monitors.rl_entropy_collapsed(sick).passed
    length = monitors.rl_length_blew_up(sick)
    assert not length.passed and "hit the length limit" in length.message
    summary = health_summary(sick, None)
    assert summary["rl_reward_first"] == 0.6 and summary["rl_reward_last"] == 0.1


def test_rl_monitors_pass_a_round_that_is_not_rl():
    gate = monitors.rl_reward_collapsed(None)
    assert gate.passed and "not an online RL round" in gate.message


def test_grpo_and_rloo_are_methods_with_their_own_objective():
    assert parse_method("grpo").objective == "grpo" and parse_method("grpo").online
    assert parse_method("rloo").objective == "rloo"
    with pytest.raises(SelfImproveError, match="does not compose"):
        parse_method("grpo+self_refine")


# --- real GRPO on the tiny model --------------------------------------------------------


def _examples() -> list[dict]:
    pairs = [(12, 30), (40, 2), (11, 11), (50, 5)]
    return [
        {
            "prompt": f"What is {a} + {b}? Answer with just the number.",
            "answer": str(a + b),
            "prompt_id": f"p{a}",
        }
        for a, b in pairs
    ]


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_rl_training_records_every_rollout_and_runs_all_planned_steps(
    algorithm, tiny_model, models_dir, tmp_path
):
    recorder = grpo.RolloutRecorder("round_000", tiny_model, TINY_RL)
    manifest = train_lora(
        algorithm,
        tiny_model,
        _examples(),
        TrainParams(learning_rate=1e-4, rl=TINY_RL),
        tmp_path / "ckpt",
        models_dir,
        after_train=recorder.collect,
    )
    assert manifest["objective"] == algorithm
    assert manifest["optimizer_steps"] == manifest["planned_steps"] == 2
    assert manifest["rl"]["rl_steps"] == 2
    # 2 steps x 2 prompts x 2 rollouts, each with its step and verdict
    assert recorder.rollouts.height == 8
    assert sorted(set(recorder.rollouts["step"])) == [1, 2]
    assert recorder.rollouts["generation_id"].n_unique() == 8
    assert recorder.rollouts["correct"].is_not_null().all()
    assert recorder.steps["step"].to_list() == [1, 2]
    assert recorder.steps["entropy"].is_not_null().all()


def test_micro_batched_grpo_still_records_every_rollout_of_each_step(
    tiny_model, models_dir, tmp_path
):
    """A token budget smaller than a step's batch: forward passes are split, the
    optimizer still steps once per generation batch, and every rollout is recorded."""
    recorder = grpo.RolloutRecorder("round_000", tiny_model, TINY_RL)
    manifest = train_lora(
        "grpo",
        tiny_model,
        _examples(),
        TrainParams(learning_rate=1e-4, rl=TINY_RL, micro_batch_tokens=64),
        tmp_path / "ckpt",
        models_dir,
        after_train=recorder.collect,
    )
    assert manifest["micro_batch"] < TINY_RL.batch_size
    assert manifest["optimizer_steps"] == manifest["planned_steps"] == 2
    assert recorder.rollouts.height == 8  # 2 steps x 2 prompts x 2 rollouts
    assert recorder.rollouts.group_by("step").len().sort("step")["len"].to_list() == [4, 4]


@pytest.mark.skipif(
    not os.environ.get("SELFIMPROVE_TEST_GPU"),
    reason="needs a GPU and vLLM (SELFIMPROVE_TEST_GPU=1)",
)
def test_grpo_with_vllm_colocate_on_gpu(tiny_model, models_dir, tmp_path):
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rl = RLParams(
        steps=1, prompts_per_step=2, num_generations=2, max_completion_length=4, use_vllm=True
    )
    recorder = grpo.RolloutRecorder("round_000", tiny_model, rl)
    manifest = train_lora(
        "grpo",
        tiny_model,
        _examples(),
        TrainParams(rl=rl, device="cuda"),
        tmp_path / "ckpt",
        models_dir,
        after_train=recorder.collect,
    )
    assert manifest["optimizer_steps"] == 1 and recorder.rollouts.height == 4


def test_use_vllm_without_vllm_names_the_extra(tiny_model, models_dir, tmp_path):
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    rl = RLParams(steps=1, prompts_per_step=2, num_generations=2, use_vllm=True)
    with pytest.raises(ImportError, match="vllm"):
        train_lora("grpo", tiny_model, _examples(), TrainParams(rl=rl), tmp_path / "c", models_dir)


# --- one grpo round through Dagster ---------------------------------------------------


@pytest.fixture(scope="module")
def grpo_round(tiny_model, models_dir, tmp_path_factory):
    from selfimprove_dagster.assets.checks import GATES
    from selfimprove_dagster.resources import (
        EvolutionResource,
        GatesResource,
        MethodResource,
        StorageResource,
        TaskResource,
        TrainerResource,
    )
    from selfimprove_dagster.store.storage import RoundStore
    from tests.conftest import materialize_round
    from tests.test_method_assets import MethodGenerator

    data_dir = tmp_path_factory.mktemp("grpo")
    (data_dir / "models").symlink_to(models_dir)
    resources = {
        "storage": StorageResource(data_dir=str(data_dir)),
        "task": TaskResource(n_train=8, n_eval=6, eval_samples_per_prompt=2, pass_at_k_prompts=4),
        "generator": MethodGenerator(base_model=tiny_model, samples_per_prompt=2),
        "trainer": TrainerResource(
            lora_r=4,
            lora_alpha=8,
            rl_steps=2,
            rl_prompts_per_step=2,
            rl_num_generations=2,
            rl_max_completion_length=4,
        ),
        "gates": GatesResource(),
        "evolution": EvolutionResource(),
        "method": MethodResource(method="grpo"),
    }
    result = materialize_round(resources, "round_000", dg.DagsterInstance.ephemeral())
    return RoundStore(data_dir), result, len(GATES)


def test_a_grpo_round_passes_every_gate_and_records_its_rollouts(grpo_round):
    store, result, n_checks = grpo_round
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    failed = [e.check_name for e in evaluations if not e.passed]
    # The one WARN, and a right one: the tiny random model never stops within its
    # 4-token budget, so every rollout hits the length limit. Every blocking gate passed.
    assert failed == ["check_length_blowup_eval_scores"]
    assert len(evaluations) == n_checks
    filtered = store.read("round_000", "filtered")
    assert set(filtered["source"]) == {grpo.SOURCE} and filtered.height == 4
    rollouts = store.read("round_000", ROLLOUTS_TABLE)
    assert rollouts.height == 2 * 2 * 2
    generations = store.read("round_000", "generations")
    assert not set(rollouts["generation_id"]) & set(generations["generation_id"])
    assert set(rollouts["prompt_id"]) <= set(filtered["prompt_id"])  # trained prompts only
    scores = store.read("round_000", "eval_scores").row(0, named=True)
    assert scores["method"] == "grpo" and scores["rl_steps"] == 2 and scores["rl_rollouts"] == 8


def test_a_grpo_round_is_in_the_catalog_and_its_lineage(grpo_round):
    from selfimprove_dagster.store.lineage import checkpoint_lineage, generation_lineage

    store, _, _ = grpo_round
    store.refresh_catalog()
    with duckdb.connect(str(store.catalog_path), read_only=True) as con:
        per_step = con.execute(
            "SELECT step, count(*) FROM rollouts GROUP BY step ORDER BY step"
        ).fetchall()
        every_sample = con.execute(
            "SELECT count(*) FROM (SELECT * FROM generations UNION ALL BY NAME "
            "SELECT * FROM rollouts)"
        ).fetchone()[0]
    assert per_step == [(1, 4), (2, 4)]
    assert every_sample == store.read("round_000", "generations").height + 8
    lineage = checkpoint_lineage(store, "round_000")
    assert len(lineage["trained_on"]) == 4
    assert {row["source"] for row in lineage["trained_on"]} == {grpo.SOURCE}
    rollout_id = store.read("round_000", ROLLOUTS_TABLE)["generation_id"][0]
    fate = generation_lineage(store, rollout_id)
    assert fate["generation"]["phase"] == "rollout" and fate["generation"]["step"] == 1
    assert fate["trained_into"]["round"] == "round_000"
