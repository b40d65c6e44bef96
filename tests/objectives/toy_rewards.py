"""A reward for the training tests: random completions of a tiny model rarely earn the built-in rewards, so the
advantages (and the updates) would all be zero. This one differs between any two different completions."""


def distinct_characters(prompts, completions, **fields):
    """One tenth of the number of distinct characters of each completion."""
    return [len(set(c)) / 10 for c in completions]
