"""Compiled decoder blocks: packs of new lengths reuse the compiled graph (the token dimension is marked
dynamic), and `train.compile_blocks: auto` switches them on for CUDA only. (On CPU the varlen attention reads
the sample offsets on the host, a graph break; on CUDA it does not, and bench/sft_gpu.py records the graphs
compiled in the process.)"""

from __future__ import annotations

import json

import torch
from torch._dynamo.utils import counters
from transformers import AutoConfig, AutoModelForCausalLM

from posttrain.config import TrainSection
from posttrain.fast.backbone import compile_decoder_layers
from posttrain.trainers.loop import compile_blocks_enabled


def _packed(lengths: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return torch.randint(
        3, vocab, positions.shape, generator=torch.Generator().manual_seed(len(lengths))
    ), positions


def test_new_pack_lengths_do_not_recompile_the_blocks(tiny_qwen2_config_path):
    config = AutoConfig.for_model(**json.loads(open(tiny_qwen2_config_path).read()))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    eager.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    counters.clear()
    # The "eager" backend: dynamo's capture and guards without Inductor's compile time.
    compile_decoder_layers(model, backend="eager")
    for lengths in ([20, 13], [7, 30, 9, 11], [48, 2]):  # 33, 57 and 50 tokens in one packed row
        input_ids, positions = _packed(lengths, config.vocab_size)
        with torch.no_grad():
            got = model(input_ids=input_ids, position_ids=positions, use_cache=False).logits
            want = eager(input_ids=input_ids, position_ids=positions, use_cache=False).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # One graph for every layer and every length (the packed-sample mask [1, 1, S, S] included): the first call
    # compiles, later lengths pass its guards. Unmarked, each new length would compile a graph of its own.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compile_blocks_auto_is_on_for_cuda_only():
    auto = TrainSection()
    assert auto.compile_blocks == "auto"
    assert compile_blocks_enabled(auto, torch.device("cuda")) is True
    assert compile_blocks_enabled(auto, torch.device("cpu")) is False
    assert compile_blocks_enabled(auto, torch.device("cuda"), decodes_with_policy=True) is False
    assert compile_blocks_enabled(auto, torch.device("cuda"), moe_model=True) is False
    assert compile_blocks_enabled(TrainSection(compile_blocks=True), torch.device("cpu")) is True
    assert compile_blocks_enabled(TrainSection(compile_blocks=False), torch.device("cuda")) is False
