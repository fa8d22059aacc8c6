"""LLM judges: verdict and score parsing, an OpenAI-compatible endpoint faked on loopback (with failures to
exercise retries), and a tiny local transformers model trained here to give one fixed verdict."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rewards import (
    OpenAIChatGenerator,
    PairwiseJudge,
    PointwiseJudge,
    RewardRunner,
    RewardSpec,
    TransformersGenerator,
    parse_pairwise_verdict,
    parse_pointwise_score,
)
from rewards.judge import LETTER_TEMPLATE, GenerationError, render


def test_parse_pairwise_verdict():
    assert parse_pairwise_verdict("A is more accurate. [[A]]") == "A"
    assert parse_pairwise_verdict("Final verdict: [[ b ]]") == "B"
    assert parse_pairwise_verdict("[[C]]") == "tie"
    assert parse_pairwise_verdict("It is a [[tie]]") == "tie"
    assert parse_pairwise_verdict("Format is [[A]] or [[B]]... I pick [[B]]") == "unparseable"  # two verdicts
    assert parse_pairwise_verdict("Assistant A is better.") == "unparseable"
    assert parse_pairwise_verdict("[[D]]") == "unparseable"
    # A first line that is the verdict alone (what LETTER_TEMPLATE asks for), in the forms small models write.
    for text, verdict in [
        ("A", "A"),
        (" **B**", "B"),
        ("[A]", "A"),
        ("B.\nIt is shorter.", "B"),
        ("Answer a", "A"),
    ]:
        assert parse_pairwise_verdict(text) == verdict, text
    assert parse_pairwise_verdict("[[B]]\nA") == "B"  # the bracketed verdict wins over a bare line
    # Prose that starts with the letter is no verdict ("A" is also an article), nor is an echoed answer.
    for text in [
        "A good answer is B",
        "A: green\nwhite",
        'A: A: "A" is the correct answer.',
        "The answer is A",
    ]:
        assert parse_pairwise_verdict(text) == "unparseable", text


def test_parse_pointwise_score():
    assert parse_pointwise_score("Good answer. Rating: [[8]]") == 8.0
    assert parse_pointwise_score("rating: 7.5") == 7.5
    assert parse_pointwise_score("Rating: [[8]] ... Rating: [[8]]") == 8.0
    assert parse_pointwise_score("[[3]] then [[9]]") is None
    assert parse_pointwise_score("[[11]]") is None
    assert parse_pointwise_score("[[0]]") is None
    assert parse_pointwise_score("no rating here") is None


def test_render_names_a_missing_field():
    assert render("{prompt}|{response}", prompt="p", response="r") == "p|r"
    with pytest.raises(KeyError, match="asks for field 'answer'"):
        render("{answer}", prompt="p")


# ---------------------------------------------------------------- a fake OpenAI-compatible endpoint


class FakeEndpoint:
    """Serves /v1/chat/completions on loopback. ``script`` is a list of (status, content or delay) popped
    per request, then ``answer(user_text)`` decides the content."""

    def __init__(self, answer):
        self.answer, self.script, self.requests = answer, [], []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append((self.path, dict(self.headers), body))
                status, extra = endpoint.script.pop(0) if endpoint.script else (200, None)
                if status == "sleep":
                    time.sleep(extra)
                    status = 200
                if status != 200:
                    self.send_response(status)
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(b'{"error": "scripted failure"}')
                    return
                content = endpoint.answer(body["messages"][-1]["content"])
                payload = json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": content}}]}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def prefers_correct(user_text):
    """A judge that reads both answers and prefers the one saying 'correct'; it ties when neither does."""
    a = re.search(r"Assistant A's Answer\]\n(.*?)\n\[The End", user_text, re.DOTALL).group(1)
    b = re.search(r"Assistant B's Answer\]\n(.*?)\n\[The End", user_text, re.DOTALL).group(1)
    if "correct" in a and "correct" not in b:
        return "A is right. [[A]]"
    if "correct" in b and "correct" not in a:
        return "B is right. [[B]]"
    return "Neither. [[C]]" if "correct" not in a else "I cannot tell."


@pytest.fixture
def endpoint():
    server = FakeEndpoint(prefers_correct)
    yield server
    server.close()


def test_http_generator_retries_transient_failures(endpoint):
    endpoint.answer = lambda text: f"echo: {text}"
    endpoint.script = [(500, None), (429, None), (503, None)]
    generate = OpenAIChatGenerator(endpoint.url, "judge-model", api_key="k", backoff_s=0.01, retries=3)
    assert generate([[{"role": "user", "content": "hi"}]]) == ["echo: hi"]
    assert len(endpoint.requests) == 4
    path, headers, body = endpoint.requests[-1]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert body["messages"] == [{"role": "user", "content": "hi"}]


def test_http_generator_gives_up_clearly(endpoint):
    endpoint.script = [(400, None)]
    generate = OpenAIChatGenerator(endpoint.url, "m", backoff_s=0.01)
    with pytest.raises(GenerationError, match=r"HTTP 400 .*scripted failure.*\(after 1 attempt"):
        generate([[{"role": "user", "content": "x"}]])  # a bad request is not retried
    endpoint.script = [("sleep", 1.0)] * 3
    generate = OpenAIChatGenerator(endpoint.url, "m", timeout_s=0.2, retries=2, backoff_s=0.01)
    with pytest.raises(GenerationError, match="after 3 attempt"):
        generate([[{"role": "user", "content": "x"}]])
    dead = OpenAIChatGenerator(
        "http://127.0.0.1:9/v1", "m", retries=1, backoff_s=0.01
    )  # nothing listens there
    with pytest.raises(GenerationError, match="after 2 attempt"):
        dead([[{"role": "user", "content": "x"}]])


def test_pairwise_judge_over_http_maps_both_orders_back(endpoint):
    judge = PairwiseJudge(OpenAIChatGenerator(endpoint.url, "m", concurrency=4), votes=2)
    verdicts = judge.verdicts(
        ["q1", "q2", "q3", "q4"],
        ["correct: 4", "5", "no idea", "correct"],
        ["4 and 5", "correct: 4", "no clue", "correct too"],
    )
    assert verdicts[0] == ["A"] * 4  # a is better in both orders: the swapped verdicts are mapped back
    assert verdicts[1] == ["B"] * 4
    assert verdicts[2] == ["tie"] * 4
    assert verdicts[3] == ["unparseable"] * 4
    assert judge.unparseable == 4
    assert len(endpoint.requests) == 4 * 2 * 2


def test_position_bias_shows_in_the_two_orders(endpoint):
    endpoint.answer = lambda text: "[[A]]"  # always the first answer shown
    judge = PairwiseJudge(
        OpenAIChatGenerator(endpoint.url, "m"), template="{prompt} {response_a} {response_b}"
    )
    assert judge.verdicts(["q"], ["a"], ["b"]) == [["A", "B"]]
    one_order = PairwiseJudge(OpenAIChatGenerator(endpoint.url, "m"), both_orders=False)
    assert one_order.verdicts(["q"], ["a"], ["b"]) == [["A"]]


def test_letter_template_judge_reads_bare_letters_in_both_orders(endpoint):
    """A small judge asked for the letter only: its bare letters are verdicts, mapped back in the swapped order."""
    endpoint.answer = lambda text: "**A**\n" if "Answer A: Paris" in text else "B."
    judge = PairwiseJudge(OpenAIChatGenerator(endpoint.url, "m"), template=LETTER_TEMPLATE)
    assert judge.verdicts(["Capital of France?"], ["Paris"], ["Lyon"]) == [["A", "A"]]
    assert judge.verdicts(["Capital of France?"], ["Lyon"], ["Paris"]) == [["B", "B"]]
    assert judge.unparseable == 0
    _, _, body = endpoint.requests[0]
    assert body["messages"][0]["content"].startswith("Question: Capital of France?")


def test_pointwise_judge_as_a_reward_in_the_runner(endpoint, monkeypatch):
    endpoint.answer = lambda text: (
        "Rating: [[10]]" if "Paris" in text else ("[[4]]" if "Lyon" in text else "?")
    )
    monkeypatch.setenv("TEST_JUDGE_KEY", "secret")
    spec = RewardSpec(
        "llm_judge", kwargs={"base_url": endpoint.url, "model": "m", "api_key_env": "TEST_JUDGE_KEY"}
    )
    with RewardRunner([spec], workers=2, timeout_s=10) as runner:
        scores = runner.score(["Capital of France?"] * 3, ["Paris", "Lyon", "Marseille"])
    assert scores.per_function["llm_judge"] == [1.0, pytest.approx(3 / 9), None]
    assert {headers["Authorization"] for _, headers, _ in endpoint.requests} == {"Bearer secret"}
    judge = PointwiseJudge(OpenAIChatGenerator(endpoint.url, "m"), template="{prompt} {response} {answer}")
    assert judge(["q"], ["Lyon"], answer=["Paris"]) == [1.0]  # the reference column reaches the template
    assert judge.unparseable == 0


# ---------------------------------------------------------------- a tiny local model

TEMPLATE = "Q: {prompt}\nA: {response_a}\nB: {response_b}\nVerdict?"


@pytest.fixture(scope="module")
def trained_judge_model():
    """A tiny random Qwen2 with the repository's tokenizer, trained for a few steps to answer every judge
    prompt with ``[[B]]``: a judge with a pure position bias."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, two spinning threads are ~20x slower than one
    tokenizer = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[2] / "data" / "tokenizer")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    words = "sum two four five cat dog red blue seven yes no maybe".split()
    target_ids = tokenizer("[[B]]", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = []
        for _ in range(8):
            picks = [words[i] for i in torch.randint(len(words), (3,), generator=generator)]
            content = TEMPLATE.format(prompt=picks[0], response_a=picks[1], response_b=picks[2])
            messages = [{"role": "user", "content": content}]
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            batch.append((prompt_ids + target_ids, len(prompt_ids)))
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = input_ids.clone()
        for row, (ids, prompt_length) in enumerate(batch):
            labels[row, :prompt_length] = -100
            labels[row, len(ids) :] = -100
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.02:
            break
    assert loss.item() < 0.05
    yield model, tokenizer
    torch.set_num_threads(threads)


def test_local_model_judge(trained_judge_model):
    model, tokenizer = trained_judge_model
    generate = TransformersGenerator(model, tokenizer, max_new_tokens=8, batch_size=4)
    judge = PairwiseJudge(generate, template=TEMPLATE)
    verdicts = judge.verdicts(
        ["sum", "red dog", "yes"], ["four", "blue", "no no maybe"], ["five", "cat", "seven"]
    )
    assert verdicts == [["B", "A"]] * 3  # "[[B]]" whatever is shown: the swapped order maps it back to A
    assert judge.unparseable == 0
    pointwise = PointwiseJudge(generate, template="{prompt} {response}")
    assert pointwise(["q"], ["a"]) == [None] and pointwise.unparseable == 1  # "[[B]]" is no 1-10 rating


def test_local_generator_batches_like_single_prompts(trained_judge_model):
    model, tokenizer = trained_judge_model
    conversations = [[{"role": "user", "content": text}] for text in ["sum", "red dog cat blue seven", "no"]]
    batched = TransformersGenerator(model, tokenizer, max_new_tokens=6, batch_size=3)(conversations)
    single = TransformersGenerator(model, tokenizer, max_new_tokens=6, batch_size=1)(conversations)
    assert batched == single
    assert len(batched) == 3 and all(isinstance(text, str) for text in batched)
