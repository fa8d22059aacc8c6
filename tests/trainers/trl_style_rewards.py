"""Rewards written the way TRL users write them: only `completions` by name, conversational completions
(a list of one assistant message) indexed directly, every other argument swallowed by **kwargs."""


def even_length(completions, **kwargs):
    """1.0 when the completion's text has an even number of characters."""
    return [float(len(completion[0]["content"]) % 2 == 0) for completion in completions]
