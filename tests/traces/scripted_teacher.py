"""A scripted teacher implementing the generation Backend protocol, for trace tests: it reads the question out of
the templated prompt and answers with a chosen text, so which samples are right is known in advance."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable

from posttrain.data.arithmetic import Problem
from posttrain.generation.base import Completion, SamplingParams, check_prompts

Respond = Callable[[str, int, int], str]  # (question, sample index, seed) -> completion text

_QUESTION = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.DOTALL)


class ScriptedBackend:
    def __init__(
        self, tokenizer, respond: Respond, delay_s: float = 0.0, fail: Callable[[str], bool] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.respond = respond
        self.delay_s = delay_s
        self.fail = fail or (lambda question: False)
        self.calls: list[int] = []  # batch sizes of generate calls

    def question(self, ids: list[int]) -> str:
        return _QUESTION.findall(self.tokenizer.decode(ids))[-1]

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        check_prompts(prompt_ids)
        self.calls.append(len(prompt_ids))
        time.sleep(self.delay_s)
        questions = [self.question(ids) for ids in prompt_ids]
        for question in questions:
            if self.fail(question):
                raise ConnectionError(f"endpoint error on {question[:30]!r}")
        out = []
        for question in questions:
            group = []
            for k in range(params.n):
                text = self.respond(question, k, params.seed or 0)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [
                    self.tokenizer.eos_token_id
                ]
                group.append(Completion(ids, text, [0.0] * len(ids), "stop"))
            out.append(group)
        return out

    def sync_weights(self, model) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def solve(question: str) -> Problem:
    """The bundled arithmetic task's three templates (posttrain.data.arithmetic.make_problem), solved."""
    numbers = [int(x) for x in re.findall(r"\d+", question)]
    if "gives away" in question:
        a, b, c = numbers
        return Problem(question, (f"{a} + {b} = {a + b}", f"{a + b} - {c} = {a + b - c}"), a + b - c)
    if "boxes" in question:
        a, b, c = numbers
        return Problem(question, (f"{a} * {b} = {a * b}", f"{a * b} + {c} = {a * b + c}"), a * b + c)
    a, b = numbers
    return Problem(question, (f"{a} - {b} = {a - b}",), a - b)


def unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) for the given parts."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def arithmetic_teacher(wrong_rate: float) -> Respond:
    """Right most of the time: a fraction `wrong_rate` of samples ends with an answer off by one."""

    def respond(question: str, k: int, seed: int) -> str:
        problem = solve(question)
        if unit_hash(question, k, seed) < wrong_rate:
            problem = Problem(problem.question, problem.steps, problem.answer + 1)
        return problem.trace()

    return respond
