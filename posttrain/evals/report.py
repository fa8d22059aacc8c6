"""Outputs of a RewardBench run: terminal table, results.json, per-pair verdicts and per-section bar charts."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

from posttrain.evals.scoring import SECTIONS


def results_table(summary: dict) -> Table:
    table = Table(title=f"RewardBench ({summary['pairs']} pairs)")
    table.add_column("section / subset")
    table.add_column("pairs", justify="right")
    table.add_column("accuracy", justify="right")
    subsets = summary["subsets"]
    for section, members in SECTIONS.items():
        if section not in summary["sections"]:
            continue
        table.add_row(f"[bold]{section}[/bold]", "", f"[bold]{summary['sections'][section]:.4f}[/bold]")
        for subset in members:
            if subset in subsets:
                table.add_row(
                    f"  {subset}", str(subsets[subset]["pairs"]), f"{subsets[subset]['accuracy']:.4f}"
                )
    for subset in summary["unknown_subsets"]:
        table.add_row(
            f"{subset} (no section)", str(subsets[subset]["pairs"]), f"{subsets[subset]['accuracy']:.4f}"
        )
    if summary["overall"] is not None:
        table.add_row("[bold]Overall[/bold]", str(summary["pairs"]), f"[bold]{summary['overall']:.4f}[/bold]")
    return table


def section_chart(section: str, summary: dict, path: Path) -> None:
    """Bar chart of one section's subset accuracies, with the weighted section score as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subsets = [s for s in SECTIONS[section] if s in summary["subsets"]]
    accuracies = [summary["subsets"][s]["accuracy"] for s in subsets]
    figure, axes = plt.subplots(figsize=(1.2 * len(subsets) + 3, 4))
    bars = axes.bar(subsets, accuracies, color="tab:blue")
    axes.bar_label(bars, labels=[f"{a:.2f}" for a in accuracies])
    axes.axhline(summary["sections"][section], color="tab:red", linestyle="--", label="section (weighted)")
    axes.axhline(0.5, color="grey", linestyle=":", label="chance")
    axes.set_ylim(0, 1.3)  # headroom for the legend above the bars
    axes.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axes.set_ylabel("accuracy")
    axes.set_title(f"{section}: {summary['sections'][section]:.3f}")
    axes.tick_params(axis="x", labelrotation=30)
    axes.legend(loc="upper right", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(summary: dict, pair_rows: list[dict], output_dir: Path) -> None:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    with open(output_dir / "verdicts.jsonl", "w", encoding="utf-8") as file:
        for row in pair_rows:
            file.write(json.dumps(row) + "\n")
    for section in summary["sections"]:
        slug = re.sub(r"[^a-z0-9]+", "_", section.lower())
        section_chart(section, summary, output_dir / f"section_{slug}.png")
    console = Console()
    console.print(results_table(summary))
    if summary["missing_sections"]:
        console.print(
            f"[yellow]Not evaluated: {', '.join(summary['missing_sections'])}; the overall score averages the "
            "evaluated sections only and is not comparable with the RewardBench leaderboard.[/yellow]"
        )
    if "verdict_counts" in summary:
        counts = ", ".join(f"{verdict} {n}" for verdict, n in sorted(summary["verdict_counts"].items()))
        console.print(f"Judge verdicts: {counts}")
        unreadable, first = summary["unparseable_rate"], summary["first_shown_rate"]
        if unreadable is not None and unreadable > 0.5:
            console.print(
                f"[yellow]{unreadable:.0%} of the judge's verdicts were unreadable (each scores 0.5): read its "
                "texts, shorten its template (judge.template: letter) or use a stronger judge.[/yellow]"
            )
        if first is not None:
            console.print(f"Readable verdicts that picked the answer shown first: {first:.0%} (no bias: 50%)")
    console.print(f"Results written to {output_dir}")
