"""A trace run killed with SIGKILL at several points, then resumed, ends with exactly the shards of an
uninterrupted run: no duplicate, no lost prompt."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from scripted_teacher import ScriptedBackend, arithmetic_teacher
from transformers import AutoTokenizer

from posttrain.traces import run_traces

RUNNER = """
import sys
sys.path.insert(0, {tests_dir!r})
from transformers import AutoTokenizer
from scripted_teacher import ScriptedBackend, arithmetic_teacher
from posttrain.config import load_recipe
from posttrain.traces import TracesRecipe, run_traces

if __name__ == "__main__":  # reward workers are spawned and import this module
    recipe = load_recipe(sys.argv[1], TracesRecipe)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.tokenizer)
    teacher = ScriptedBackend(tokenizer, arithmetic_teacher(0.2), delay_s=float(sys.argv[2]))
    run_traces(recipe, resume=True, backend=teacher)
"""


def committed(out: Path) -> int:
    ledger = out / "ledger.jsonl"
    return len(ledger.read_text().splitlines()) if ledger.exists() else 0


def streams(out: Path) -> dict[str, bytes]:
    return {
        f"{p.parent.name}/{p.name}": p.read_bytes()
        for name in ("accepted", "samples", "failed")
        for p in sorted((out / name).glob("part-*.jsonl"))
    }


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_gives_the_uninterrupted_output(tmp_path, traces_recipe):
    settings = {"max_prompts": 24, "run": {"batch_prompts": 2}, "output": {"shard_rows": 12}}
    reference = traces_recipe("reference", **settings)
    tokenizer = AutoTokenizer.from_pretrained(reference.model.tokenizer)
    run_traces(reference, backend=ScriptedBackend(tokenizer, arithmetic_teacher(0.2)))

    killed = traces_recipe("killed", **settings)
    recipe_path = tmp_path / "killed.yaml"
    recipe_path.write_text(yaml.safe_dump(killed.model_dump(mode="json")))
    script = tmp_path / "run_scripted.py"
    script.write_text(RUNNER.format(tests_dir=str(Path(__file__).parent)))
    out = Path(killed.output_dir)
    # Kill while a batch is being generated (after 2 commits), then right after a commit landed (5).
    for wait_for, extra_s in ((2, 0.15), (5, 0.0)):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(recipe_path), "0.3"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 300
        while committed(out) < wait_for:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.01)
        time.sleep(extra_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert not (out / "summary.json").exists()
    assert committed(out) < 12
    subprocess.run([sys.executable, str(script), str(recipe_path), "0"], check=True, timeout=300)

    assert streams(out) == streams(Path(reference.output_dir))
    samples = [json.loads(line) for p in sorted((out / "samples").glob("*.jsonl")) for line in p.open()]
    keys = [(s["prompt_index"], s["sample_index"]) for s in samples]
    assert sorted(keys) == [(p, k) for p in range(24) for k in range(4)]  # each once: none lost, none twice
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert sorted(entry["batch"] for entry in ledger) == list(range(12))
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads((Path(reference.output_dir) / "summary.json").read_text()) | {
        "accepted_files": summary["accepted_files"]
    }
