"""A test-only engine that Ray workers can build (tests/test_ray_pool.py runs a round
through Dagster on it): its answers depend on each prompt alone, like the seeded
engines, so any sharding gives the same rows. Kept in a light module: a Ray worker
imports it to build the engine."""

from __future__ import annotations

import re

from selfimprove_dagster.engines.base import Completion, GenerationEngine, Sampling
from selfimprove_dagster.engines.ray_pool import EngineSpec


class ArithmeticEngine(GenerationEngine):
    """Answers "What is A + B?" right in sample 0 when A + B is even, wrong otherwise."""

    def __init__(self, model_ref: str) -> None:
        self.model_ref = model_ref
        self.last_stats = {"rows": 0, "new_tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0}

    def generate(
        self, prompts: list[str], n: int, sampling: Sampling, log=None, response_prefix=""
    ) -> list[Completion]:
        out = []
        for i, prompt in enumerate(prompts):
            a, b = map(int, re.findall(r"\d+", prompt)[:2])
            for s in range(n):
                right = s == 0 and (a + b) % 2 == 0
                text = f"{a} + {b} = {a + b if right else a + b + 1}"
                out.append(Completion(i, s, text, 10, 8, "stop"))
        return out


class ArithmeticSpec(EngineSpec):
    """An `EngineSpec` whose workers build the `ArithmeticEngine`."""

    def build(self) -> GenerationEngine:
        return ArithmeticEngine(self.model_ref)


def test_the_scripted_answers_depend_on_the_prompt_alone():
    engine = ArithmeticEngine("m")
    prompts = ["What is 12 + 14?", "What is 11 + 14?", "What is 30 + 40?"]
    whole = engine.generate(prompts, 2, Sampling())
    alone = engine.generate(prompts[2:], 2, Sampling())
    assert [c.text for c in whole[4:]] == [c.text for c in alone]
    assert whole[0].text == "12 + 14 = 26" and whole[2].text == "11 + 14 = 26"
