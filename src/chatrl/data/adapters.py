"""Adapters for the hub datasets DeepSpeed-Chat names: map their columns onto our schemas.

Keyed by hub name; used automatically for a hub entry in `data.paths`, or for any local copy when
`data.schema` is set to the hub name (e.g. a `save_to_disk` folder of `openai/webgpt_comparisons`).
Each adapter returns a row in one of the schemas of `schemas.py`; `RowError` marks unusable rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from chatrl.data.schemas import RowError

Row = dict[str, Any]
_CITATION = re.compile(r"\s?\[\d+(?:,\s*\d+)*\]")


def _columns(**mapping: str) -> Callable[[Row], Row]:
    """Rename columns: _columns(prompt="question") reads row["question"] into "prompt"."""

    def adapt(row: Row) -> Row:
        out = {}
        for ours, theirs in mapping.items():
            if theirs not in row:
                raise RowError("missing_field", theirs, "is missing")
            out[ours] = row[theirs]
        return out

    return adapt


def _after_assistant(text: Any, key: str) -> str:
    if not isinstance(text, str):
        raise RowError("wrong_type", key, f"must be a string, got {type(text).__name__}")
    return text.split("Assistant:")[-1].strip()


def _yitingxie(row: Row) -> Row:
    # Replies are stored as "Assistant: ..." after a transcript-style prompt (as DeepSpeed-Chat reads them).
    return {"prompt": row.get("prompt"), "chosen": _after_assistant(row.get("chosen"), "chosen"),
            "rejected": _after_assistant(row.get("rejected"), "rejected")}


def _webgpt(row: Row) -> Row:
    question = row.get("question")
    prompt = question.get("full_text") if isinstance(question, dict) else question
    s0, s1 = row.get("score_0"), row.get("score_1")
    if not isinstance(s0, (int, float)) or not isinstance(s1, (int, float)):
        raise RowError("wrong_type", "score_0", "score_0/score_1 must be numbers")
    if s0 == s1:
        raise RowError("tie", "score_0", "both answers have the same score (no preference)")
    best, worst = ("answer_0", "answer_1") if s0 > s1 else ("answer_1", "answer_0")
    strip = lambda t: _CITATION.sub("", t) if isinstance(t, str) else t  # noqa: E731 - citations "[1]" are noise here
    return {"prompt": prompt, "chosen": strip(row.get(best)), "rejected": strip(row.get(worst))}


def _shp(row: Row) -> Row:
    a_better = row.get("labels") in (1, "1", True)
    best, worst = ("human_ref_A", "human_ref_B") if a_better else ("human_ref_B", "human_ref_A")
    return {"prompt": row.get("history"), "chosen": row.get(best), "rejected": row.get(worst)}


# hub name -> (schema the adapted row is in, adapter)
ADAPTERS: dict[str, tuple[str, Callable[[Row], Row]]] = {
    "Dahoas/rm-static": ("preference", _columns(prompt="prompt", chosen="chosen", rejected="rejected")),
    "Dahoas/full-hh-rlhf": ("preference", _columns(prompt="prompt", chosen="chosen", rejected="rejected")),
    "Dahoas/synthetic-instruct-gptj-pairwise": ("preference",
                                                _columns(prompt="prompt", chosen="chosen", rejected="rejected")),
    "yitingxie/rlhf-reward-datasets": ("preference", _yitingxie),
    "Anthropic/hh-rlhf": ("hh", _columns(chosen="chosen", rejected="rejected")),
    "openai/webgpt_comparisons": ("preference", _webgpt),
    "stanfordnlp/SHP": ("preference", _shp),
    "lvwerra/stack-exchange-paired": ("preference",
                                      _columns(prompt="question", chosen="response_j", rejected="response_k")),
    "tatsu-lab/alpaca": ("alpaca", _columns(instruction="instruction", input="input", output="output")),
}


def find_adapter(*names: str | None) -> tuple[str, Callable[[Row], Row]] | None:
    """The first adapter matching any of `names` (hub name, or data.schema set to a hub name)."""
    for name in names:
        if name and name in ADAPTERS:
            return ADAPTERS[name]
    return None
