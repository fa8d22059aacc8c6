"""The training step's packed-sample layout without GPU→host syncs: the loader computes the samples' offsets on
the host from the packer's lengths (`collate_packs`), equal to those found from the position ids; the bound on
the sample length is the row length, so compiled blocks see one value whatever the packs hold. (The model's logits
through the collated offsets: tests/fast/test_fast_paths_model.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from posttrain.data.packing import PackedDataset, TokenizedSamples, collate_packs, plan_packs
from posttrain.fast.attention import PackedSamples, cu_seqlens_from_position_ids, packed_attention_kwargs
from posttrain.fast.backbone import compile_decoder_layers

CAPACITY = 48


def packed_dataset(seed: int, n: int = 23, vocab: int = 100) -> PackedDataset:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, CAPACITY + 1, n)
    lengths[0] = CAPACITY  # one full pack: no padding tail
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(3, vocab, offsets[-1])
    samples = TokenizedSamples(tokens, rng.random(tokens.size) < 0.7, offsets)
    return PackedDataset(samples, plan_packs(lengths, CAPACITY), pad_id=0)


def test_collated_offsets_are_those_of_the_position_ids():
    dataset = packed_dataset(0)
    assert len(dataset) >= 4
    for ids in ([0], [1, 2], list(range(len(dataset)))):
        packs = [dataset[i] for i in ids]
        batch = collate_packs(packs, torch.device("cpu"))
        for name in ("input_ids", "position_ids", "loss_mask"):
            torch.testing.assert_close(batch[name], torch.stack([p[name] for p in packs]), rtol=0, atol=0)
        want, longest = cu_seqlens_from_position_ids(batch["position_ids"])
        assert batch["cu_seqlens"].dtype == torch.int32
        assert batch["cu_seqlens"].tolist() == want.tolist()
        samples = PackedSamples.of_rows(batch["position_ids"], batch["cu_seqlens"])
        assert samples.cu_seqlens is batch["cu_seqlens"]  # used as given: nothing recomputed on the device
        assert samples.max_length == CAPACITY >= longest


def test_collate_and_packed_samples_reject_bad_offsets():
    pack = packed_dataset(1)[0]
    with pytest.raises(ValueError, match="seq_lens sum to"):
        collate_packs([{**pack, "seq_lens": pack["seq_lens"][:-1]}], torch.device("cpu"))
    with pytest.raises(ValueError, match="at least one pack"):
        collate_packs([], torch.device("cpu"))
    rows = pack["position_ids"][None]
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):
        PackedSamples.of_rows(rows, torch.tensor([0, CAPACITY]))
    with pytest.raises(ValueError, match="position_ids must be \\[B, S\\]"):
        PackedSamples.of_rows(rows[0])


class _Block(torch.nn.Module):
    """Uses the varlen keyword arguments as the CUDA kernel call does: the offsets tensor and the int bound."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, hidden_states: torch.Tensor, **kwargs: torch.Tensor | int) -> torch.Tensor:
        cu_seqlens, max_length = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
        return self.proj(hidden_states) * max_length + cu_seqlens[1:].sum()


def test_packs_of_other_sample_lengths_do_not_recompile_the_blocks():
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([_Block(), _Block()])
    torch._dynamo.reset()
    counters.clear()
    compile_decoder_layers(model, backend="eager")
    dataset = packed_dataset(3)
    for ids in ([0, 1], [2, 3], [1, 4]):  # different sample counts and longest samples, rows of CAPACITY
        batch = collate_packs([dataset[i] for i in ids], torch.device("cpu"))
        kwargs = packed_attention_kwargs(batch["position_ids"], batch["cu_seqlens"])
        hidden = torch.randn(len(ids), CAPACITY, 4, requires_grad=True)
        for layer in model.model.layers:
            want = layer.proj(hidden) * CAPACITY + batch["cu_seqlens"][1:].sum()
            hidden = layer(hidden, **kwargs)
            torch.testing.assert_close(hidden, want)
    # One graph for both blocks and every batch. Passing the longest sample itself as the int would recompile
    # when it changes (automatic dynamic shapes), inside the timed steps of a training run.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
