"""The train stage of a round: its `checkpoint` (with the `checkpoints` table, and for
online RL every rollout and step).

    checkpoint -> methods.checkpoint.train_round -> training.train_lora
"""

from collections.abc import Iterator

import dagster as dg

from selfimprove_dagster.assets.loop import Loop, tidy
from selfimprove_dagster.assets.tables import parent_metadata, table_spec
from selfimprove_dagster.methods.checkpoint import train_round
from selfimprove_dagster.profiles import MODEL_POOL
from selfimprove_dagster.store.schemas import ROLLOUTS_TABLE, STEPS_TABLE

# The manifest fields the checkpoint asset shows as metadata.
MANIFEST_METADATA = (
    "version", "adapter_sha256", "trained_from", "train_examples", "optimizer_steps",
    "planned_steps", "final_loss", "train_seconds", "filtered_content_hash",
)  # fmt: skip

CHECKPOINT_DOC = """The round's LoRA adapter trained on `filtered`: TRL SFT (completion-only
loss), or TRL DPO on the preference pairs with self_judge (reference = the round's
policy); with grpo/rloo, online RL (TRL) on the `filtered` prompts with the verifier as
reward, every rollout to table `rollouts`, per-step health to `rl_steps`.

The adapter is published as a new version folder behind `checkpoints/<round>`; its
manifest names its adapter, parent and data by content (verified on every load):
objective, base model, parent checkpoint, filtered-set hash, hyper-parameters, seed,
library versions, final loss and optimizer steps."""


def checkpoint_asset(loop: Loop) -> dg.AssetsDefinition:
    @dg.multi_asset(
        name=f"{loop.name}_checkpoint",
        partitions_def=loop.partitions,
        pool=MODEL_POOL,
        required_resource_keys=loop.resource_keys(),
        specs=[
            dg.AssetSpec(
                loop.key("checkpoint"),
                deps=loop.keys("filtered"),
                group_name=loop.name,
                kinds={"pytorch", "python"},
                description=CHECKPOINT_DOC,
                tags={"selfimprove/stage": "train"},
            ),  # fmt: skip
            table_spec(
                loop,
                "checkpoints",
                "train",
                deps=["checkpoint"],
                description="One row: the checkpoint's path, version, adapter hash, parent, "
                "the filtered data version it trained on, steps and loss.",
            ),  # fmt: skip
            table_spec(
                loop,
                ROLLOUTS_TABLE,
                "train",
                deps=["checkpoint"],
                skippable=True,
                description="grpo/rloo: every rollout the RL trainer sampled.",
            ),  # fmt: skip
            table_spec(
                loop,
                STEPS_TABLE,
                "train",
                deps=["checkpoint"],
                skippable=True,
                description="grpo/rloo: one row per optimizer step (RL health figures).",
            ),  # fmt: skip
        ],
    )
    def checkpoint(context: dg.AssetExecutionContext) -> Iterator[dg.MaterializeResult]:
        step = loop.step(context)
        s, store = step.settings, step.store
        policy, parent = store.generation_policy(step.round)
        recipe = s.method.recipe()
        # Training needs the memory (or the GPU) a kept generation engine holds; and the
        # checkpoint about to be written must not be served from a stale engine.
        s.generator.release_engine()
        trained = train_round(
            recipe, store, step.round, policy=policy, parent=parent,
            trained_from=s.trainer.trained_from(policy, s.generator.base_model),
            params=s.trainer.params(recipe.objective, s.generator.answer_format),
            rl=s.trainer.rl_params(s.generator.answer_format),
            base_model=s.generator.base_model, init=s.trainer.init, log=step.log,
        )  # fmt: skip
        version = step.save("checkpoint", trained.tables())
        manifest = trained.manifest
        yield dg.MaterializeResult(
            asset_key=loop.key("checkpoint"),
            # The checkpoint's identity: re-training to the same weights is not a change.
            data_version=dg.DataVersion(manifest["adapter_sha256"]),
            metadata={
                "path": str(store.checkpoint_dir(step.round)),
                "dagster/uri": str(store.checkpoint_version_dir(step.round)),
                **tidy({key: manifest[key] for key in MANIFEST_METADATA}),
                **parent_metadata(policy, parent),
                "method": recipe.name,
                "objective": recipe.objective,
                **{k: v for k, v in manifest.get("rl", {}).items() if v is not None},
                **step.settings_metadata(),
            },
        )
        yield step.result(version, "checkpoints")
        yield from step.side_results(version, ROLLOUTS_TABLE, STEPS_TABLE)

    return checkpoint
