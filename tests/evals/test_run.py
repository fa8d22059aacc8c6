import http.server
import json
import threading

import pydantic
import pytest
import yaml

from posttrain.evals.rewardbench import RewardBenchConfig, run_rewardbench
from posttrain.evals.scoring import SECTIONS, PairResult, judge_pair_score, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read_outputs(output_dir):
    summary = json.loads((output_dir / "results.json").read_text())
    rows = [json.loads(line) for line in (output_dir / "verdicts.jsonl").read_text().splitlines()]
    return summary, rows


def _check_outputs_agree(summary, rows, output_dir):
    """results.json is the aggregation of the per-pair rows, and every evaluated section has its chart."""
    recomputed = summarize([PairResult(id=r["id"], subset=r["subset"], score=r["score"]) for r in rows])
    assert summary["overall"] == pytest.approx(recomputed["overall"])
    for key in ("sections", "subsets", "missing_sections", "pairs"):
        assert summary[key] == recomputed[key]
    charts = sorted(p.name for p in output_dir.glob("section_*.png"))
    assert len(charts) == len(summary["sections"])
    assert all((output_dir / name).read_bytes().startswith(PNG_MAGIC) for name in charts)


def test_classifier_run_writes_consistent_outputs(tmp_path, reward_model_dir, bundled_pairs, capsys):
    config = RewardBenchConfig(
        data=bundled_pairs, model=reward_model_dir, output_dir=tmp_path / "out", batch_size=16
    )
    summary = run_rewardbench(config)
    saved, rows = _read_outputs(tmp_path / "out")
    assert saved == json.loads(json.dumps(summary))
    assert len(rows) == summary["pairs"] == len(bundled_pairs.read_text().splitlines())
    assert set(summary["sections"]) == set(SECTIONS) and summary["missing_sections"] == []
    assert all(r["score"] == float(r["chosen_reward"] > r["rejected_reward"]) for r in rows)
    assert {"prompt", "chosen", "rejected"} <= set(rows[0])
    _check_outputs_agree(summary, rows, tmp_path / "out")
    printed = capsys.readouterr().out
    assert "Overall" in printed and "Chat Hard" in printed and "math-prm" in printed


@pytest.fixture
def scripted_judge_server():
    """A loopback OpenAI-compatible /chat/completions endpoint whose judge prefers the longer response,
    reading the responses out of rewards' default pairwise template."""
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            content = body["messages"][-1]["content"]
            a = content.split("[The Start of Assistant A's Answer]\n")[1].split(
                "\n[The End of Assistant A's"
            )[0]
            b = content.split("[The Start of Assistant B's Answer]\n")[1].split(
                "\n[The End of Assistant B's"
            )[0]
            verdict = "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]"
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", requests
    server.shutdown()
    thread.join()


def test_judge_run_through_openai_server(tmp_path, scripted_judge_server, bundled_pairs):
    base_url, requests = scripted_judge_server
    config = RewardBenchConfig.model_validate(
        {
            "data": str(bundled_pairs),
            "judge": {"kind": "openai", "base_url": base_url, "model": "judge", "max_new_tokens": 32},
            "output_dir": str(tmp_path),
            "max_pairs": 30,
            "seed": 5,
        }
    )
    summary = run_rewardbench(config)
    saved, rows = _read_outputs(tmp_path)
    assert summary["pairs"] == len(rows) == 30 and len(requests) == 60  # both orders
    assert {r["model"] for r in requests} == {"judge"} and {r["max_tokens"] for r in requests} == {32}
    assert saved["scorer"] == {"type": "judge", **config.judge.model_dump()}
    assert sum(saved["verdict_counts"].values()) == 60 and set(saved["verdict_counts"]) <= {"A", "B", "tie"}
    # Asked in both orders, a length-preferring judge is consistent: its pair score is the length comparison.
    for row in rows:
        longer = len(row["chosen"]) - len(row["rejected"])
        assert row["score"] == (1.0 if longer > 0 else 0.0 if longer < 0 else 0.5)
        assert len(row["verdicts"]) == 2
    _check_outputs_agree(summary, rows, tmp_path)


def test_tiny_local_transformers_judge_run(tmp_path, bundled_pairs):
    from posttrain.generation.testing import build_tiny_qwen2

    judge_dir = build_tiny_qwen2(tmp_path / "judge")
    config = RewardBenchConfig(
        data=bundled_pairs,
        judge={"kind": "hf", "model": str(judge_dir), "max_new_tokens": 6},
        output_dir=tmp_path / "out",
        max_pairs=8,
        batch_size=16,
    )
    summary = run_rewardbench(config)
    saved, rows = _read_outputs(tmp_path / "out")
    assert len(rows) == 8 and all(len(r["verdicts"]) == 2 for r in rows)
    # Whatever the random model wrote, each score is what its two parsed verdicts give.
    assert all(r["score"] == judge_pair_score(r["verdicts"], r["chosen_position"]) for r in rows)
    _check_outputs_agree(summary, rows, tmp_path / "out")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "exactly one of 'model'"),
        ({"model": "m", "judge": {"kind": "hf", "model": "j"}}, "exactly one of 'model'"),
        ({"model": "m", "batch_sise": 4}, "Extra inputs are not permitted"),
        ({"judge": {"kind": "openai", "model": "j"}}, "base_url is required"),
        ({"judge": {"kind": "hf", "model": "j", "votes": 0}}, "greater than or equal to 1"),
        ({"judge": {"kind": "vllm", "model": "j"}}, "'hf' or 'openai'"),
        (
            {"judge": {"kind": "hf", "model": "j", "base_url": "http://127.0.0.1:1"}},
            "only apply to kind 'openai'",
        ),
        ({"judge": {"kind": "hf", "model": "j", "votes": 3}}, "needs judge.temperature > 0"),
    ],
)
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        RewardBenchConfig.model_validate({"data": "pairs.jsonl", "output_dir": "out", **fields})


def test_recipes_are_valid_configs(repo_root):
    recipes = sorted((repo_root / "recipes").glob("rewardbench_*.yaml"))
    assert recipes
    for recipe in recipes:
        config = RewardBenchConfig.model_validate(yaml.safe_load(recipe.read_text())["rewardbench"])
        assert (repo_root / config.data).exists(), recipe
