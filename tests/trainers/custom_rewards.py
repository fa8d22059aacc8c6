"""A user's own reward, outside the library, named in test recipes by import path."""


def text_length_parity(prompts: list, completions: list, **columns) -> list[float]:
    """1.0 when the completion has an even number of characters: varies between samples of any policy, so
    every group has something to learn from."""
    return [float(len(text) % 2 == 0) for text in completions]


def digit_fraction(prompts: list, completions: list, **columns) -> list[float]:
    """The fraction of a completion's characters that are digits: a target any policy can learn quickly."""
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]
