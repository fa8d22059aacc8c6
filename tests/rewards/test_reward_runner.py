"""RewardRunner and BoundedPool: weighted totals, the None rules, and failures that are bounded and counted."""

import threading
import time

import pytest
import reward_fixtures

from rewards import BoundedPool, RewardRunner, RewardSpec, math_accuracy
from rewards.pool import Call

FIXTURES = "reward_fixtures"


@pytest.fixture(scope="module")
def pool():
    with BoundedPool(2) as pool:
        yield pool


def test_pool_kills_hung_calls_and_keeps_the_rest(pool):
    calls = [Call(reward_fixtures.hang_on_marker, ([None], [text]), 0.5) for text in ["a", "HANG", "b", "c"]]
    calls += [Call(reward_fixtures.sleep_on_marker, ([None], ["SLEEP"]), 0.5)]
    restarts = pool.restarts
    started = time.monotonic()
    outcomes = pool.map(calls, chunk_size=4)
    assert time.monotonic() - started < 3.0
    assert [o.value for o in outcomes[:4]] == [[1.0], None, [1.0], [1.0]]
    assert [o.timed_out for o in outcomes] == [False, True, False, False, True]
    assert outcomes[1].error == "timed out after 0.5 s"
    assert pool.restarts == restarts + 2
    assert pool.map([Call(reward_fixtures.constant_half, ([None], ["x"]), 1.0)])[0].value == [0.5]


def test_pool_reports_exceptions_and_dead_workers(pool):
    texts = ["RAISE", "fine", "DIE", "fine"]
    outcomes = pool.map([Call(reward_fixtures.raise_on_marker, ([None], [t]), 5.0) for t in texts[:2]])
    outcomes += pool.map([Call(reward_fixtures.die_on_marker, ([None], [t]), 5.0) for t in texts[2:]])
    assert "ZeroDivisionError: the reward divided by zero" in outcomes[0].error
    assert "reward_fixtures.py" in outcomes[0].error
    assert outcomes[1].value == [1.0]
    assert outcomes[2].error == "worker process died (exit code 7)" and not outcomes[2].timed_out
    assert outcomes[3].value == [1.0]


def test_pool_keeps_workers_warm(pool):
    calls = [Call(reward_fixtures.worker_pid, ([None], ["x"]), 5.0) for _ in range(40)]
    first = {o.value[0] for o in pool.map(calls)}
    second = {o.value[0] for o in pool.map(calls)}
    assert first == second and 1 <= len(first) <= 2


def test_weighted_total_and_none_rules():
    specs = [
        RewardSpec(f"{FIXTURES}:constant_half", weight=2.0),
        RewardSpec(f"{FIXTURES}.not_applicable_to_code", weight=0.5),
        RewardSpec(f"{FIXTURES}.raise_on_marker", weight=1.0),
    ]
    completions = ["ok", "ok", "RAISE", "ok"]
    kind = ["math", "code", "math", "code"]
    with RewardRunner(specs, workers=2, timeout_s=5.0) as runner:
        scores = runner.score(["p"] * 4, completions, {"kind": kind})
    assert scores.per_function[f"{FIXTURES}:constant_half"] == [0.5, 0.5, 0.5, 0.5]
    assert scores.per_function[f"{FIXTURES}.not_applicable_to_code"] == [1.0, None, 1.0, None]
    assert scores.per_function[f"{FIXTURES}.raise_on_marker"] == [1.0, 1.0, None, 1.0]
    # 2*0.5 + 0.5*1 + 1; the code rows skip the reward that does not apply; the raising row has no total
    assert scores.total == [2.5, 2.0, None, 2.0]
    assert scores.none_counts == {s.name: n for s, n in zip(specs, [0, 2, 1], strict=True)}
    assert scores.error_counts[f"{FIXTURES}.raise_on_marker"] == 1
    assert sum(scores.timeout_counts.values()) == 0
    [failure] = scores.failures
    assert failure.sample == 2 and "ZeroDivisionError" in failure.message and not failure.timed_out


def test_a_hanging_reward_costs_one_sample_not_the_batch():
    completions = ["a", "HANG", "b", "c", "d", "e"]
    specs = [
        RewardSpec(f"{FIXTURES}.hang_on_marker", timeout_s=0.5),
        RewardSpec(f"{FIXTURES}.length_of_completion"),
    ]
    with RewardRunner(specs, workers=2, timeout_s=5.0) as runner:
        started = time.monotonic()
        scores = runner.score(["p"] * 6, completions)
        elapsed = time.monotonic() - started
    assert elapsed < 3.0
    assert scores.per_function[f"{FIXTURES}.hang_on_marker"] == [1.0, None, 1.0, 1.0, 1.0, 1.0]
    assert scores.total == [2.0, None, 2.0, 2.0, 2.0, 2.0]
    assert scores.timeout_counts[f"{FIXTURES}.hang_on_marker"] == 1
    assert scores.failures[0].timed_out and scores.failures[0].sample == 1


def test_bad_return_values_are_failures_not_crashes():
    specs = [RewardSpec(f"{FIXTURES}.wrong_length"), RewardSpec(f"{FIXTURES}.returns_text")]
    with RewardRunner(specs, workers=1) as runner:
        scores = runner.score(["p"], ["c"])
    assert scores.total == [None]
    messages = sorted(f.message for f in scores.failures)
    assert "must return a list of 1 floats or None, got a list of length 2" in messages[0]
    assert "must return floats or None, got '1.0'" in messages[1]


def test_batched_and_in_process_rewards_see_the_whole_batch():
    specs = [
        RewardSpec("fixture_group_rank"),
        RewardSpec(f"{FIXTURES}.group_rank", in_process=True, weight=10.0),
    ]
    with RewardRunner(specs, workers=1) as runner:
        scores = runner.score(["p"] * 3, ["ccc", "a", "bb"])
    assert scores.per_function["fixture_group_rank"] == [2.0, 0.0, 1.0]
    assert scores.total == [22.0, 0.0, 11.0]


def test_runner_rejects_bad_input():
    with pytest.raises(ValueError, match="cannot be sent to worker processes"):
        RewardRunner([RewardSpec("reward_fixtures.unpicklable")])
    with pytest.raises(ValueError, match="listed twice"):
        RewardRunner([RewardSpec("math_accuracy"), RewardSpec("math_accuracy")])
    with RewardRunner([RewardSpec("math_accuracy")], workers=1) as runner:
        with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
            runner.score(["p", "p"], ["a", "b"], {"answer": ["1"]})


def test_power_tower_is_bounded_in_the_runner_and_from_a_thread():
    tower = "So the answer is $\\boxed{10^{10^{10^{10}}}}$."
    product = "So the answer is $\\boxed{\\prod_{n=1}^{10^{7}} n}$."
    completions = [tower, product, "\\boxed{2}", "\\boxed{3}"]
    answers = ["2", "2", "2", "2"]
    with RewardRunner([RewardSpec("math_accuracy")], workers=2, timeout_s=1.0) as runner:
        started = time.monotonic()
        scores = runner.score(["p"] * 4, completions, {"answer": answers})
        assert time.monotonic() - started < 4.0
    assert scores.per_function["math_accuracy"] == [0.0, None, 1.0, 0.0]  # the tower is screened, not killed
    assert scores.timeout_counts["math_accuracy"] == 1

    results = {}  # math_accuracy called directly, off the main thread, where signal-based timeouts cannot work
    thread = threading.Thread(
        target=lambda: results.update(r=math_accuracy(["p"] * 4, completions, answers, timeout_s=1.0))
    )
    started = time.monotonic()
    thread.start()
    thread.join(timeout=30)
    assert time.monotonic() - started < 5.0
    assert results["r"] == [0.0, 0.0, 1.0, 0.0]  # direct calls score an unfinished check as wrong


def test_a_call_the_worker_cannot_load_is_a_failure(pool, tmp_path, monkeypatch):
    (tmp_path / "late_module.py").write_text("def f(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # after the workers started: they cannot import it
    import late_module

    outcomes = pool.map([Call(late_module.f, (1,), 5.0), Call(late_module.f, (2,), 5.0)])
    assert all("could not load the call in the worker: ModuleNotFoundError" in o.error for o in outcomes)
    assert pool.map([Call(reward_fixtures.constant_half, ([None], ["x"]), 5.0)])[0].value == [0.5]
    with pytest.raises(TypeError, match="must pickle"):
        pool.map([Call(reward_fixtures.constant_half, (lambda: 0,), 5.0)])


def test_an_empty_batch():
    with RewardRunner([RewardSpec("math_accuracy")], workers=1) as runner:
        scores = runner.score([], [], {"answer": []})
    assert scores.total == [] and scores.per_function == {"math_accuracy": []}


def test_a_zero_weight_reward_is_only_watched():
    specs = [RewardSpec(f"{FIXTURES}.constant_half"), RewardSpec(f"{FIXTURES}.raise_on_marker", weight=0.0)]
    with RewardRunner(specs, workers=1) as runner:
        scores = runner.score(["p", "p"], ["RAISE", "ok"])
    assert scores.total == [0.5, 0.5]
    assert scores.error_counts[f"{FIXTURES}.raise_on_marker"] == 1


def test_a_reward_whose_import_outlasts_the_deadline_is_scored_from_its_first_call(tmp_path, monkeypatch):
    """Workers import a plug-in and call it once before their first deadline starts (the first worker and the
    replacement of the one killed on HANG alike); a call that really hangs is still killed and counted."""
    (tmp_path / "slow_import_reward.py").write_text(
        "import time\n\n"
        "time.sleep(1.5)  # an import slower than the deadline, e.g. a large library on a loaded machine\n\n\n"
        "def length_or_hang(prompts, completions, **columns):\n"
        "    while 'HANG' in completions[0]:\n"
        "        pass\n"
        "    return [float(len(completions[0]))]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # before the workers start: they inherit the parent's path
    with RewardRunner([RewardSpec("slow_import_reward:length_or_hang")], workers=1, timeout_s=1.0) as runner:
        scores = runner.score(["p"] * 4, ["a", "bb", "HANG", "dddd"])
        assert runner.pool.restarts == 1
    assert scores.per_function["slow_import_reward:length_or_hang"] == [1.0, 2.0, None, 4.0]
    assert scores.timeout_counts["slow_import_reward:length_or_hang"] == 1
    [failure] = scores.failures
    assert failure.sample == 2 and failure.timed_out and failure.message == "timed out after 1 s"


def test_a_warm_up_that_hangs_is_dropped_and_the_calls_stay_bounded(caplog):
    hangs = Call(reward_fixtures.sleep_on_marker, ([None], ["SLEEP"]), 0.5)
    with BoundedPool(1, warmup_timeout_s=1.0) as pool:
        pool.set_warmup([hangs])
        started = time.monotonic()
        outcomes = pool.map([hangs, Call(reward_fixtures.constant_half, ([None], ["x"]), 0.5)], chunk_size=2)
        assert time.monotonic() - started < 4.0
        assert pool.restarts == 2  # the worker stuck in its warm-up, then the one stuck in the call
    assert outcomes[0].timed_out and outcomes[0].error == "timed out after 0.5 s"
    assert outcomes[1].value == [0.5]
    assert "warm-up failed (worker not ready after 1 s)" in caplog.text
