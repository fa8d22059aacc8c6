"""A user's own reward, outside the library, named in test recipes by import path."""


def text_length_parity(prompts: list, completions: list, **columns) -> list[float]:
    """1.0 when the completion has an even number of characters: varies between samples of any policy, so
    every group has something to learn from."""
    return [float(len(text) % 2 == 0) for text in completions]
