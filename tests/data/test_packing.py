"""Packing: the plan is exactly best-fit-decreasing, packs keep samples apart, bad input is named."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from posttrain.data.packing import PackedDataset, TokenizedSamples, build_pack, plan_packs


def reference_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Textbook BFD, one sample at a time: longest first (ties: lower index), tightest bin (ties: oldest bin)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fitting = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fitting:
            best = min(fitting, key=lambda b: (room[b], b))
        else:
            bins.append([])
            room.append(capacity)
            best = len(bins) - 1
        bins[best].append(i)
        room[best] -= lengths[i]
    return bins


def realistic_lengths(n: int, capacity: int, seed: int = 0) -> np.ndarray:
    """Log-normal lengths, median 600, tail capped at 16k, then truncated to the capacity."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(600), 0.9, n)), 1, 16384).astype(np.int64)
    return np.minimum(lengths, capacity)


def make_samples(lengths: list[int], seed: int = 0) -> TokenizedSamples:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    input_ids = rng.integers(5, 1000, offsets[-1]).astype(np.int32)
    loss_mask = rng.random(offsets[-1]) < 0.7
    return TokenizedSamples(input_ids=input_ids, loss_mask=loss_mask, offsets=offsets)


def test_plan_equals_reference_bfd_on_random_inputs():
    rng = np.random.default_rng(1)
    for trial in range(400):
        capacity = int(rng.integers(1, 64))
        n = int(rng.integers(0, 90))
        lengths = rng.integers(1, capacity + 1, n)
        if trial % 2:  # many equal lengths and many small ones: the runs the planner places together
            lengths = np.minimum(lengths, rng.integers(1, capacity + 1))
        plan = plan_packs(lengths, capacity)
        got = [plan.bin(b).tolist() for b in range(plan.n_bins)]
        assert got == reference_bfd(lengths.tolist(), capacity), (capacity, lengths.tolist())


def test_plan_equals_reference_bfd_with_a_capacity_beyond_16_bits():
    lengths = np.random.default_rng(2).integers(1, 70_000, 60)
    plan = plan_packs(lengths, 70_000)
    assert [plan.bin(b).tolist() for b in range(plan.n_bins)] == reference_bfd(lengths.tolist(), 70_000)


def test_plan_places_every_sample_once_within_capacity():
    lengths = realistic_lengths(50_000, 4096, seed=3)
    plan = plan_packs(lengths, 4096)
    assert np.array_equal(np.sort(plan.items), np.arange(lengths.size))
    loads = np.add.reduceat(lengths[plan.items], plan.bin_offsets[:-1])
    assert loads.max() <= 4096 and loads.min() >= 1
    assert np.all(np.diff(plan.bin_offsets) >= 1)
    assert plan.real_tokens == lengths.sum() == loads.sum()
    assert plan.efficiency == pytest.approx(lengths.sum() / (plan.n_bins * 4096))
    # Within a bin samples come longest first, as BFD placed them.
    for b in range(0, plan.n_bins, 997):
        assert np.all(np.diff(lengths[plan.bin(b)]) <= 0)


def test_plan_efficiency_on_a_realistic_distribution():
    lengths = realistic_lengths(200_000, 4096, seed=4)
    plan = plan_packs(lengths, 4096)
    assert plan.efficiency >= 0.99
    lower_bound = -(-int(lengths.sum()) // 4096)  # no packing can use fewer bins
    assert plan.n_bins <= lower_bound * 1.01


def test_plan_is_deterministic():
    lengths = realistic_lengths(20_000, 2048, seed=5)
    first, second = plan_packs(lengths, 2048), plan_packs(lengths.copy(), 2048)
    assert np.array_equal(first.items, second.items)
    assert np.array_equal(first.bin_offsets, second.bin_offsets)


def test_empty_input_gives_an_empty_plan():
    plan = plan_packs(np.zeros(0, np.int64), 4096)
    assert plan.n_bins == 0 and plan.items.size == 0 and plan.real_tokens == 0
    assert plan.efficiency == 1.0


def test_oversize_and_empty_samples_are_named():
    with pytest.raises(ValueError, match=r"sample 2 has length 4097 .*capacity 4096"):
        plan_packs(np.array([10, 4096, 4097, 5000]), 4096)
    with pytest.raises(ValueError, match=r"sample 1 has length 0 and is empty"):
        plan_packs(np.array([3, 0, 2]), 8)
    with pytest.raises(ValueError, match="capacity"):
        plan_packs(np.array([3]), 0)
    with pytest.raises(ValueError, match="integer"):
        plan_packs(np.array([1.5]), 8)


def test_build_pack_restarts_positions_and_masks_boundaries_and_padding():
    samples = make_samples([5, 3, 4, 7])
    pack = build_pack(samples, np.array([3, 0, 1]), capacity=20, pad_id=-1)
    ids, lo = samples.input_ids, samples.offsets
    expected_ids = np.concatenate([ids[lo[3] : lo[4]], ids[lo[0] : lo[1]], ids[lo[1] : lo[2]], [-1] * 5])
    assert pack["input_ids"].dtype == np.int64 and pack["input_ids"].shape == (20,)
    assert np.array_equal(pack["input_ids"], expected_ids)
    assert pack["position_ids"].tolist() == [*range(7), *range(5), *range(3), *range(5)]
    assert pack["seq_lens"].dtype == np.int32 and pack["seq_lens"].tolist() == [7, 5, 3, 5]
    assert pack["seq_lens"].sum() == 20

    mask = samples.loss_mask
    expected_mask = np.concatenate(
        [mask[lo[3] : lo[4]], mask[lo[0] : lo[1]], mask[lo[1] : lo[2]], [False] * 5]
    )
    expected_mask[[0, 7, 12]] = False  # a sample's first token is never a target
    assert pack["loss_mask"].dtype == bool
    assert np.array_equal(pack["loss_mask"], expected_mask)


def test_build_pack_without_padding_has_no_pad_segment():
    samples = make_samples([6, 10])
    pack = build_pack(samples, [1, 0], capacity=16, pad_id=0)
    assert pack["seq_lens"].tolist() == [10, 6]
    assert pack["position_ids"].tolist() == [*range(10), *range(6)]


def test_build_pack_rejects_overfull_packs_and_bad_indices():
    samples = make_samples([6, 10])
    with pytest.raises(ValueError, match="16 tokens, more than the capacity 12"):
        build_pack(samples, [0, 1], capacity=12, pad_id=0)
    with pytest.raises(IndexError, match="out of range"):
        build_pack(samples, [2], capacity=12, pad_id=0)


def test_packed_dataset_round_trips_every_sample_from_a_zero_copy_arrow_buffer():
    lengths = realistic_lengths(400, 512, seed=6) // 4 + 1
    dense = make_samples(lengths.tolist(), seed=7)
    arrow_ids = pa.array(dense.input_ids)  # the planner and packer must work on a zero-copy view
    view = arrow_ids.to_numpy(zero_copy_only=True)
    samples = TokenizedSamples(
        input_ids=view, loss_mask=dense.loss_mask.view(np.uint8), offsets=dense.offsets
    )
    assert np.shares_memory(samples.input_ids, view)

    plan = plan_packs(samples.lengths, 512)
    dataset = PackedDataset(samples, plan, pad_id=0)
    assert len(dataset) == plan.n_bins
    seen = 0
    for b in range(len(dataset)):
        pack = dataset[b]
        assert pack["input_ids"].dtype == torch.int64 and pack["loss_mask"].dtype == torch.bool
        assert int(pack["seq_lens"].sum()) == 512
        starts = np.cumsum(pack["seq_lens"].numpy()) - pack["seq_lens"].numpy()
        for k, i in enumerate(plan.bin(b)):
            sample = samples.input_ids[samples.offsets[i] : samples.offsets[i + 1]]
            got = pack["input_ids"][starts[k] : starts[k] + sample.size].numpy()
            assert np.array_equal(got, sample)
            seen += 1
    assert seen == len(samples)


def test_tokenized_samples_reject_inconsistent_buffers():
    ids = np.arange(10, dtype=np.int32)
    mask = np.ones(10, bool)
    with pytest.raises(ValueError, match="offsets must run from 0 to len"):
        TokenizedSamples(ids, mask, np.array([0, 4, 9]))
    with pytest.raises(ValueError, match="offsets decrease at sample 1"):
        TokenizedSamples(ids, mask, np.array([0, 6, 4, 10]))
    with pytest.raises(ValueError, match="loss_mask has shape"):
        TokenizedSamples(ids, mask[:9], np.array([0, 10]))
    samples = TokenizedSamples(ids, mask, np.array([0, 4, 4, 10], dtype=np.int32))
    assert len(samples) == 3 and samples.lengths.tolist() == [4, 0, 6]
    assert samples.offsets.dtype == np.int64
