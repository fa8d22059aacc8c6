"""Best-fit-decreasing packing of tokenised samples into fixed-size bins, with per-sample boundaries.

DeepSeek-V3 trains SFT on samples packed into long sequences, each sample attending only to itself. This module
does the packing in two steps:

1. `plan_packs` decides which samples share a bin. It only reads the sample lengths, so planning 1.5M samples
   costs a few arrays of 1.5M integers, whatever the size of the token data.
2. `build_pack` (and `PackedDataset`, which calls it per bin) gathers one bin's tokens on demand from the flat
   token buffer, which may be a memory map, and writes the position ids that restart at every sample boundary.

Best-fit-decreasing (BFD): visit samples from longest to shortest; put each one into the open bin with the
least remaining space that still holds it, or open a new bin when none does. Lengths are integers no larger than
the capacity, so instead of searching bins one sample at a time, we keep the open bins in buckets by their
remaining space and place all samples of one length together (see `plan_packs`), which vectorises with numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TokenizedSamples:
    """All samples of a dataset, concatenated: sample i is `input_ids[offsets[i]:offsets[i + 1]]`.

    `input_ids` may be an `np.memmap` or a zero-copy view of an Arrow buffer: nothing here copies it whole.
    `loss_mask[t]` is True where token t is a training target (the model is asked to predict it).
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        offsets = np.asarray(self.offsets)
        if offsets.ndim != 1 or offsets.size == 0 or not np.issubdtype(offsets.dtype, np.integer):
            raise ValueError(
                f"offsets must be a non-empty 1-D integer array (n_samples + 1), got {offsets!r}"
            )
        object.__setattr__(self, "offsets", offsets.astype(np.int64, copy=False))
        if self.input_ids.ndim != 1 or not np.issubdtype(self.input_ids.dtype, np.integer):
            raise ValueError(f"input_ids must be a flat integer array, got dtype {self.input_ids.dtype}")
        if self.loss_mask.shape != self.input_ids.shape:
            raise ValueError(
                f"loss_mask has shape {self.loss_mask.shape} but input_ids has shape {self.input_ids.shape}"
            )
        if offsets[0] != 0 or offsets[-1] != self.input_ids.size:
            raise ValueError(
                f"offsets must run from 0 to len(input_ids) = {self.input_ids.size}, "
                f"got {offsets[0]} .. {offsets[-1]}"
            )
        decreasing = np.flatnonzero(np.diff(offsets) < 0)
        if decreasing.size:
            i = int(decreasing[0])
            raise ValueError(f"offsets decrease at sample {i}: {offsets[i]} -> {offsets[i + 1]}")

    @property
    def lengths(self) -> np.ndarray:
        """Number of tokens of each sample (int64)."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return self.offsets.size - 1


@dataclass(frozen=True)
class PackPlan:
    """Which samples go into which bin, in compressed-sparse-row form.

    Bin b holds the samples `items[bin_offsets[b]:bin_offsets[b + 1]]`, longest first. Bins are numbered in the
    order BFD opened them, so bin 0 holds the longest sample.
    """

    bin_offsets: np.ndarray
    items: np.ndarray
    capacity: int
    real_tokens: int

    @property
    def n_bins(self) -> int:
        return self.bin_offsets.size - 1

    @property
    def efficiency(self) -> float:
        """Real tokens / token slots (n_bins * capacity); 1.0 for an empty plan, which wastes nothing."""
        slots = self.n_bins * self.capacity
        return self.real_tokens / slots if slots else 1.0

    def bin(self, i: int) -> np.ndarray:
        """Sample indices of bin i."""
        if not -self.n_bins <= i < self.n_bins:
            raise IndexError(f"bin {i} out of range for a plan of {self.n_bins} bins")
        i %= self.n_bins
        return self.items[self.bin_offsets[i] : self.bin_offsets[i + 1]]


def _check_lengths(lengths: np.ndarray, capacity: int) -> np.ndarray:
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or (lengths.size and not np.issubdtype(lengths.dtype, np.integer)):
        raise ValueError(
            f"lengths must be a 1-D integer array, got dtype {lengths.dtype}, shape {lengths.shape}"
        )
    bad = np.flatnonzero((lengths < 1) | (lengths > capacity))
    if bad.size:
        i = int(bad[0])
        what = "is empty" if lengths[i] < 1 else f"does not fit in a bin of capacity {capacity}"
        raise ValueError(
            f"sample {i} has length {int(lengths[i])} and {what} ({bad.size} such samples in all); "
            "truncate or drop samples before planning"
        )
    return lengths.astype(np.int64, copy=False)


def _runs(per_bin: int, n_whole: int, rest: int) -> np.ndarray:
    """Samples taken by each of n_whole bins that take per_bin, then by one bin that takes the rest (if any)."""
    takes = np.full(n_whole + (rest > 0), per_bin, np.int64)
    if rest:
        takes[-1] = rest
    return takes


def plan_packs(lengths: np.ndarray, capacity: int) -> PackPlan:
    """Best-fit-decreasing packing of samples with the given lengths into bins of `capacity` tokens.

    The result is exactly what the textbook one-sample-at-a-time BFD produces when samples are visited by
    decreasing length (ties: lower sample index first) and, among bins with equally little room, the one opened
    first is chosen. It is computed one distinct length L at a time instead of one sample at a time:

    Let s be the smallest remaining space >= L among open bins, and b the first-opened bin with space s. The
    next sample of length L goes into b, leaving s - L. If s - L >= L, then b is again the unique best fit (no bin
    has a space in [L, s) by the choice of s), so b takes floor(s / L) samples in a row, ending below L; then the
    next bin with space s takes its floor(s / L), and so on upwards through the spaces. Samples left once every
    space >= L is used open new bins of floor(capacity / L) samples each. So with a count of open bins per
    remaining space (capacity + 1 buckets), a cumulative sum says how far up the spaces one length's samples
    reach, and whole runs of samples are placed by a few array operations. Cost: O(n + C * distinct lengths)
    array work plus O(bins touched) small steps, where C = capacity.

    Raises ValueError naming the first sample whose length is < 1 or > capacity.
    """
    lengths = _check_lengths(lengths, capacity)
    n = lengths.size
    if n == 0:
        return PackPlan(np.zeros(1, np.int64), np.zeros(0, np.int64), int(capacity), 0)

    # Samples by decreasing length, lower index first among equals (a stable sort; radix sort for 16-bit keys).
    key_dtype = np.uint16 if capacity < 2**16 else np.int64
    order = np.argsort((capacity - lengths).astype(key_dtype), kind="stable")
    count_of_length = np.bincount(lengths, minlength=capacity + 1)

    # Open bins with remaining space s, as sorted arrays of bin ids (full bins, s = 0, are never kept).
    no_bins = np.zeros(0, np.int64)
    bins_with_space: list[np.ndarray] = [no_bins] * (capacity + 1)
    n_with_space = np.zeros(capacity + 1, np.int64)
    n_bins = 0
    bin_of_item = np.empty(n, np.int64)  # bin of the sample order[j]
    placed = 0

    for length in np.flatnonzero(count_of_length)[::-1].tolist():  # distinct lengths, longest first
        todo = int(count_of_length[length])
        spaces = np.flatnonzero(n_with_space[length:]) + length
        per_bin = spaces // length  # how many samples of this length a bin with that space takes
        reach = np.cumsum(n_with_space[spaces] * per_bin)
        # Buckets (smallest spaces first) whose bins all take their fill while samples remain after them.
        n_full = int(np.searchsorted(reach, todo))

        chosen = [bins_with_space[s] for s in spaces[:n_full]]
        takes = [np.repeat(per_bin[:n_full], n_with_space[spaces[:n_full]])]
        old_space = [np.repeat(spaces[:n_full], n_with_space[spaces[:n_full]])]
        left = todo - (int(reach[n_full - 1]) if n_full else 0)
        if n_full < spaces.size:  # the rest fits in the first bins of the next bucket
            space, per = int(spaces[n_full]), int(per_bin[n_full])
            n_whole, rest = divmod(left, per)
            used = n_whole + (rest > 0)
            chosen.append(bins_with_space[space][:used])
            bins_with_space[space] = bins_with_space[space][used:]
            n_with_space[space] -= used
            takes.append(_runs(per, n_whole, rest))
            old_space.append(np.full(used, space, np.int64))
        else:  # every open bin that could take one is used: open new bins
            per = capacity // length
            n_whole, rest = divmod(left, per)
            used = n_whole + (rest > 0)
            chosen.append(np.arange(n_bins, n_bins + used, dtype=np.int64))
            n_bins += used
            takes.append(_runs(per, n_whole, rest))
            old_space.append(np.full(used, capacity, np.int64))
        for s in spaces[:n_full]:
            bins_with_space[s] = no_bins
        n_with_space[spaces[:n_full]] = 0

        chosen_bins = np.concatenate(chosen)
        take = np.concatenate(takes)
        bin_of_item[placed : placed + todo] = np.repeat(chosen_bins, take)
        placed += todo

        # Move every chosen bin to the bucket of its new remaining space, keeping buckets sorted by bin id.
        new_space = np.concatenate(old_space) - take * length
        by_space = np.argsort(new_space, kind="stable")
        new_space, chosen_bins = new_space[by_space], chosen_bins[by_space]
        starts = np.flatnonzero(np.diff(new_space, prepend=-1))
        for start, end in zip(starts, np.append(starts[1:], new_space.size), strict=True):
            space = int(new_space[start])
            if space == 0:
                continue
            bins = np.concatenate((bins_with_space[space], chosen_bins[start:end]))
            bins.sort()
            bins_with_space[space] = bins
            n_with_space[space] = bins.size

    by_bin = np.argsort(bin_of_item, kind="stable")  # stable: keeps each bin's samples longest first
    items = order[by_bin]
    bin_offsets = np.zeros(n_bins + 1, np.int64)
    np.cumsum(np.bincount(bin_of_item, minlength=n_bins), out=bin_offsets[1:])
    return PackPlan(bin_offsets, items, int(capacity), int(lengths.sum()))


def build_pack(
    samples: TokenizedSamples, item_indices: np.ndarray, capacity: int, pad_id: int
) -> dict[str, np.ndarray]:
    """One packed row of `capacity` tokens holding the given samples in order, then padding.

    Returns input_ids [capacity] int64, position_ids [capacity] int64 (0, 1, 2, ... restarting at each sample;
    the padding tail counts as one more pseudo-sample from 0), loss_mask [capacity] bool and seq_lens int32 (each
    sample's length, then the padding tail's if any; they sum to capacity).

    loss_mask is False on padding and on the first token of every sample: a sample's first token has no earlier
    token of its own sample to be predicted from, so it is never a target. That also guarantees that shifting
    labels by one across the whole row never makes a sample's first token a target of the previous sample.
    """
    items = np.asarray(item_indices, dtype=np.int64).reshape(-1)
    if items.size and (items.min() < 0 or items.max() >= len(samples)):
        raise IndexError(f"sample indices {items.tolist()} out of range for {len(samples)} samples")
    starts = samples.offsets[items].tolist()
    ends = samples.offsets[items + 1].tolist()
    seq_lens = [end - start for start, end in zip(starts, ends, strict=True)]
    used = sum(seq_lens)
    if used > capacity:
        raise ValueError(f"samples {items.tolist()} hold {used} tokens, more than the capacity {capacity}")

    # A pack holds a handful of samples: copying slice by slice beats building a gather index.
    input_ids = np.empty(capacity, dtype=np.int64)
    position_ids = np.empty(capacity, dtype=np.int64)
    loss_mask = np.empty(capacity, dtype=bool)
    ramp = np.arange(capacity, dtype=np.int64)
    row = 0
    for start, end in zip(starts, ends, strict=True):
        input_ids[row : row + end - start] = samples.input_ids[start:end]
        loss_mask[row : row + end - start] = samples.loss_mask[start:end]
        if end > start:
            loss_mask[row] = False  # a sample's first token is never a target
        position_ids[row : row + end - start] = ramp[: end - start]
        row += end - start
    if used < capacity:
        input_ids[used:] = pad_id
        loss_mask[used:] = False
        position_ids[used:] = ramp[: capacity - used]
        seq_lens.append(capacity - used)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "loss_mask": loss_mask,
        "seq_lens": np.array(seq_lens, dtype=np.int32),
    }


class PackedDataset(torch.utils.data.Dataset):
    """Bin i of a `PackPlan` as a dict of torch tensors, built on demand by `build_pack`."""

    def __init__(self, samples: TokenizedSamples, plan: PackPlan, pad_id: int) -> None:
        if plan.items.size and plan.items.max() >= len(samples):
            raise ValueError(
                f"the plan refers to sample {int(plan.items.max())} but there are only {len(samples)} samples"
            )
        self.samples = samples
        self.plan = plan
        self.pad_id = pad_id

    def __len__(self) -> int:
        return self.plan.n_bins

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pack = build_pack(self.samples, self.plan.bin(i), self.plan.capacity, self.pad_id)
        return {name: torch.from_numpy(array) for name, array in pack.items()}


def collate_packs(packs: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    """Packs of one micro-batch (`PackedDataset` items) as [B, S] rows on `device`, plus `cu_seqlens`: the offsets
    of every sample (a padding tail counts as one) in the flattened B·S tokens, int32 [n + 1], as varlen
    attention takes them (posttrain.fast.attention). The offsets come from the packs' `seq_lens` on the host, so
    no step waits for the GPU to find them; on CUDA the host tensors are pinned and copied without blocking."""
    if not packs:
        raise ValueError("collate_packs needs at least one pack")
    rows = {
        name: torch.stack([pack[name] for pack in packs])
        for name in ("input_ids", "position_ids", "loss_mask")
    }
    lengths = torch.cat([pack["seq_lens"] for pack in packs])
    if int(lengths.sum()) != rows["input_ids"].numel():
        raise ValueError(
            f"the packs' seq_lens sum to {int(lengths.sum())}, not to their {rows['input_ids'].numel()} tokens"
        )
    rows["cu_seqlens"] = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    pinned = torch.device(device).type == "cuda"
    return {name: (t.pin_memory() if pinned else t).to(device, non_blocking=True) for name, t in rows.items()}
