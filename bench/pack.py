"""Packing benchmark: posttrain's best-fit-decreasing packer against TRL's `pack_dataset(strategy="bfd")`.

    .venv/bin/python bench/pack.py                      # 1.5M samples into 4096-token bins
    .venv/bin/python bench/pack.py --samples 200000     # a smaller run

Data: synthetic samples with log-normal lengths (median 600 tokens, sigma 0.9, long tail capped at 16,384), then
truncated to the bin size (4096) so that both packers get identical inputs (TRL would truncate them itself;
ours expects the caller to). Tokens are random int32 ids, the loss mask marks the last 70% of each sample. The
data are written once to an Arrow stream file (one record batch: columns `input_ids` and `loss_mask`, both
list columns) and reused on later runs. Each side runs in its own child process that memory-maps that file:

- trl: `datasets.Dataset.from_file` (memory-mapped, as any saved or downloaded dataset) then
  `pack_dataset(ds, 4096, strategy="bfd")` with its defaults (it packs each `map` batch of 1000 samples on its
  own) and the cache disabled, so the packed table is written anew to an Arrow file next to the data.
- trl-memory (opt-in: `--sides ours,trl,trl-memory`): the same on an in-memory table, so `map` writes nothing
  to disk but holds its output in memory; at 200k samples its peak RSS is already ~4.5 GiB, so it would not
  fit a 24 GiB machine at 1.5M.
- ours: a zero-copy `TokenizedSamples` over the same Arrow buffers, `plan_packs` (reads lengths only),
  then every pack is built with `build_pack` (the rows the trainer consumes: input_ids, position_ids, loss_mask,
  seq_lens, padded to 4096), as a training run would build them one by one.

Reported per side: wall time (imports and opening the file excluded), peak RSS (VmHWM, which also counts the
memory-mapped token pages a side touched), peak anonymous RSS (sampled every 10 ms: the memory beyond the token
data), and efficiency = real tokens / (packs * 4096).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

CAP_LONG_TAIL = 16_384
MEDIAN_LENGTH = 600
SIGMA = 0.9
VOCAB = 32_000
PROMPT_FRACTION = 0.3
SIDES = ("ours", "trl", "trl-memory")


def synthetic_lengths(n: int, capacity: int, seed: int) -> tuple[np.ndarray, int]:
    """Log-normal lengths capped at 16k, then truncated to the capacity; also returns how many were truncated."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(MEDIAN_LENGTH), SIGMA, n)), 1, CAP_LONG_TAIL).astype(
        np.int64
    )
    return np.minimum(lengths, capacity), int((lengths > capacity).sum())


def write_dataset(path: Path, n: int, capacity: int, seed: int) -> None:
    """Write the synthetic samples as one Arrow record batch, generating tokens in chunks through raw files."""
    import pyarrow as pa

    lengths, truncated = synthetic_lengths(n, capacity, seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    total = int(offsets[-1])
    print(
        f"writing {path}: {n:,} samples, {total:,} tokens ({truncated:,} truncated to {capacity})", flush=True
    )
    rng = np.random.default_rng(seed + 1)
    ids = np.lib.format.open_memmap(path.with_suffix(".ids.npy"), mode="w+", dtype=np.int32, shape=(total,))
    mask = np.lib.format.open_memmap(path.with_suffix(".mask.npy"), mode="w+", dtype=np.uint8, shape=(total,))
    chunk = 50_000
    for first in range(0, n, chunk):
        lo, hi = int(offsets[first]), int(offsets[min(first + chunk, n)])
        ids[lo:hi] = rng.integers(0, VOCAB, hi - lo, dtype=np.int32)
        chunk_lengths = lengths[first : first + chunk]
        position = np.arange(hi - lo) - np.repeat(offsets[first : first + chunk] - lo, chunk_lengths)
        mask[lo:hi] = position >= np.repeat((chunk_lengths * PROMPT_FRACTION).astype(np.int64), chunk_lengths)
    list_type = pa.ListArray if total < 2**31 else pa.LargeListArray
    offsets_type = np.int32 if total < 2**31 else np.int64
    batch = pa.record_batch(
        [
            list_type.from_arrays(pa.array(offsets.astype(offsets_type)), pa.array(ids)),
            list_type.from_arrays(pa.array(offsets.astype(offsets_type)), pa.array(mask)),
        ],
        names=["input_ids", "loss_mask"],
    )
    partial = path.with_suffix(".partial")
    with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    del batch, ids, mask
    partial.rename(path)
    path.with_suffix(".ids.npy").unlink()
    path.with_suffix(".mask.npy").unlink()


class PeakAnonymousMemory:
    """Samples this process's anonymous RSS (memory not backed by a mapped file) every 10 ms."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_bytes = max(self.peak_bytes, _status_bytes("RssAnon"))

    def __enter__(self) -> PeakAnonymousMemory:
        self.peak_bytes = _status_bytes("RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, _status_bytes("RssAnon"))


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_ours(path: Path, capacity: int) -> dict:
    import pyarrow as pa

    from posttrain.data.packing import TokenizedSamples, build_pack, plan_packs

    table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    ids, mask = (table.column(name).chunk(0) for name in ("input_ids", "loss_mask"))
    samples = TokenizedSamples(
        input_ids=ids.values.to_numpy(zero_copy_only=True),
        loss_mask=mask.values.to_numpy(zero_copy_only=True),
        offsets=ids.offsets.to_numpy(zero_copy_only=True),
    )
    with PeakAnonymousMemory() as anonymous:
        start = time.perf_counter()
        plan = plan_packs(samples.lengths, capacity)
        plan_seconds = time.perf_counter() - start
        checksum = 0
        for b in range(plan.n_bins):
            pack = build_pack(samples, plan.bin(b), capacity, pad_id=0)
            checksum += int(pack["seq_lens"][0])
        seconds = time.perf_counter() - start
    assert checksum >= plan.n_bins
    return {
        "seconds": seconds,
        "plan_seconds": plan_seconds,
        "packs": plan.n_bins,
        "tokens": plan.real_tokens,
        "efficiency": plan.efficiency,
        "peak_anon_bytes": anonymous.peak_bytes,
    }


def run_trl(path: Path, capacity: int, in_memory: bool) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from trl.data_utils import pack_dataset

    output = path.with_name(path.stem + ".trl-packed.arrow")
    if in_memory:  # a table without cache files: `map` keeps its output in memory and writes nothing
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        dataset, map_kwargs = Dataset(InMemoryTable(table)), {}
    else:  # the usual case of a saved or downloaded dataset: `map` writes its output to a cache file
        dataset = Dataset.from_file(str(path))
        map_kwargs = {"load_from_cache_file": False, "cache_file_name": str(output)}
    with PeakAnonymousMemory() as anonymous:
        start = time.perf_counter()
        packed = pack_dataset(dataset, capacity, strategy="bfd", map_kwargs=map_kwargs)
        seconds = time.perf_counter() - start
    tokens = int(pc.sum(pc.list_value_length(packed.data.column("input_ids"))).as_py())
    result = {
        "seconds": seconds,
        "packs": len(packed),
        "tokens": tokens,
        "efficiency": tokens / (len(packed) * capacity),
        "peak_anon_bytes": anonymous.peak_bytes,
    }
    del packed
    output.unlink(missing_ok=True)
    return result


def child(side: str, path: Path, capacity: int) -> None:
    result = (
        run_ours(path, capacity)
        if side == "ours"
        else run_trl(path, capacity, in_memory=side == "trl-memory")
    )
    result["peak_rss_bytes"] = _status_bytes("VmHWM")
    print("RESULT " + json.dumps(result), flush=True)


def run_side(side: str, path: Path, capacity: int) -> dict | None:
    """Run one side in a fresh interpreter so that its peak RSS is its own."""
    command = [sys.executable, __file__, "--child", side, "--data", str(path), "--capacity", str(capacity)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    print(f"{side} failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=1_500_000)
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/posttrain-bench-pack"))
    parser.add_argument("--sides", default="ours,trl", help=f"comma-separated, from: {', '.join(SIDES)}")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side; the fastest is reported")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.capacity)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"samples-{args.samples}-cap{args.capacity}-seed{args.seed}.arrow"
    if not path.exists():
        write_dataset(path, args.samples, args.capacity, args.seed)
    token_bytes = path.stat().st_size
    print(
        f"data: {path} ({token_bytes / 2**30:.2f} GiB: int32 ids + uint8 mask, memory-mapped by both sides)"
    )

    results = {}
    for side in args.sides.split(","):
        runs = [run_side(side, path, args.capacity) for _ in range(args.repeats)]
        runs = [r for r in runs if r is not None]
        results[side] = min(runs, key=lambda r: r["seconds"]) if runs else None
    gib = 2**30
    print(f"\nfastest of {args.repeats} run(s) per side")
    print(
        f"{'side':<11}{'time s':>8}{'packs':>10}{'efficiency':>12}{'peak RSS GiB':>14}{'peak anon GiB':>15}"
    )
    for side, r in results.items():
        if r is None:
            print(f"{side:<11}{'failed':>8}")
            continue
        print(
            f"{side:<11}{r['seconds']:>8.2f}{r['packs']:>10,}{r['efficiency']:>12.4%}"
            f"{r['peak_rss_bytes'] / gib:>14.2f}{r['peak_anon_bytes'] / gib:>15.2f}"
        )
    ours = results.get("ours")
    if not ours:
        return
    print(f"\nours: planning alone {ours['plan_seconds']:.2f} s, then building all {ours['packs']:,} packs")
    for side in ("trl", "trl-memory"):
        trl = results.get(side)
        if trl:
            assert ours["tokens"] == trl["tokens"], "both sides must pack the same tokens"
            print(
                f"ours vs {side}: {trl['seconds'] / ours['seconds']:.1f}x faster (plan + build every pack), "
                f"{trl['seconds'] / ours['plan_seconds']:.0f}x (plan alone); "
                f"packs {ours['packs']:,} vs {trl['packs']:,}"
            )


if __name__ == "__main__":
    main()
