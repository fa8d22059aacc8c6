"""Finding rewards: decorator, entry points, import paths; and the message shapes rewards receive."""

import textwrap
from pathlib import Path

import pytest

import rewards
from rewards import RewardRunner, RewardSpec, get, register
from rewards.registry import message_text


def test_register_and_get():
    @register("test_registry_constant")
    def constant(prompts, completions, **columns):
        return [0.25] * len(completions)

    assert get("test_registry_constant") is constant
    assert "test_registry_constant" in rewards.available()
    assert (
        register("test_registry_constant")(constant) is constant
    )  # registering the same function again is fine
    with pytest.raises(ValueError, match="already registered"):
        register("test_registry_constant")(lambda prompts, completions: [])


def test_import_paths():
    assert get("rewards.format:tag_count") is rewards.tag_count
    assert get("rewards.format.tag_count") is rewards.tag_count
    with pytest.raises(KeyError, match="cannot import module 'no_such_module'"):
        get("no_such_module:fn")
    with pytest.raises(KeyError, match="has no attribute 'nope'"):
        get("rewards.format:nope")
    with pytest.raises(KeyError, match="unknown reward 'nonexistent'.*math_accuracy"):
        get("nonexistent")


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A user's package, installed with an entry point in the posttrain.rewards group; the library is untouched."""
    (tmp_path / "my_reward_plugin.py").write_text(
        textwrap.dedent(
            """
            def shout(prompts, completions, **columns):
                return [float(c.isupper()) for c in completions]
            """
        )
    )
    dist_info = tmp_path / "my_reward_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-reward-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[posttrain.rewards]\nshouting = my_reward_plugin:shout\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    import sys

    sys.modules.pop("my_reward_plugin", None)


def test_entry_point_reward_runs_from_a_recipe(installed_plugin):
    assert "shouting" in rewards.available()
    assert get("shouting")([""], ["HEY"]) == [1.0]
    with RewardRunner([RewardSpec("shouting", weight=2.0)], workers=1) as runner:  # workers import it too
        scores = runner.score(["", ""], ["HEY", "hey"])
    assert scores.total == [2.0, 0.0]


def test_message_text():
    assert message_text("plain") == "plain"
    chat = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "question"},
        {"role": "assistant", "content": "first"},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "last "}, {"type": "text", "text": "answer"}],
        },
    ]
    assert message_text(chat) == "last answer"
    assert message_text(chat, role="user") == "question"
    assert message_text([{"role": "user", "content": "q"}]) == ""
    with pytest.raises(TypeError, match="expected a string or a list of chat messages, got int"):
        message_text(3)


def test_the_documented_custom_reward_plugs_into_a_recipe(tmp_path, monkeypatch):
    """docs/rewards.md's example, as written: the module and the recipe's rewards section."""
    import re

    import yaml

    doc = (Path(__file__).resolve().parents[2] / "docs" / "rewards.md").read_text()
    (tmp_path / "my_rewards.py").write_text(re.search(r"```python\n(.*?)```", doc, re.DOTALL).group(1))
    recipe = yaml.safe_load(re.search(r"```yaml\n(.*?)```", doc, re.DOTALL).group(1))["rewards"]
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = [RewardSpec(f["name"], f["weight"], f.get("kwargs", {})) for f in recipe["functions"]]
    completions = ["\\boxed{4}", " ", "\\boxed{5} " + "word " * 224, "\\boxed{4} " + "word " * 399]
    with RewardRunner(specs, workers=1, timeout_s=recipe["timeout_s"]) as runner:
        scores = runner.score([""] * 4, completions, {"answer": ["4"] * 4})
    # concise with max_words 150: 1 word -> 1.0; 225 words -> 2 - 225/150 = 0.5; 400 words -> 0.0
    assert scores.per_function["my_rewards:concise"] == [1.0, None, 0.5, 0.0]
    assert scores.per_function["math_accuracy"] == [1.0, 0.0, 0.0, 1.0]
    assert scores.total == [1.2, 0.0, pytest.approx(0.1), 1.0]
