"""A shallower student cut from its teacher (posttrain.model.student, `posttrain convert --keep-layers`)."""

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from posttrain import cli
from posttrain.data.chat import conversation_token_ids, encode_conversation
from posttrain.data.rows import DataError
from posttrain.model.gguf import GGUFError
from posttrain.model.student import choose_layers, keep_layers, layer_changes


@pytest.fixture
def tiny_qwen2(tiny_qwen2_config_path):
    config = AutoConfig.for_model(
        **{**json.loads(open(tiny_qwen2_config_path).read()), "num_hidden_layers": 4}
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def pass_through(layer: torch.nn.Module) -> None:
    """Make a decoder layer the identity: its attention and MLP outputs are zero, the residual passes."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def test_layer_changes_are_the_mean_angle_between_each_layers_input_and_output(tiny_qwen2):
    pass_through(tiny_qwen2.model.layers[3])  # the last layer: its change must not include the final norm
    samples = [[5, 9, 2, 7, 11], [3, 4, 8]]
    changes = layer_changes(tiny_qwen2, samples)
    expected, tokens = [0.0] * 4, 0
    for ids in samples:  # the model's hidden_states: input of layer l is entry l, its output entry l + 1
        with torch.no_grad():
            states = tiny_qwen2(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        for layer in range(3):
            for before, after in zip(states[layer][0].double(), states[layer + 1][0].double(), strict=True):
                cosine = float(before @ after / (before.norm() * after.norm()))
                expected[layer] += math.acos(max(-1.0, min(1.0, cosine))) / math.pi
        tokens += len(ids)
    assert changes[:3] == pytest.approx([e / tokens for e in expected[:3]], rel=1e-9, abs=1e-12)
    assert changes[3] == pytest.approx(0.0, abs=1e-6)
    assert all(0 < c <= 1 for c in changes[:3])
    assert choose_layers(4, 3, changes) == [0, 1, 2]  # the pass-through layer goes first


def test_choose_layers_evenly_or_by_change():
    assert choose_layers(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert choose_layers(5, 1) == [0]
    assert choose_layers(5, 3, [0.5, 0.1, 0.3, 0.3, 0.2]) == [0, 2, 3]  # largest three, in layer order
    assert choose_layers(4, 2, [0.2, 0.2, 0.2, 0.1]) == [0, 1]  # ties go to the earlier layer
    with pytest.raises(ValueError, match="keep 31 layers: not between 1 and the model's 30 layers"):
        choose_layers(30, 31)
    with pytest.raises(ValueError, match="3 layer changes for a model of 4 layers"):
        choose_layers(4, 2, [0.1, 0.2, 0.3])


def test_kept_layers_are_renumbered_and_compute_as_in_the_teacher(tiny_qwen2):
    ids = torch.tensor([[5, 9, 2, 7, 11]])
    pass_through(tiny_qwen2.model.layers[1])
    with torch.no_grad():
        before = tiny_qwen2(input_ids=ids).logits
        student = keep_layers(tiny_qwen2, [0, 2, 3])  # dropping the identity changes nothing
        after = student(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    assert student.config.num_hidden_layers == 3


def test_calibration_rows_must_be_conversations(write_jsonl, tokenizer):
    good = write_jsonl(
        "good.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    assert conversation_token_ids([good], tokenizer) == [
        encode_conversation(
            tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        )[0]
    ]
    prompts = write_jsonl("prompts.jsonl", [{"prompt": "hi"}])
    with pytest.raises(DataError, match=r"prompts.jsonl.*calibration rows need a `messages` column"):
        conversation_token_ids([prompts], tokenizer)
    bad = write_jsonl(
        "bad.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "robot", "content": "x"}]},
        ],
    )
    with pytest.raises(DataError, match=r"bad.jsonl.*line 2.*messages\[0\]\.role"):
        conversation_token_ids([bad], tokenizer)


def assistant_loss(model, tokenizer, conversations) -> float:
    total, count = 0.0, 0
    for messages in conversations:
        ids, targets = encode_conversation(tokenizer, messages)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        picked = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        mask = torch.tensor(targets[1:])
        total, count = total - picked[mask].sum().item(), count + int(mask.sum())
    return total / count


@pytest.mark.slow
def test_a_calibrated_cut_of_smollm2_keeps_more_of_it_than_evenly_spaced_layers(
    tmp_path, smollm2_dir, repo_root, capsys
):
    """The real model (30 layers) cut to 20: the layers that turn its hidden state most on 32 SFT traces leave a
    lower loss on other traces than 20 evenly spaced ones (bench/student_cut.py: 3.9 against 7.5 nats)."""
    traces = str(repo_root / "data" / "arith_hard" / "sft.jsonl")
    calibrated, even = tmp_path / "calibrated", tmp_path / "even"
    assert (
        cli.main(
            ["convert", str(smollm2_dir), str(calibrated), "--keep-layers", "20", "--calibration", traces]
        )
        == 0
    )
    assert cli.main(["convert", str(smollm2_dir), str(even), "--keep-layers", "20"]) == 0
    held_out = [json.loads(line)["messages"] for line in open(traces)][32:40]
    tokenizer = AutoTokenizer.from_pretrained(calibrated)
    losses = {
        name: assistant_loss(AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer, held_out)
        for name, path in (("calibrated", calibrated), ("even", even))
    }
    assert AutoConfig.from_pretrained(calibrated).num_hidden_layers == 20
    assert losses["calibrated"] < losses["even"] - 1.0, losses
    with pytest.raises(GGUFError, match="give --keep-layers too"):
        from posttrain.model.gguf import convert_checkpoint

        convert_checkpoint(str(smollm2_dir), tmp_path / "x", calibration=[[1, 2, 3]])
