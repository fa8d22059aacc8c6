"""Timing helper shared by the bench/model_*.py scripts: CUDA events, warm-up, median of repeats."""

import statistics

import torch


def median_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn() in milliseconds, measured with CUDA events (host clock on CPU)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        import time

        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_median_ms(fn, iters: int = 20) -> float:
    """Median time of fn() captured once as a CUDA graph and replayed: the GPU's own time, without the
    per-kernel launch cost that dominates small decode steps (large on a virtualised host)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, iters)
