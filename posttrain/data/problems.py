"""What every generated arithmetic problem is, and the two row formats it is written in: SFT conversations
with the `<think>` trace, and RL prompts with the answer for the math reward."""

from __future__ import annotations

from dataclasses import dataclass, field

SYSTEM_PROMPT = "Think step by step inside <think></think>, then give the answer as \\boxed{N}."


@dataclass(frozen=True)
class Problem:
    question: str
    steps: tuple[str, ...]
    answer: int
    kind: str = ""  # which generator made it (the hard tier's kinds)
    facts: dict[str, int] = field(default_factory=dict)  # the quantities in the question, by name

    def trace(self) -> str:
        return (
            "<think>\n"
            + "\n".join(self.steps)
            + "\n</think>\nThe answer is \\boxed{"
            + str(self.answer)
            + "}."
        )


def prompt_messages(problem: Problem) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": problem.question}]


def sft_row(problem: Problem) -> dict:
    return {"messages": [*prompt_messages(problem), {"role": "assistant", "content": problem.trace()}]}


def rl_row(problem: Problem) -> dict:
    return {"prompt": prompt_messages(problem), "answer": str(problem.answer)}
