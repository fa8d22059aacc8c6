import dataclasses
import json

import pytest
import torch

from posttrain.evals.pairs import conversation, load_pairs
from posttrain.evals.rewardbench import classifier_rewards, load_classifier, score_with_classifier
from posttrain.evals.scoring import subset_accuracies


@pytest.fixture(scope="module")
def classifier(reward_model_dir):
    return load_classifier(reward_model_dir)


@pytest.fixture(scope="module")
def pairs(bundled_pairs):
    return load_pairs(bundled_pairs)[::3]


def _reference_reward(model, tokenizer, prompt, response):
    """One unpadded forward pass over the chat-templated text: the last token's logit."""
    text = tokenizer.apply_chat_template(conversation(prompt, response), tokenize=False)
    assert text == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>\n"
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        return float(model(input_ids=input_ids).logits[0, 0])


def test_batched_rewards_match_unbatched_forward(classifier, pairs):
    model, tokenizer = classifier
    results = score_with_classifier(pairs, model, tokenizer, batch_size=5, max_length=2048)
    for pair, result in zip(pairs, results, strict=True):
        assert result.chosen_reward == pytest.approx(
            _reference_reward(model, tokenizer, pair.prompt, pair.chosen), abs=1e-4
        )
        assert result.rejected_reward == pytest.approx(
            _reference_reward(model, tokenizer, pair.prompt, pair.rejected), abs=1e-4
        )
        assert result.score == float(result.chosen_reward > result.rejected_reward)


def test_truncation_keeps_the_end_of_the_conversation(classifier, pairs):
    model, tokenizer = classifier
    chat = conversation(pairs[0].prompt, pairs[0].chosen)
    token_ids = tokenizer(tokenizer.apply_chat_template(chat, tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]
    with torch.inference_mode():
        expected = float(model(input_ids=torch.tensor([token_ids[-12:]])).logits[0, 0])
    assert classifier_rewards(model, tokenizer, [chat], batch_size=1, max_length=12) == [
        pytest.approx(expected)
    ]


def test_swapping_chosen_and_rejected_flips_accuracy(classifier, pairs):
    model, tokenizer = classifier
    results = score_with_classifier(pairs, model, tokenizer, batch_size=8, max_length=2048)
    assert all(r.chosen_reward != r.rejected_reward for r in results)  # no ties, so the flip is exact
    swapped = [dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen) for p in pairs]
    swapped_results = score_with_classifier(swapped, model, tokenizer, batch_size=3, max_length=2048)
    accuracy, swapped_accuracy = subset_accuracies(results), subset_accuracies(swapped_results)
    assert (
        0 < sum(r.score for r in results) < len(results)
    )  # a random model is neither always right nor wrong
    for subset, value in accuracy.items():
        assert swapped_accuracy[subset] == pytest.approx(1 - value)


def test_reward_model_must_have_one_output(tmp_path, reward_model_dir):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(reward_model_dir, num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(reward_model_dir).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_labels=1"):
        load_classifier(tmp_path)
    with pytest.raises(FileNotFoundError, match="reward model directory not found"):
        load_classifier(tmp_path / "absent")


def test_model_without_pad_id_uses_the_tokenizer_pad(tmp_path, reward_model_dir, pairs):
    import shutil

    model_dir = shutil.copytree(reward_model_dir, tmp_path / "rm")
    config = json.loads((model_dir / "config.json").read_text())
    config["pad_token_id"] = None
    (model_dir / "config.json").write_text(json.dumps(config))
    model, tokenizer = load_classifier(model_dir)
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    batched = score_with_classifier(pairs, model, tokenizer, batch_size=6, max_length=2048)
    for pair, result in zip(pairs, batched, strict=True):
        assert result.chosen_reward == pytest.approx(
            _reference_reward(model, tokenizer, pair.prompt, pair.chosen), abs=1e-4
        )
