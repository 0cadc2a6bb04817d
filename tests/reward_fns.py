"""Python reward functions used by the PPO tests (loaded as `reward_fns:<name>` from tests/ on PYTHONPATH)."""

from __future__ import annotations

COMMON = 4096  # BPE ids below this are the tokenizer's most frequent merges (short, common tokens)


def common_token_share(prompts: list, responses: list[str], response_ids: list[list[int]]) -> list[float]:
    """Share of a response's tokens that are target tokens (id < 4096); an empty response scores 0."""
    return [sum(t < COMMON for t in ids) / len(ids) if ids else 0.0 for ids in response_ids]


def not_a_list(prompts: list, responses: list[str]) -> str:
    return "oops"


def banana_share(prompts: list, responses: list[str]) -> list[float]:
    """Share of a response's words that are the target word 'banana' (empty response: 0)."""
    return [r.split().count("banana") / len(r.split()) if r.split() else 0.0 for r in responses]
