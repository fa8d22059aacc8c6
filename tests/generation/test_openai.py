"""The OpenAI-compatible client against a scripted completions server on loopback."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from posttrain.generation import SamplingParams, build_backend
from posttrain.generation.openai import ServerError
from posttrain.generation.testing import forward_logprobs, transformers_greedy


class ScriptedServer:
    """Answers /v1/completions from the request itself; `failures` lists statuses to return first, in order."""

    def __init__(
        self,
        failures: list[int] | None = None,
        ids_as_strings: bool = False,
        fixed_choice: dict | None = None,
    ) -> None:
        self.failures = list(failures or [])
        self.ids_as_strings = ids_as_strings
        self.fixed_choice = fixed_choice
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(
                        {"path": self.path, "auth": self.headers.get("Authorization"), **body}
                    )
                    status = server.failures.pop(0) if server.failures else 200
                payload = server.respond(body) if status == 200 else {"error": {"message": "overloaded"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"

    def respond(self, body: dict) -> dict:
        """Sample k of prompt p: tokens p[-1]+k+1, ...; log-prob -(position+1)/10; the last one hits a stop."""
        if self.fixed_choice is not None:
            return {"choices": [self.fixed_choice]}
        last = body["prompt"][-1]
        choices = []
        for k in range(body["n"]):
            tokens = [last + k + 1 + i for i in range(body["max_tokens"])]
            logprobs = {"token_logprobs": [-(i + 1) / 10 for i in range(len(tokens))]}
            choice = {"index": k, "text": f"p{last}s{k}", "finish_reason": "stop" if k == 0 else "length"}
            if self.ids_as_strings:
                logprobs["tokens"] = [f"token_id:{t}" for t in tokens]
            else:
                choice["token_ids"] = tokens
            choices.append({**choice, "logprobs": logprobs})
        return {"id": "cmpl-1", "object": "text_completion", "choices": list(reversed(choices))}

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def server():
    scripted = ScriptedServer(failures=[503])
    yield scripted
    scripted.close()


def test_completions_map_back_to_prompts_with_token_ids_logprobs_and_retry(server):
    backend = build_backend("openai", base_url=server.base_url, model="tiny", api_key="k", backoff_s=0.01)
    prompts = [[5, 6, 10], [7, 20], [30]]
    outputs = backend.generate(
        prompts, SamplingParams(n=2, max_tokens=3, temperature=0.7, stop=["\n"], seed=11)
    )
    backend.close()

    assert len(server.requests) == len(prompts) + 1, "one 503 answered, then retried"
    for prompt, completions in zip(prompts, outputs, strict=True):
        assert [c.token_ids for c in completions] == [
            [prompt[-1] + k + 1 + i for i in range(3)] for k in range(2)
        ]
        assert [c.text for c in completions] == [f"p{prompt[-1]}s0", f"p{prompt[-1]}s1"]
        assert [c.finish_reason for c in completions] == ["stop", "length"]
        assert completions[1].logprobs == [-0.1, -0.2, -0.3]
    request = next(r for r in server.requests if r["prompt"] == [7, 20])
    assert request["path"] == "/v1/completions" and request["auth"] == "Bearer k"
    assert (request["n"], request["max_tokens"], request["temperature"], request["top_p"]) == (2, 3, 0.7, 1.0)
    assert (request["logprobs"], request["stop"], request["return_token_ids"]) == (1, ["\n"], True)
    assert sorted(r["seed"] for r in server.requests[1:]) == [11, 13, 15], "seed + prompt index * n"


def test_token_ids_are_parsed_from_token_id_strings():
    server = ScriptedServer(ids_as_strings=True)
    try:
        backend = build_backend("openai", base_url=server.base_url, model="tiny")
        (completion, _) = backend.generate([[41]], SamplingParams(n=2, max_tokens=2))[0]
    finally:
        server.close()
    assert completion.token_ids == [42, 43]


def test_tokens_a_server_returned_past_the_stop_string_are_cut_given_the_tokenizer(tokenizer):
    tokens = tokenizer.encode("seven plus two equals nine")
    late = {  # the server noticed the stop string "plus" only at the end, as vLLM can with partial UTF-8
        "index": 0,
        "text": "seven ",
        "finish_reason": "stop",
        "token_ids": tokens,
        "logprobs": {"token_logprobs": [-1.0] * len(tokens)},
    }
    server = ScriptedServer(fixed_choice=late)
    try:
        backend = build_backend("openai", base_url=server.base_url, model="tiny", tokenizer=tokenizer)
        (completion,) = backend.generate([[1]], SamplingParams(stop=["plus"]))[0]
    finally:
        server.close()
    cut = len(completion.token_ids)
    assert completion.token_ids == tokens[:cut] and len(completion.logprobs) == cut
    assert "plus" in tokenizer.decode(tokens[:cut]) and "plus" not in tokenizer.decode(tokens[: cut - 1])
    assert completion.text == "seven "


def test_client_errors_are_not_retried_and_name_the_status():
    server = ScriptedServer(failures=[400, 400])
    try:
        backend = build_backend("openai", base_url=server.base_url, model="tiny", backoff_s=0.01)
        with pytest.raises(ServerError, match="HTTP 400.*overloaded"):
            backend.generate([[1]], SamplingParams())
    finally:
        server.close()
    assert len(server.requests) == 1


def test_persistent_server_errors_give_up_after_the_retries():
    server = ScriptedServer(failures=[503] * 3)
    try:
        backend = build_backend(
            "openai", base_url=server.base_url, model="tiny", max_retries=2, backoff_s=0.01
        )
        with pytest.raises(ServerError, match="HTTP 503"):
            backend.generate([[1]], SamplingParams())
    finally:
        server.close()
    assert len(server.requests) == 3


def test_weight_sync_to_a_server_is_refused_with_the_alternatives(server):
    backend = build_backend("openai", base_url=server.base_url, model="tiny")
    with pytest.raises(NotImplementedError, match="colocated 'vllm' backend"):
        backend.sync_weights(None)


def test_unknown_backend_kind_is_named():
    with pytest.raises(ValueError, match="'sglang'"):
        build_backend("sglang")


@pytest.mark.vllm
@pytest.mark.slow
def test_against_a_real_vllm_server_logprobs_match_the_trainer(
    qwen2_dir, model, tokenizer, prompts, tmp_path
):
    """`vllm serve` (on CPU) with --logprobs-mode processed_logprobs: the client's numbers are the trainer's."""
    pytest.importorskip("vllm")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(qwen2_dir), "--host",
             "127.0.0.1", "--port", str(port), "--dtype", "float32", "--logprobs-mode", "processed_logprobs",
             "--enforce-eager", "--max-model-len", "256"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "vLLM server did not come up in 180 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        backend = build_backend("openai", base_url=f"http://127.0.0.1:{port}/v1", model=str(qwen2_dir))
        for params in (
            SamplingParams(max_tokens=12, temperature=0),
            SamplingParams(n=2, max_tokens=12, seed=0),
        ):
            for prompt, completions in zip(prompts, backend.generate(prompts, params), strict=True):
                for completion in completions:
                    if params.greedy:
                        assert completion.token_ids == transformers_greedy(model, prompt, 12)
                    reference = forward_logprobs(
                        model, prompt, completion.token_ids, params.logprob_temperature
                    )
                    logprobs = torch.tensor(completion.logprobs, dtype=torch.float64)
                    torch.testing.assert_close(logprobs, reference, atol=1e-4, rtol=0)
        backend.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
