"""The benchmark's prompts: deterministic user messages whose chat-templated form is EXACTLY `length` tokens.

chatrl cannot take raw token ids (its prompts go through the data pipeline: read -> clean -> chat template), so
the prompts are text, written as a `{"prompt": ...}` JSONL file for `chatrl ppo|grpo data.paths=[...]`.
`verified_prompt_ids` reads that file back through chatrl's own pipeline (`load_records` with the run's data
section, then `encode_prompt`, what the rollout calls) and fails unless every prompt is exactly `length` tokens;
those ids go to the TRL side, which checks that its own tokenization gives the same ids (`trl_common.tokenizer_for`).
Runs in chatrl's venv.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Common words that are one token each (with their leading space) in SmolLM2's BPE: filling with them moves the
# length one token at a time. Any tokenizer works: a word that adds 2+ tokens is skipped when it would overshoot.
WORDS = ("the", "cat", "and", "dog", "sat", "on", "a", "red", "mat", "in", "big", "house", "with", "blue", "door",
         "near", "old", "tree", "by", "river", "under", "warm", "sun", "of", "late", "summer")


def templated_length(tokenizer: Any, text: str) -> int:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    return len(ids)


def make_prompts(tokenizer: Any, n: int, length: int) -> list[str]:
    """n distinct prompts ("Task i: write about ..." + filler words) of exactly `length` templated tokens."""
    out = []
    for i in range(n):
        text = f"Task {i}: write about"
        if templated_length(tokenizer, text) > length:
            raise ValueError(f"length {length} is shorter than the chat template's frame plus '{text}'")
        k = i  # each prompt walks the word list from its own offset, so prompts differ beyond their number
        misses = 0
        while (cur := templated_length(tokenizer, text)) < length:
            candidate = f"{text} {WORDS[k % len(WORDS)]}"
            k += 1
            if templated_length(tokenizer, candidate) <= length:
                text, misses = candidate, 0
            elif (misses := misses + 1) > len(WORDS):
                raise ValueError(f"cannot fill prompt {i} to exactly {length} tokens (stuck at {cur})")
        out.append(text)
    return out


def write_prompts(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts), encoding="utf-8")


def verified_prompt_ids(data_cfg: Any, tokenizer: Any, texts: list[str], length: int) -> list[list[int]]:
    """Token ids of `texts` as chatrl's pipeline makes them from the data file `data_cfg.paths` names (the run's
    own data section), in the file's order; raises ValueError unless each one is exactly `length` tokens and the
    pipeline kept every prompt unchanged."""
    from chatrl.data.prepare import load_records  # chatrl's venv only: the TRL side never imports this module
    from chatrl.data.tokenize import encode_prompt

    records, _ = load_records(data_cfg, "rlhf", "train")
    by_text = {r.messages[-1]["content"]: r for r in records}
    if len(records) != len(texts) or set(by_text) != set(texts):
        raise ValueError(f"chatrl's pipeline kept {len(records)} of {len(texts)} prompts (or changed their text): "
                         "check data.split / eval_fraction / cleaning")
    ids = []
    for text in texts:
        got = encode_prompt(tokenizer, by_text[text], max_prompt_length=10**9)  # no truncation: see the real length
        if got is None or len(got) != length:
            raise ValueError(f"prompt {text!r} is {0 if got is None else len(got)} tokens in chatrl, not {length}")
        ids.append(list(got))
    return ids
