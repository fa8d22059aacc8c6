"""What a trace run kept and why: acceptance per source and per filter, lengths before and after filtering,
pass@k per source — a JSON summary and PNG plots, computed from the sample records on disk (so a resumed run
reports on everything it ever did).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, "Evaluating Large Language
    Models Trained on Code", Eq. 1 and its numerically stable form):

        pass@k = 1 − C(n − c, k) / C(n, k) = 1 − Π_{i = n − c + 1}^{n} (1 − k / i)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def summarize(
    samples: Iterable[dict[str, Any]], failed: list[dict[str, Any]], ks: list[int]
) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Aggregate sample records (one per completion, see `pipeline.sample_record`) into the run summary;
    also returns the token lengths of all, verified and accepted samples (for the histograms)."""
    by_prompt: dict[int, list[dict]] = defaultdict(list)
    for sample in samples:
        by_prompt[sample["prompt_index"]].append(sample)
    sources: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"prompts": 0, "samples": 0, "verified": 0, "accepted": 0, "prompts_with_accepted": 0}
    )
    filter_rejections: dict[str, dict[str, int]] = defaultdict(lambda: {"all": 0, "verified": 0})
    pass_sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    lengths_all, lengths_verified, lengths_accepted = [], [], []
    unscored = 0  # samples with no total reward (a reward failed, or none applies): never verified
    for group in by_prompt.values():
        source = sources[group[0]["source"]]
        source["prompts"] += 1
        n = len(group)
        c = sum(s["verified"] for s in group)
        source["samples"] += n
        source["verified"] += c
        accepted = sum(s["accepted"] for s in group)
        source["accepted"] += accepted
        source["prompts_with_accepted"] += accepted > 0
        for k in ks:
            if k <= n:
                pass_sums[group[0]["source"]][k].append(pass_at_k(n, c, k))
        for s in group:
            lengths_all.append(s["num_tokens"])
            unscored += s.get("reward_total", 0.0) is None
            if s["verified"]:
                lengths_verified.append(s["num_tokens"])
            if s["accepted"]:
                lengths_accepted.append(s["num_tokens"])
            for name, reason in s["filters"].items():
                if reason is not None:
                    filter_rejections[name]["all"] += 1
                    filter_rejections[name]["verified"] += bool(s["verified"])
    total_samples = sum(s["samples"] for s in sources.values())
    total_verified = sum(s["verified"] for s in sources.values())
    for name, source in sources.items():
        source["acceptance_rate"] = source["accepted"] / max(source["samples"], 1)
        source["verified_rate"] = source["verified"] / max(source["samples"], 1)
        source["pass_at_k"] = {str(k): float(np.mean(v)) for k, v in sorted(pass_sums[name].items())}
    return {
        "prompts": len(by_prompt),
        "failed_prompts": len(failed),
        "samples": total_samples,
        "verified": total_verified,
        "accepted": len(lengths_accepted),
        "unscored": unscored,
        "acceptance_rate": len(lengths_accepted) / max(total_samples, 1),
        "per_source": dict(sources),
        "filters": {
            name: {
                "rejected": counts["all"],
                "rejected_rate": counts["all"] / max(total_samples, 1),
                "rejected_verified": counts["verified"],
                "rejected_verified_rate": counts["verified"] / max(total_verified, 1),
            }
            for name, counts in sorted(filter_rejections.items())
        },
        "lengths": {
            "all": _describe(lengths_all),
            "verified": _describe(lengths_verified),
            "accepted": _describe(lengths_accepted),
        },
        "failures": [{"prompt_index": f["prompt_index"], "reason": f["reason"]} for f in failed[:100]],
    }, {"all": lengths_all, "verified": lengths_verified, "accepted": lengths_accepted}


def _describe(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"count": 0}
    values = np.asarray(lengths)
    return {
        "count": len(values),
        "mean": float(values.mean()),
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "max": int(values.max()),
    }


def write_report(summary: dict[str, Any], lengths: dict[str, list[int]], output_dir: Path) -> dict[str, Path]:
    """summary.json plus lengths.png (token lengths before and after filtering) and acceptance.png
    (acceptance and pass@k per source, rejections per filter)."""
    lengths_all, lengths_verified, lengths_accepted = lengths["all"], lengths["verified"], lengths["accepted"]
    paths = {"summary": output_dir / "summary.json"}
    paths["summary"].write_text(json.dumps(summary, indent=2))

    fig, ax = plt.subplots(figsize=(7, 4))
    if lengths_all:
        bins = np.histogram_bin_edges(lengths_all, bins=30)
        for values, label in (
            (lengths_all, "all samples"),
            (lengths_verified, "verified"),
            (lengths_accepted, "accepted (after filters)"),
        ):
            if values:
                ax.hist(values, bins=bins, alpha=0.5, label=f"{label} ({len(values)})")
        ax.legend(fontsize=8)
    ax.set_xlabel("completion tokens")
    ax.set_ylabel("samples")
    ax.set_title("Completion lengths before and after filtering")
    fig.tight_layout()
    paths["lengths"] = output_dir / "lengths.png"
    fig.savefig(paths["lengths"], dpi=90)
    plt.close(fig)

    sources = summary["per_source"]
    filters = summary["filters"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = [Path(s).name for s in sources]
    axes[0].bar(names, [s["verified_rate"] for s in sources.values()], alpha=0.6, label="verified")
    axes[0].bar(names, [s["acceptance_rate"] for s in sources.values()], alpha=0.8, label="accepted")
    axes[0].set_title("per source: share of samples")
    axes[0].legend(fontsize=8)
    for name, source in zip(names, sources.values(), strict=True):
        ks = [int(k) for k in source["pass_at_k"]]
        axes[1].plot(ks, list(source["pass_at_k"].values()), marker="o", label=name)
    axes[1].set_xscale("log", base=2)
    axes[1].set_title("pass@k per source")
    axes[1].set_xlabel("k")
    axes[1].legend(fontsize=8)
    axes[2].barh(list(filters), [f["rejected_verified_rate"] for f in filters.values()])
    axes[2].set_title("share of verified samples each filter rejects")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths["acceptance"] = output_dir / "acceptance.png"
    fig.savefig(paths["acceptance"], dpi=90)
    plt.close(fig)
    return paths
