"""`SelfImproveLoop`: a self-improvement loop declared in YAML, as a Dagster Component.

    # defs/<name>/defs.yaml
    type: selfimprove_dagster.components.SelfImproveLoop
    attributes:
      name: add2_grpo
      method: {method: grpo}
      trainer: {rl_steps: 4}

`dg scaffold defs selfimprove_dagster.components.SelfImproveLoop my_loop` writes a
`defs.yaml` that passes `dg check defs` as written; `dg list components` shows the type
(registered under the `dagster_dg_cli.registry_modules` entry point). Each group of
attributes has the fields of its resource (names, defaults, descriptions and ranges
come from `resources/`); an unknown key is refused with the closest valid name. Where
a value comes from when several sources set it: resources/settings.py.
"""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from selfimprove_dagster.assets import LoopSpec, build_loop
from selfimprove_dagster.profiles import active_profile
from selfimprove_dagster.resources.settings import group_model, resolve_settings

TaskSettings = group_model("task")
GeneratorSettings = group_model("generator")
TrainerSettings = group_model("trainer")
MethodSettings = group_model("method")
GatesSettings = group_model("gates")
EvolutionSettings = group_model("evolution")
StorageSettings = group_model("storage")


class LoopScaffolder(dg.Scaffolder):
    """`dg scaffold defs ... <path>`: a loop named after its folder, every other setting
    at its default (a valid file as written)."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        name = request.target_path.name.replace("-", "_").lower()
        dg.scaffold_component(request, {"name": name, "description": f"The {name} loop."})


@dg.scaffold_with(LoopScaffolder)
class SelfImproveLoop(dg.Component, dg.Model, dg.Resolvable):
    """One self-improvement loop (generate -> critique -> filter -> train -> evaluate,
    one partition per round): its assets, gates, round job, sensors, schedule,
    promoted_policy and history, every name prefixed with the loop's name."""

    name: str = Field(
        description="The loop's name: prefixes its asset keys (<name>/generations), "
        "partitions (<name>_rounds), jobs, sensors and resources. Lowercase, digits, _."
    )
    description: str = Field(default="", description="What the loop is for (shown in the UI).")
    env_prefix: str = Field(
        default="",
        description="Read unset settings from environment variables <env_prefix><FIELD> "
        "(the demo loop: SELFIMPROVE_, so SELFIMPROVE_N_TRAIN=100 sets its task.n_train). "
        "Empty: the environment is read only through {{ env('X') }} in this file.",
    )
    task: TaskSettings = Field(default_factory=TaskSettings, description="Where prompts come from.")
    generator: GeneratorSettings = Field(
        default_factory=GeneratorSettings, description="The policy and how it samples."
    )
    trainer: TrainerSettings = Field(
        default_factory=TrainerSettings, description="How a round's checkpoint is trained."
    )
    method: MethodSettings = Field(
        default_factory=MethodSettings, description="Who critiques, what the round trains on."
    )
    gates: GatesSettings = Field(
        default_factory=GatesSettings, description="Thresholds of the quality gates."
    )
    evolution: EvolutionSettings = Field(
        default_factory=EvolutionSettings, description="Stop rules, policy and temperature."
    )
    storage: StorageSettings = Field(
        default_factory=StorageSettings,
        description="Where the loop's rounds live (default: <data dir>/loops/<name>).",
    )

    def spec(self) -> LoopSpec:
        """The loop's settings resolved (YAML over environment over profile defaults)."""
        groups = {
            group: getattr(self, group).model_dump(exclude_none=True)
            for group in ("task", "generator", "trainer", "method", "gates", "evolution", "storage")
        }
        profile = active_profile()
        resources = resolve_settings(self.name, groups, self.env_prefix, None, profile.defaults)
        return LoopSpec(self.name, resources, self.description, self.env_prefix)

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return build_loop(self.spec())
