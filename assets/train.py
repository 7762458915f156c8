"""The train stage of a round: its `checkpoint` (with the `checkpoints` table, and for
online RL every rollout and step).

    checkpoint -> methods.checkpoint.train_round -> training.train_lora
"""

from collections.abc import Iterator

import dagster as dg

from assets.partitions import ROUNDS
from assets.tables import parent_metadata, save, side_results, table_result, table_spec
from resources import GeneratorResource, MethodResource, StorageResource, TrainerResource
from selfimprove_dagster.methods.checkpoint import train_round
from selfimprove_dagster.profiles import MODEL_POOL
from selfimprove_dagster.store.schemas import ROLLOUTS_TABLE, STEPS_TABLE

# The manifest fields the checkpoint asset shows as metadata.
MANIFEST_METADATA = (
    "version", "adapter_sha256", "trained_from", "train_examples", "optimizer_steps",
    "planned_steps", "final_loss", "train_seconds", "filtered_content_hash",
)  # fmt: skip


@dg.multi_asset(
    name="checkpoint",
    partitions_def=ROUNDS,
    pool=MODEL_POOL,
    specs=[
        dg.AssetSpec(
            "checkpoint", deps=["filtered"], group_name="train", kinds={"pytorch", "python"}
        ),
        table_spec(
            "checkpoints",
            "train",
            deps=["checkpoint"],
            description="One row: the checkpoint's path, version, adapter hash, parent, "
            "the filtered data version it trained on, steps and loss.",
        ),
        table_spec(
            ROLLOUTS_TABLE,
            "train",
            deps=["checkpoint"],
            skippable=True,
            description="grpo/rloo: every rollout the RL trainer sampled.",
        ),
        table_spec(
            STEPS_TABLE,
            "train",
            deps=["checkpoint"],
            skippable=True,
            description="grpo/rloo: one row per optimizer step (RL health figures).",
        ),
    ],
)
def checkpoint(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    generator: GeneratorResource,
    trainer: TrainerResource,
    method: MethodResource,
) -> Iterator[dg.MaterializeResult]:
    """The round's LoRA adapter trained on `filtered`: TRL SFT (completion-only loss),
    or TRL DPO on the preference pairs with self_judge (reference = the round's policy);
    with grpo/rloo, online RL (TRL) on the `filtered` prompts with the verifier as reward,
    every rollout to table `rollouts`, per-step health to `rl_steps`.

    The adapter is published as a new version folder behind `checkpoints/<round>`; its
    manifest names its adapter, parent and data by content (verified on every load):
    objective, base model, parent checkpoint, filtered-set hash, hyper-parameters, seed,
    library versions, final loss and optimizer steps. Table `checkpoints` (one row):
    round, path, version, adapter_sha256, trained_from, policy, content_hash,
    filtered_data_version, train_examples, optimizer_steps, planned_steps, final_loss.
    """
    store, round_ = storage.store(), context.partition_key
    policy, parent = store.generation_policy(round_)
    recipe = method.recipe()
    # Training needs the memory (or the GPU) a kept generation engine holds; and the
    # checkpoint about to be written must not be served from a stale engine.
    generator.release_engine()
    trained = train_round(
        recipe, store, round_, policy=policy, parent=parent,
        trained_from=trainer.trained_from(policy, generator.base_model),
        params=trainer.params(recipe.objective, generator.answer_format),
        rl=trainer.rl_params(generator.answer_format), base_model=generator.base_model,
        init=trainer.init, log=context.log.info,
    )  # fmt: skip
    version = save(context, store, "checkpoint", trained.tables())
    manifest = trained.manifest
    yield dg.MaterializeResult(
        asset_key="checkpoint",
        # The adapter's content hash: re-training to the same weights is not a change.
        data_version=dg.DataVersion(manifest["adapter_sha256"]),
        metadata={
            "path": str(store.checkpoint_dir(round_)),
            "dagster/uri": str(store.checkpoint_version_dir(round_)),
            **{key: manifest[key] for key in MANIFEST_METADATA},
            **parent_metadata(policy, parent),
            "method": recipe.name,
            "objective": recipe.objective,
            **{k: v for k, v in manifest.get("rl", {}).items() if v is not None},
        },
    )
    yield table_result(version, "checkpoints")
    yield from side_results(version, ROLLOUTS_TABLE, STEPS_TABLE)
