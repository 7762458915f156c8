"""The `openai` engine against a real OpenAI-compatible HTTP server on 127.0.0.1.

The server (test-only, below) is a stdlib `ThreadingHTTPServer` that answers
/v1/chat/completions and /v1/completions with the project's transformers engine on the
tiny random model, loads round adapters by name (/v1/load_lora_adapter, as vLLM does),
checks a Bearer key when given one, and can be told to fail the next requests: an HTTP
503 or 429, or an answer slower than the client's timeout.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest

from selfimprove_dagster.engines.base import Sampling
from selfimprove_dagster.engines.openai_engine import (
    OpenAIEngine,
    OpenAISettings,
    served_model_name,
)
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.sources.tasks import make_task

SAMPLING = Sampling(temperature=1.0, top_k=50, max_new_tokens=8, seed=3)


class OpenAICompatibleServer:
    """A small OpenAI-compatible server over the transformers engine (tests only)."""

    def __init__(self, base_model: str, models_dir: Path, api_key: str = "") -> None:
        self.base_name = Path(base_model).name
        self.models = {self.base_name: base_model}  # served name -> model reference
        self.models_dir, self.api_key = models_dir, api_key
        self.engines: dict = {}
        self.faults: list[tuple[str, float]] = []  # ("503"|"429"|"slow", seconds) per request
        self.log: list[dict] = []  # one entry per completion request: model, seed, outcome
        self.lock = threading.Lock()  # one generation at a time (the engine is not reentrant)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        for engine in self.engines.values():
            engine.close()

    def engine(self, name: str):
        from selfimprove_dagster.engines.transformers_engine import TransformersEngine

        if name not in self.engines:
            self.engines[name] = TransformersEngine(self.models[name], self.models_dir)
        return self.engines[name]

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return reply(request, 401, {"error": {"message": "Invalid API key"}})
        body = json.loads(request.rfile.read(int(request.headers["Content-Length"])))
        if request.path == "/v1/load_lora_adapter":
            if body["lora_name"] in self.models:
                return reply(request, 400, {"error": {"message": "already loaded"}})
            self.models[body["lora_name"]] = body["lora_path"]
            return reply(request, 200, {"message": "Success"})
        if body.get("model") not in self.models:
            return reply(request, 404, {"error": {"message": f"model {body.get('model')}?"}})
        with self.lock:
            fault = self.faults.pop(0) if self.faults else ("", 0.0)
            entry = {"model": body["model"], "seed": body.get("seed"), "outcome": fault[0] or "ok"}
            self.log.append(entry)
        if fault[0] in ("503", "429"):
            return reply(request, int(fault[0]), {"error": {"message": "busy"}}, retry_after="0")
        if fault[0] == "slow":
            time.sleep(fault[1])  # the client has given up by now; the answer is lost
        sampling = Sampling(
            temperature=body["temperature"],
            top_p=body["top_p"],
            top_k=body.get("top_k", 0),
            max_new_tokens=body["max_tokens"],
            seed=body.get("seed", 0),
        )
        with self.lock:
            engine = self.engine(body["model"])
            if request.path == "/v1/chat/completions" and body.get("continue_final_message"):
                # vLLM's extension: the last (assistant) message is the reply's start.
                user, prefix = (m["content"] for m in body["messages"][-2:])
                out = engine.generate([user], body["n"], sampling, response_prefix=prefix)
            elif request.path == "/v1/chat/completions":
                out = engine.generate([body["messages"][-1]["content"]], body["n"], sampling)
            else:
                out = engine.generate_text([body["prompt"]], body["n"], sampling)
        key = "message" if request.path == "/v1/chat/completions" else "text"
        choices = [
            {
                "index": c.sample_index,
                key: {"role": "assistant", "content": c.text} if key == "message" else c.text,
                "finish_reason": c.finish_reason,
            }
            for c in out
        ]
        usage = {
            "prompt_tokens": out[0].prompt_tokens,
            "completion_tokens": sum(c.completion_tokens for c in out),
        }
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # timed-out client
            reply(request, 200, {"model": body["model"], "choices": choices, "usage": usage})


def reply(request, status: int, payload: dict, retry_after: str | None = None) -> None:
    data = json.dumps(payload).encode()
    request.send_response(status)
    request.send_header("Content-Type", "application/json")
    request.send_header("Content-Length", str(len(data)))
    if retry_after is not None:
        request.send_header("Retry-After", retry_after)
    request.end_headers()
    request.wfile.write(data)


@pytest.fixture
def prompts() -> list[str]:
    return make_task("addition_2digit", 6, 0, seed=1)["prompt"].to_list()


@pytest.fixture
def server(tiny_model, models_dir):
    with OpenAICompatibleServer(tiny_model, models_dir) as running:
        yield running


def settings(server, **overrides) -> OpenAISettings:
    fast = {"timeout_s": 5.0, "backoff_s": 0.05, "max_retries": 3, "max_concurrency": 3}
    return OpenAISettings(base_url=server.url, **{**fast, **overrides})


def fingerprint(completions) -> list[tuple]:
    return [(c.prompt_index, c.sample_index, c.text, c.finish_reason) for c in completions]


def test_served_model_name_picks_the_round_policy(tmp_path, tiny_model):
    checkpoint = tmp_path / "checkpoints" / "round_002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "manifest.json").write_text("{}")
    (checkpoint / "adapter_config.json").write_text("{}")
    assert served_model_name(str(checkpoint)) == "round_002"
    assert served_model_name(str(checkpoint), base_name="smollm2") == "round_002"
    assert served_model_name("embedded:smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert served_model_name(tiny_model) == Path(tiny_model).name
    assert served_model_name(tiny_model, base_name="HuggingFaceTB/SmolLM2") == (
        "HuggingFaceTB/SmolLM2"
    )


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_k_samples_per_prompt_prompt_major_and_seeded(
    server, tiny_model, models_dir, prompts, endpoint
):
    engine = OpenAIEngine(tiny_model, models_dir, settings(server, endpoint=endpoint))
    out = engine.generate(prompts, 3, SAMPLING)
    assert [(c.prompt_index, c.sample_index) for c in out] == [
        (i, s) for i in range(len(prompts)) for s in range(3)
    ]
    # Each request is the transformers engine on that one prompt with the request's seed.
    local = server.engine(server.base_name)
    expected = []
    for i, prompt in enumerate(prompts):
        seeded = Sampling(**{**SAMPLING.__dict__, "seed": SAMPLING.seed * 1_000_003 + i})
        expected += [
            c.__class__(**{**c.__dict__, "prompt_index": i})
            for c in local.generate([prompt], 3, seeded)
        ]
    assert fingerprint(out) == fingerprint(expected)
    # Token counts per sample come from the tokenizer; they match the engine's own.
    assert [c.completion_tokens for c in out] == [c.completion_tokens for c in expected]
    assert {e["model"] for e in server.log} == {server.base_name}


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_response_prefix_reaches_the_server(server, tiny_model, models_dir, prompts, endpoint):
    engine = OpenAIEngine(tiny_model, models_dir, settings(server, endpoint=endpoint))
    out = engine.generate(prompts[:2], 2, SAMPLING, response_prefix="Score:")
    local = server.engine(server.base_name)
    expected = []
    for i, prompt in enumerate(prompts[:2]):
        seeded = Sampling(**{**SAMPLING.__dict__, "seed": SAMPLING.seed * 1_000_003 + i})
        expected += [
            c.__class__(**{**c.__dict__, "prompt_index": i})
            for c in local.generate([prompt], 2, seeded, response_prefix="Score:")
        ]
    assert fingerprint(out) == fingerprint(expected)


def test_survives_503_429_and_a_slow_answer_without_losing_or_duplicating(
    server, tiny_model, models_dir, prompts
):
    engine = OpenAIEngine(tiny_model, models_dir, settings(server, timeout_s=1.0))
    clean = engine.generate(prompts, 2, SAMPLING)
    server.log.clear()
    server.faults = [("503", 0), ("slow", 3.0), ("429", 0)]
    faulty = engine.generate(prompts, 2, SAMPLING)
    assert fingerprint(faulty) == fingerprint(clean)  # same samples: none lost, none doubled
    assert len({(c.prompt_index, c.sample_index) for c in faulty}) == len(prompts) * 2
    assert engine.retries == 3 and engine.last_stats["retries"] == 3
    outcomes = [e["outcome"] for e in server.log]
    assert sorted(outcomes) == sorted(["503", "slow", "429"] + ["ok"] * len(prompts))
    # Every failed request was sent again with the same seed.
    seeds = [e["seed"] for e in server.log]
    assert sorted(set(seeds)) == [SAMPLING.seed * 1_000_003 + i for i in range(len(prompts))]


def test_gives_up_with_a_clear_error_when_the_server_stays_busy(server, tiny_model, models_dir):
    server.faults = [("503", 0)] * 10
    engine = OpenAIEngine(tiny_model, models_dir, settings(server, max_retries=2))
    with pytest.raises(SelfImproveError, match=r"after 3 tries: HTTP 503"):
        engine.generate(["What is 1 + 2?"], 2, SAMPLING)


def test_auth_failure_names_the_key_setting(tiny_model, models_dir):
    with OpenAICompatibleServer(tiny_model, models_dir, api_key="secret") as guarded:
        without = OpenAIEngine(tiny_model, models_dir, settings(guarded))
        with pytest.raises(SelfImproveError, match="HTTP 401, no API key sent.*OPENAI_API_KEY"):
            without.generate(["What is 1 + 2?"], 1, SAMPLING)
        wrong = OpenAIEngine(tiny_model, models_dir, settings(guarded, api_key="nope"))
        with pytest.raises(SelfImproveError, match="API key rejected"):
            wrong.generate(["What is 1 + 2?"], 1, SAMPLING)
        right = OpenAIEngine(tiny_model, models_dir, settings(guarded, api_key="secret"))
        assert len(right.generate(["What is 1 + 2?"], 2, SAMPLING)) == 2
        assert guarded.log and all(e["outcome"] == "ok" for e in guarded.log)


def test_unknown_model_name_says_how_to_serve_it(server, tiny_model, models_dir):
    engine = OpenAIEngine(tiny_model, models_dir, settings(server, base_name="not-served"))
    with pytest.raises(SelfImproveError, match="404 for model `not-served`.*lora-modules"):
        engine.generate(["What is 1 + 2?"], 1, SAMPLING)


@pytest.mark.slow
def test_a_round_through_the_server_with_faults(embedded_folder, models_dir, tmp_path):
    """prompts -> ... -> eval_scores with every generation on the server (the embedded
    SmolLM2, so some answers are right and the round trains): the base model by its
    name, the new checkpoint loaded as adapter `round_000`; a 503 and a slow answer hit
    the generations step."""
    with OpenAICompatibleServer(str(embedded_folder), models_dir) as server:
        _round_through(server, str(embedded_folder), models_dir, tmp_path)


def _round_through(server, base_model, models_dir, tmp_path):
    from selfimprove_dagster.resources import (
        EvolutionResource,
        GatesResource,
        GeneratorResource,
        MethodResource,
        StorageResource,
        TaskResource,
        TrainerResource,
    )
    from selfimprove_dagster.store.storage import RoundStore

    (tmp_path / "models").symlink_to(models_dir)
    generator = GeneratorResource(
        engine="openai",
        base_model=base_model,
        samples_per_prompt=4,
        openai_base_url=server.url,
        # One request at a time: the test server generates one at a time, and requests
        # queued behind it on a busy CPU would time out.
        openai_max_concurrency=1,
        openai_timeout_s=20.0,
        openai_backoff_s=0.05,
        openai_load_adapters=True,
    )
    resources = {
        "storage": StorageResource(data_dir=str(tmp_path)),
        "task": TaskResource(n_train=16, n_eval=8, eval_samples_per_prompt=2, pass_at_k_prompts=4),
        "generator": generator,
        "trainer": TrainerResource(init="restart", epochs=1, batch_size=4, lora_r=4, lora_alpha=8),
        "gates": GatesResource(),
        "evolution": EvolutionResource(),
        "method": MethodResource(),
    }
    from tests.conftest import materialize_round

    server.faults = [("503", 0), ("slow", 22.0)]
    result = materialize_round(resources, "round_000", dg.DagsterInstance.ephemeral())
    store = RoundStore(tmp_path)
    generations = store.read("round_000", "generations")
    assert generations.height == 16 * 4
    assert generations["generation_id"].n_unique() == generations.height
    assert generations.group_by("prompt_id").len()["len"].unique().to_list() == [4]
    assert [e["outcome"] for e in server.log][:2] == ["503", "slow"]
    # The checkpoint is served by its round name, after the engine loaded the adapter.
    assert server.models["round_000"] == str(store.checkpoint_dir("round_000").resolve())
    assert {e["model"] for e in server.log} == {server.base_name, "round_000"}
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert {"generations", "critiques", "checkpoint", "eval_scores"} <= materialized
