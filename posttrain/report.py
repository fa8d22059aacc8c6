"""End-of-run report: a PNG with one panel per metric, read back from `metrics.jsonl`; beside it, for runs
that sample completions, `report.md` with the latest samples (posttrain.samples)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from posttrain.metrics import read_metrics  # noqa: E402
from posttrain.samples import write_samples_view  # noqa: E402


def write_report(
    output_dir: str | Path, panels: Sequence[str | tuple[str, ...]], title: str, filename: str = "report.png"
) -> Path | None:
    """Plot each panel (a metric name, or a tuple of names sharing one axis) against the step.

    Metrics that never appear are left out, so one call serves runs with and without MTP, KL, etc.
    """
    path = _plot(output_dir, panels, title, filename)
    write_samples_view(output_dir, title)
    return path


def _plot(
    output_dir: str | Path, panels: Sequence[str | tuple[str, ...]], title: str, filename: str
) -> Path | None:
    rows = read_metrics(Path(output_dir) / "metrics.jsonl")
    groups = [(p,) if isinstance(p, str) else tuple(p) for p in panels]
    groups = [g for g in groups if any(any(k in r for r in rows) for k in g)]
    if not rows or not groups:
        return None
    columns = min(3, len(groups))
    n_rows = (len(groups) + columns - 1) // columns
    fig, axes = plt.subplots(n_rows, columns, figsize=(5 * columns, 3.2 * n_rows), squeeze=False)
    for ax, group in zip(axes.flat, groups, strict=False):
        for key in group:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=key, marker="." if len(points) < 30 else None)
        ax.set_title(" / ".join(group), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(group) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(output_dir) / filename
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
