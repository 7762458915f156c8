"""Generation through any OpenAI-compatible server (a vLLM server, a fleet behind a
load balancer): one request per prompt asking for its k samples (`n`), sent with
bounded concurrency, retried with exponential backoff on 429 / 5xx / timeouts.

The round's policy is selected by model name: the base model is served under
`base_name`, a round checkpoint under its round name (`round_001`), which is how a
vLLM server names LoRA adapters (`--lora-modules round_001=/data/checkpoints/round_001`,
or loaded at run time through `/v1/load_lora_adapter` when `load_adapters` is on and
the server runs with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`).

`endpoint="chat"` posts user messages to /v1/chat/completions (the server applies the
chat template); `endpoint="completions"` applies the model's chat template here and
posts the text to /v1/completions. Per-sample completion token counts come from the
model's tokenizer when it is on this machine (a shared data dir in a cluster), else
from the response's `usage` split evenly over the samples.

Nothing is lost or duplicated: every request must come back with exactly `n` choices
with indices 0..n-1, a retried request replaces (never adds to) the failed one, and
each request carries a seed derived from (sampling seed, prompt index) so a retry asks
for the same samples where the server honours seeds.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from selfimprove_dagster.engines.base import (
    Completion,
    GenerationEngine,
    Sampling,
    chat_text,
    generation_stats,
)
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.models import EMBEDDED_PREFIX, is_checkpoint, trained_from
from selfimprove_dagster.progress import LogFn, Progress

RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}  # worth another try
AUTH_STATUSES = {401, 403}


@dataclass(frozen=True)
class OpenAISettings:
    """How to reach the server and how hard to push it."""

    base_url: str = "http://127.0.0.1:8000/v1"  # up to and including /v1
    api_key: str = ""  # sent as a Bearer token when set
    base_name: str = ""  # served name of the base model ("" = derived from the reference)
    endpoint: str = "chat"  # chat (/chat/completions) or completions (/completions)
    max_concurrency: int = 8  # requests in flight at once
    timeout_s: float = 120.0  # socket timeout of one request (no byte for this long)
    max_retries: int = 5  # further tries of a request after 429 / 5xx / timeout
    backoff_s: float = 0.5  # first retry delay; doubles each try (plus jitter), capped
    max_backoff_s: float = 30.0  # longest wait between two tries
    send_seed: bool = True  # per-request seed (off for servers that reject it)
    load_adapters: bool = False  # load a round's adapter into the server by name first


class RequestFailed(Exception):
    """One HTTP exchange that failed; `retry` says whether trying again may help."""

    def __init__(self, message: str, retry: bool, status: int | None = None, wait: float = 0):
        super().__init__(message)
        self.retry, self.status, self.wait = retry, status, wait


def served_model_name(model_ref: str, base_name: str = "") -> str:
    """The name a server knows the policy `model_ref` by.

    A round checkpoint is served under its round name (`.../checkpoints/round_001` ->
    `round_001`); the base model under `base_name`, or else the embedded model's name /
    the folder's name.
    """
    path = Path(model_ref).expanduser()
    if is_checkpoint(path):
        return path.name
    if base_name:
        return base_name
    if model_ref.startswith(EMBEDDED_PREFIX):
        return model_ref.removeprefix(EMBEDDED_PREFIX)
    return path.name or model_ref


class OpenAIEngine(GenerationEngine):
    def __init__(
        self, model_ref: str, models_dir: Path, settings: OpenAISettings | None = None
    ) -> None:
        self.model_ref = model_ref
        self.models_dir = models_dir
        self.settings = settings or OpenAISettings()
        if self.settings.endpoint not in ("chat", "completions"):
            raise SelfImproveError(
                f"Unknown OpenAI endpoint `{self.settings.endpoint}`",
                "set SELFIMPROVE_OPENAI_ENDPOINT to `chat` or `completions`",
            )
        self.base_url = self.settings.base_url.rstrip("/")
        self.model_name = served_model_name(model_ref, self.settings.base_name)
        self.tokenizer = self._local_tokenizer()
        self.last_stats: dict[str, float] = {}
        self.retries = 0  # requests tried again in the last generate()
        self._lock = threading.Lock()
        if self.settings.load_adapters and is_checkpoint(Path(model_ref).expanduser()):
            self._load_adapter()

    # -- generation ---------------------------------------------------------------

    def generate(
        self,
        prompts: list[str],
        n: int,
        sampling: Sampling,
        log: LogFn | None = None,
        response_prefix: str = "",
    ) -> list[Completion]:
        started, self.retries = time.monotonic(), 0
        results: dict[int, list[Completion]] = {}
        workers = max(1, min(self.settings.max_concurrency, len(prompts)))
        with (
            Progress("generate", len(prompts) * n, log=log) as progress,
            ThreadPoolExecutor(max_workers=workers) as pool,
        ):
            futures = {
                pool.submit(self._sample_prompt, i, prompt, n, sampling, response_prefix): i
                for i, prompt in enumerate(prompts)
            }
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()  # raises the first failure
                    progress.update(n)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)  # fail now, not after the rest
                raise
        out = [c for i in range(len(prompts)) for c in results[i]]
        assert [(c.prompt_index, c.sample_index) for c in out] == [
            (i, s) for i in range(len(prompts)) for s in range(n)
        ], "lost or duplicated completions"
        stats = generation_stats(out, time.monotonic() - started)
        self.last_stats = {**stats, "retries": self.retries}
        if log:
            log(
                f"generated {len(out)} completions from {self.base_url} ({self.model_name}), "
                f"{stats['new_tokens']} new tokens in {stats['seconds']:.1f} s, "
                f"{self.retries} request(s) retried"
            )
        return out

    def _sample_prompt(
        self, index: int, prompt: str, n: int, sampling: Sampling, response_prefix: str = ""
    ):
        seed = sampling.seed * 1_000_003 + index
        body = self._request_body(prompt, n, sampling, seed, response_prefix)
        path = "/chat/completions" if self.settings.endpoint == "chat" else "/completions"
        response = self._post_with_retries(path, body)
        return self._completions(index, n, sampling, response)

    def _request_body(
        self, prompt: str, n: int, sampling: Sampling, seed: int, response_prefix: str = ""
    ) -> dict:
        body: dict = {
            "model": self.model_name,
            "n": n,
            "max_tokens": sampling.max_new_tokens,
            "temperature": 0.0 if sampling.greedy else sampling.temperature,
            "top_p": 1.0 if sampling.greedy else sampling.top_p,
        }
        if not sampling.greedy and sampling.top_k > 0:
            body["top_k"] = sampling.top_k  # a vLLM extension; OpenAI itself ignores it
        if self.settings.send_seed:
            body["seed"] = seed
        if self.settings.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
            if response_prefix:  # vLLM's extension: the reply continues the prefix
                body["messages"].append({"role": "assistant", "content": response_prefix})
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
        else:
            body["prompt"] = self._chat_text(prompt) + response_prefix
        return body

    def _completions(self, index: int, n: int, sampling: Sampling, response: dict):
        choices = response.get("choices") or []
        by_index = {int(c.get("index", -1)): c for c in choices}
        if len(choices) != n or sorted(by_index) != list(range(n)):
            raise SelfImproveError(
                f"The server at {self.base_url} answered a request for n={n} samples with "
                f"choice indices {sorted(by_index)}",
                "use a server that supports `n` (vLLM does), or samples_per_prompt=1",
            )
        usage = response.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens", 0))
        total_new = int(usage.get("completion_tokens", 0))
        out = []
        for s in range(n):
            choice = by_index[s]
            if self.settings.endpoint == "chat":
                text = (choice.get("message") or {}).get("content") or ""
            else:
                text = choice.get("text") or ""
            finish = "length" if choice.get("finish_reason") == "length" else "stop"
            out.append(
                Completion(
                    prompt_index=index,
                    sample_index=s,
                    text=text.strip(),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=self._count_tokens(text, finish, sampling, total_new, n, s),
                    finish_reason=finish,
                )
            )
        return out

    def _count_tokens(self, text, finish, sampling, total_new, n, s) -> int:
        if finish == "length":
            return sampling.max_new_tokens
        if self.tokenizer is not None:  # the text's tokens + the end-of-turn token
            return min(
                len(self.tokenizer(text, add_special_tokens=False).input_ids) + 1,
                sampling.max_new_tokens,
            )
        return total_new // n + (1 if s < total_new % n else 0)

    # -- HTTP ------------------------------------------------------------------------

    def _post_with_retries(self, path: str, body: dict, ok_statuses: tuple = ()) -> dict:
        attempt = 0
        while True:
            try:
                return self._post(path, body)
            except RequestFailed as failure:
                if failure.status in ok_statuses:
                    return {}
                if not failure.retry or attempt >= self.settings.max_retries:
                    raise SelfImproveError(
                        f"{self.base_url}{path} failed for model `{self.model_name}` after "
                        f"{attempt + 1} tries: {failure}",
                        "check that the server is up and serves that model; raise "
                        "SELFIMPROVE_OPENAI_TIMEOUT_S / SELFIMPROVE_OPENAI_MAX_RETRIES for a "
                        "slow or busy fleet",
                    ) from None
                delay = min(self.settings.backoff_s * 2**attempt, self.settings.max_backoff_s)
                delay = max(delay * random.uniform(0.5, 1.0), failure.wait)
                attempt += 1
                with self._lock:
                    self.retries += 1
                time.sleep(delay)

    def _post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        request = urllib.request.Request(
            self.base_url + path, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read()[:300].decode(errors="replace")
            if error.code in AUTH_STATUSES:
                raise SelfImproveError(
                    f"The server at {self.base_url} refused the request (HTTP {error.code}, "
                    f"{'no API key sent' if not self.settings.api_key else 'API key rejected'})",
                    "set SELFIMPROVE_OPENAI_API_KEY to a key the server accepts",
                ) from None
            if error.code == 404:
                raise SelfImproveError(
                    f"{self.base_url}{path} answered 404 for model `{self.model_name}`: {detail}",
                    f"serve the policy under that name (vLLM: `--lora-modules "
                    f"{self.model_name}=<checkpoint dir>` for a round, `--served-model-name` "
                    "for the base; or SELFIMPROVE_OPENAI_LOAD_ADAPTERS=true), or set "
                    "SELFIMPROVE_OPENAI_BASE_NAME to the base model's served name",
                ) from None
            wait = _retry_after(error.headers.get("Retry-After"))
            raise RequestFailed(
                f"HTTP {error.code}: {detail}", error.code in RETRY_STATUSES, error.code, wait
            ) from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as error:
            raise RequestFailed(f"{type(error).__name__}: {error}", retry=True) from None
        except urllib.error.URLError as error:  # refused, reset, DNS, timeout while connecting
            raise RequestFailed(f"{error.reason}", retry=True) from None
        except json.JSONDecodeError as error:
            raise RequestFailed(f"not JSON: {error}", retry=True) from None

    def _load_adapter(self) -> None:
        """Ask the server to load this round's adapter under the round's name (vLLM's
        runtime LoRA loading); a server that already has it answers 400, which is fine."""
        path = Path(self.model_ref).expanduser().resolve()
        if is_checkpoint(Path(trained_from(path))):
            raise SelfImproveError(
                f"Checkpoint {path.name} was trained on top of another round's checkpoint, so "
                "it is not a LoRA adapter of the base model the server runs",
                "train each round on the base model (SELFIMPROVE_INIT=restart, the cluster "
                "profile's default), or serve merged checkpoints (models.merged_model_folder) "
                "under the round's name with SELFIMPROVE_OPENAI_LOAD_ADAPTERS=false",
            )
        body = {"lora_name": self.model_name, "lora_path": str(path)}
        self._post_with_retries("/load_lora_adapter", body, ok_statuses=(400,))

    # -- tokenizer (only for the completions endpoint and exact token counts) ------

    def _local_tokenizer(self):
        from selfimprove_dagster.models import load_tokenizer

        try:
            return load_tokenizer(self.model_ref, self.models_dir)
        except (SelfImproveError, OSError, ValueError):
            if self.settings.endpoint == "completions":
                raise SelfImproveError(
                    f"The completions endpoint needs the chat template of `{self.model_ref}`, "
                    "whose tokenizer is not on this machine",
                    "use SELFIMPROVE_OPENAI_ENDPOINT=chat (the server applies the template), "
                    "or make the model folder reachable here",
                ) from None
            return None

    def _chat_text(self, prompt: str) -> str:
        return chat_text(self.tokenizer, prompt)


def _retry_after(value: str | None) -> float:
    try:
        return min(float(value), 60.0) if value else 0.0
    except ValueError:
        return 0.0
