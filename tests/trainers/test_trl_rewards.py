"""Rewards move between posttrain and TRL unchanged, both ways.

posttrain's rewards as TRL 1.16 `GRPOTrainer` reward_funcs (TRL calls them by keyword with its own extra
arguments; conversational completions are message lists), and TRL-style rewards (`trl.rewards`, or a user's
`def reward(completions, **kwargs)` that indexes message lists) in a posttrain recipe via `completions_as`.
"""

from __future__ import annotations

import json

import pytest
import torch

from rewards import RewardRunner, RewardSpec, code_pass, math_accuracy, r1_format
from tests.trainers.test_grpo_trainer import rows, tiny_policy, write_recipe  # noqa: F401 (a fixture)

trl = pytest.importorskip("trl")

# What the scripted policy writes, and what math_accuracy and r1_format give each text by hand, per reference.
SCRIPT = ["<think>2 and 2</think> \\boxed{4}", "\\boxed{4}", "<think>hm</think> \\boxed{5}", "no idea"]
BY_HAND = {  # (completion, answer) -> (math_accuracy, r1_format)
    (SCRIPT[0], "4"): (1.0, 1.0),
    (SCRIPT[1], "4"): (1.0, 0.0),
    (SCRIPT[2], "4"): (0.0, 1.0),
    (SCRIPT[3], "4"): (0.0, 0.0),
    (SCRIPT[0], "5"): (0.0, 1.0),
    (SCRIPT[1], "5"): (0.0, 0.0),
    (SCRIPT[2], "5"): (1.0, 1.0),
    (SCRIPT[3], "5"): (0.0, 0.0),
}
QUESTIONS = {"What is 2 + 2?": "4", "What is 2 + 3?": "5"}


def _text(item: str | list[dict]) -> str:
    return item if isinstance(item, str) else item[-1]["content"]


@pytest.mark.parametrize("conversational", [True, False], ids=["messages", "plain"])
def test_posttrain_rewards_in_trl_grpo_trainer(
    tmp_path, tiny_qwen2_config_path, tokenizer_dir, conversational
):
    """One TRL GRPO step with math_accuracy and r1_format as reward_funcs: TRL logs, per completion, exactly
    the hand-derived scores and what our functions give when called directly on the same completions."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    script_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in SCRIPT]

    class ScriptedGRPOTrainer(GRPOTrainer):
        """Samples nothing: the i-th completion of each prompt's group is SCRIPT[i] (TRL repeats each prompt
        num_generations times in a row), so the rewards have known values."""

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            return [list(script_ids[i % len(SCRIPT)]) for i in range(len(prompt_ids))], None

    rows = [
        {"prompt": [{"role": "user", "content": q}] if conversational else q, "answer": a}
        for q, a in QUESTIONS.items()
    ]
    torch.manual_seed(0)
    config = AutoConfig.for_model(**json.loads(open(tiny_qwen2_config_path).read()))
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=2 * len(SCRIPT),
        num_generations=len(SCRIPT),
        max_completion_length=32,
        max_steps=1,
        learning_rate=1e-4,
        beta=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = ScriptedGRPOTrainer(
        model=AutoModelForCausalLM.from_config(config),
        reward_funcs=[math_accuracy, r1_format],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    try:
        trainer.train()
    finally:  # TRL's Accelerator state is process-global: later runs in this process set up their own
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)

    prompts, completions = list(trainer._logs["prompt"]), list(trainer._logs["completion"])
    assert len(completions) == 2 * len(SCRIPT)
    assert all(isinstance(c, list) for c in completions) == conversational  # TRL's own shapes reached us
    answers = [QUESTIONS[_text(prompt) if conversational else prompt] for prompt in prompts]
    texts = [_text(completion) for completion in completions]
    logged_math = list(trainer._logs["rewards"]["math_accuracy"])
    logged_format = list(trainer._logs["rewards"]["r1_format"])
    assert logged_math == [BY_HAND[text, answer][0] for text, answer in zip(texts, answers, strict=True)]
    assert logged_format == [BY_HAND[text, answer][1] for text, answer in zip(texts, answers, strict=True)]
    assert logged_math == math_accuracy(prompts, texts, answers)
    assert logged_format == r1_format(prompts, texts)
    logged = trainer.state.log_history[0]
    assert logged["rewards/math_accuracy/mean"] == pytest.approx(sum(logged_math) / len(logged_math))


def test_code_reward_takes_trls_call():
    """code_pass called exactly as TRL calls a reward (keywords, trainer extras, a message-list completion)."""
    pytest.importorskip("sandbox")
    completion = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = completion.replace("a + b", "a - b")
    scores = code_pass(
        prompts=[[{"role": "user", "content": "Write add."}]] * 2,
        completions=[
            [{"role": "assistant", "content": completion}],
            [{"role": "assistant", "content": wrong}],
        ],
        completion_ids=[[1, 2], [3]],
        trainer_state=object(),
        log_extra=lambda column, values: None,
        log_metric=lambda name, value: None,
        tests=["def check(f):\n    assert f(2, 3) == 5\n"] * 2,
        entry_point=["add"] * 2,
    )
    assert scores == [1.0, 0.0]


def test_trl_reward_functions_run_in_the_reward_runner():
    """`trl.rewards.think_format_reward` indexes completion[0]["content"]: it gets message lists when its spec
    says completions_as="messages", and fails (scored None, counted) on plain strings."""
    prompts = [[{"role": "user", "content": "2+2?"}]] * 3
    completions = ["<think>\nadd\n</think>\n4", "4", "<think>\nadd\n4"]
    name = "trl.rewards:think_format_reward"
    with RewardRunner([RewardSpec(name, completions_as="messages")], workers=1, timeout_s=60) as runner:
        assert runner.score(prompts, completions).per_function[name] == [1.0, 0.0, 0.0]
    with RewardRunner([RewardSpec(name)], workers=1, timeout_s=60) as runner:
        scores = runner.score(prompts, completions)
    assert scores.per_function[name] == [None, None, None] and scores.error_counts[name] == 3
    with pytest.raises(ValueError, match="completions_as='message'"):
        RewardRunner([RewardSpec(name, completions_as="message")])


def test_trl_style_rewards_in_a_posttrain_grpo_run(tmp_path, tiny_policy, repo_root):  # noqa: F811
    """A posttrain recipe names TRL's think_format_reward and a user's TRL-style reward by import path with
    completions_as=messages. Two prompts × two completions, samples: 4 — samples.jsonl then holds every
    completion of the step (best and worst of each group), so the rewards can be recomputed by hand from the
    texts: per sample, and as the step's means in metrics.jsonl."""
    from posttrain.config import GRPORecipe, load_recipe
    from posttrain.trainers.grpo import train_grpo

    even, think = "tests.trainers.trl_style_rewards:even_length", "trl.rewards:think_format_reward"
    functions = [
        {"name": "math_accuracy"},
        {"name": even, "weight": 0.5, "completions_as": "messages"},
        {"name": think, "completions_as": "messages"},
    ]
    overrides = [
        f"rewards.functions={json.dumps(functions)}",
        "rewards.timeout_s=60",  # a worker's first call imports trl: no deadline misses on a loaded machine
        "grpo.prompts_per_step=2",
        "grpo.num_generations=2",
        "train.max_steps=1",
        "logging.samples=4",
        "data.eval=[]",
    ]
    model_dir = train_grpo(
        load_recipe(write_recipe(tmp_path, tiny_policy, repo_root, "run"), GRPORecipe, overrides)
    )
    out = model_dir.parent
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["group"], s["pick"]) for s in samples] == [
        (1, 0, "best"),
        (1, 0, "worst"),
        (1, 1, "best"),
        (1, 1, "worst"),
    ]
    for s in samples:
        text = s["completion"]
        by_hand = {
            even: float(len(text) % 2 == 0),
            think: float(text.startswith("<think>") and "</think>" in text),
        }
        assert {k: s["rewards"][k] for k in by_hand} == by_hand
        assert s["reward_total"] == pytest.approx(
            s["rewards"]["math_accuracy"] + 0.5 * by_hand[even] + by_hand[think]
        )
        assert s["reward_total"] in s["group_rewards"]
        assert s["prompt"] and not s["prompt"].startswith(
            "Think step by step"
        )  # the user's turn, not the system's
    (step,) = rows(out)
    assert step[f"reward/{even}"] == pytest.approx(sum(len(s["completion"]) % 2 == 0 for s in samples) / 4)
    assert step[f"reward/{think}"] == pytest.approx(sum(s["rewards"][think] for s in samples) / 4)
    view = (out / "report.md").read_text()
    assert "## Step 1" in view and samples[0]["completion"] in view and "![metrics](report.png)" in view
