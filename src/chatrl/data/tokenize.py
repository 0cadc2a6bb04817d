"""Tokenization of records into plain lists, and collators that pad them into typed batches.

Which tokens are "assistant" tokens is found by rendering prefixes of the conversation with the
chat template: `render(messages[:i], add_generation_prompt=True)` ends where reply i starts and
`render(messages[:i+1])` ends after it. The characters in between, minus trailing whitespace the
template adds after the end-of-turn token, are the trained span (reply + "<|im_end|>"). Tokens are
then labelled by their character offsets (fast tokenizers) or by diffing token counts of the text
up to each boundary (slow ones), so BPE merges at the boundaries cannot shift the mask.

Encoders return None for a row dropped by `overlength="drop"` (or left with nothing to train on).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from chatrl.batches import PairBatch, TokenBatch, UnpairedBatch, pad_rows
from chatrl.data.templates import end_of_turn_text, render
from chatrl.data.types import Conversation, LabeledCompletion, Message, PreferencePair, Prompt
from chatrl.errors import ChatrlError

IGNORE = -100
Span = tuple[int, int]


def assistant_spans(tokenizer: Any, messages: list[Message],
                    tools: list[dict] | None = None) -> tuple[str, list[Span]]:
    """The rendered conversation and the [start, end) character span of every assistant reply,
    including its end-of-turn token but not the whitespace the template puts after it. `tools`: function schemas
    offered in the conversation (`render`)."""
    full = render(tokenizer, messages, tools=tools)
    spans: list[Span] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        # transformers refuses to render an empty conversation, so a leading reply is located instead
        head = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools) if i else None
        through = render(tokenizer, messages[: i + 1], tools=tools)
        if head is not None and full.startswith(through) and through.startswith(head) and len(head) >= cursor:
            start, end = len(head), len(through)
        else:  # template not prefix-stable (e.g. injects a default system turn): locate the content
            start = full.find(msg["content"], cursor)
            if start < 0:
                raise ChatrlError(f"cannot locate assistant turn {i} in the rendered chat template")
            end = start + len(msg["content"])
            eot = end_of_turn_text(tokenizer)
            if eot and full.startswith(eot, end):
                end += len(eot)
        end = start + len(full[start:end].rstrip())
        spans.append((start, end))
        cursor = end
    return full, spans


def _token_starts(tokenizer: Any, text: str) -> tuple[list[int], list[int] | None]:
    """Token ids of `text` (no extra special tokens) and each token's start character (fast tokenizers)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [a for a, _ in enc["offset_mapping"]]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]), None


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def _trained_mask(tokenizer: Any, text: str, spans: list[Span]) -> tuple[list[int], list[bool]]:
    """Token ids of `text` and whether each token lies inside one of `spans`."""
    ids, starts = _token_starts(tokenizer, text)
    if starts is not None:
        return ids, [any(s <= a < e for s, e in spans) for a in starts]
    mask = [False] * len(ids)
    for s, e in spans:  # slow tokenizer: diff token counts of the text up to each boundary
        for j in range(_count(tokenizer, text[:s]), min(len(ids), _count(tokenizer, text[:e]))):
            mask[j] = True
    return ids, mask


def encode_conversation(tokenizer: Any, conv: Conversation | list[Message], max_length: int,
                        train_on_prompt: bool = False, overlength: str = "truncate") -> dict[str, list[int]] | None:
    """-> {"input_ids": [T], "labels": [T]}; labels are -100 on every token outside the assistant
    replies (system/user turns, role headers) unless train_on_prompt. Too long: keep the first
    max_length tokens ("truncate") or return None ("drop"); None too if no trained token is left."""
    messages = conv.messages if isinstance(conv, Conversation) else conv
    text, spans = assistant_spans(tokenizer, messages, conv.tools if isinstance(conv, Conversation) else None)
    ids, mask = _trained_mask(tokenizer, text, spans)
    if len(ids) > max_length:
        if overlength == "drop":
            return None
        ids, mask = ids[:max_length], mask[:max_length]
    labels = list(ids) if train_on_prompt else [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
    if not any(m for m in mask):
        return None
    return {"input_ids": ids, "labels": labels}


def _encode_reply(tokenizer: Any, prompt: list[Message], reply: str, max_length: int, max_prompt_length: int,
                  overlength: str) -> tuple[list[int], int] | None:
    """(prompt + reply ids, how many of them are prompt tokens after truncation), or None when dropped."""
    text, spans = assistant_spans(tokenizer, prompt + [{"role": "assistant", "content": reply}])
    start, end = spans[-1]
    ids, starts = _token_starts(tokenizer, text[:end])  # ends exactly at the end-of-turn token
    n_prompt = sum(1 for a in starts if a < start) if starts is not None else _count(tokenizer, text[:start])
    if n_prompt > max_prompt_length:
        if overlength == "drop":
            return None
        ids = ids[n_prompt - max_prompt_length:]  # left-truncate the prompt, keep its last tokens
        n_prompt = max_prompt_length
    if len(ids) > max_length:
        if overlength == "drop":
            return None
        n_prompt = max(0, n_prompt - (len(ids) - max_length))
        ids = ids[-max_length:]  # keep the end: the reward is read at the final token
    return ids, n_prompt


class EncodedPair(NamedTuple):
    """A tokenized preference pair: prompt + reply ids of each side and how many leading ids are prompt."""

    chosen: list[int]
    rejected: list[int]
    chosen_prompt_len: int
    rejected_prompt_len: int


def encode_pair(tokenizer: Any, pair: PreferencePair, max_length: int, max_prompt_length: int,
                overlength: str = "truncate") -> EncodedPair | None:
    """-> chosen and rejected ids (prompt + reply, each ending exactly at the reply's end-of-turn/EOS token) and
    their prompt lengths. Overlong prompts keep their last max_prompt_length tokens."""
    chosen = _encode_reply(tokenizer, pair.prompt_messages, pair.chosen, max_length, max_prompt_length, overlength)
    rejected = _encode_reply(tokenizer, pair.prompt_messages, pair.rejected, max_length, max_prompt_length,
                             overlength)
    if chosen is None or rejected is None or chosen[0] == rejected[0]:
        return None
    return EncodedPair(chosen[0], rejected[0], chosen[1], rejected[1])


def encode_labeled(tokenizer: Any, rec: LabeledCompletion, max_length: int, max_prompt_length: int,
                   overlength: str = "truncate") -> tuple[list[int], int] | None:
    """-> prompt + completion ids (ending at the reply's end-of-turn token) and the prompt's length, as one side of
    `encode_pair`; None when dropped."""
    return _encode_reply(tokenizer, rec.prompt_messages, rec.completion, max_length, max_prompt_length, overlength)


def with_mismatched(rows: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """KTO rows with their mismatched row for the KL reference point added (`kl_ids`, `kl_prompt_len`): row i's
    prompt followed by the completion of the nearest earlier row (cyclically: row i-1, else i-2, ...) whose prompt
    differs, cut to max_length. Fixed once per dataset, as TRL fixes them before shuffling, so the reference's
    log-probs of them can be cached; the nearest different prompt, not simply row i-1, because a pair split into
    two rows puts the same prompt twice in a row. With one prompt only, row i-1's completion is used."""
    prompts = [tuple(r["input_ids"][:r["prompt_len"]]) for r in rows]
    out = []
    for i, r in enumerate(rows):
        j = next((i - k for k in range(1, len(rows)) if prompts[i - k] != prompts[i]), i - 1)
        other = rows[j]
        kl_ids = list(prompts[i]) + list(other["input_ids"][other["prompt_len"]:])
        out.append({**r, "kl_ids": kl_ids[:max_length], "kl_prompt_len": min(r["prompt_len"], max_length)})
    return out


def encode_prompt(tokenizer: Any, prompt: Prompt | list[Message], max_prompt_length: int,
                  overlength: str = "truncate", tools: list[dict] | None = None) -> list[int] | None:
    """Prompt ids ending with the generation prompt (e.g. "<|im_start|>assistant\\n"); overlong prompts
    keep their last max_prompt_length tokens (or are dropped). `tools`: function schemas offered (`render`)."""
    messages = prompt.messages if isinstance(prompt, Prompt) else prompt
    ids, _ = _token_starts(tokenizer, render(tokenizer, messages, add_generation_prompt=True, tools=tools))
    if len(ids) > max_prompt_length:
        if overlength == "drop":
            return None
        ids = ids[-max_prompt_length:]
    return ids


# ----------------------------------------------------------------------------- collators


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of rows of similar length (longest first), for inference over many rows of mixed
    lengths: each batch is padded only to its own longest row, not to the longest of a random draw (hh-rlhf
    conversations run from ~20 to ~1,000 tokens, so data order padded most rows several times over). Longest
    first: a batch that does not fit in memory fails at once. Callers put the results back in row order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), max(1, batch_size))]



def collate_sft(rows: Sequence[dict[str, Any]], pad_id: int) -> TokenBatch:
    """Right-pad SFT rows to [B, T]; labels are -100 on padding."""
    ids = [r["input_ids"] for r in rows]
    input_ids, attention_mask = pad_rows(ids, pad_id)
    return TokenBatch(input_ids=input_ids, attention_mask=attention_mask,
                      labels=pad_rows([r["labels"] for r in rows], IGNORE)[0])


def collate_pairs(rows: Sequence[dict[str, Any]], pad_id: int) -> PairBatch:
    """Chosen rows [0, B) then rejected rows [B, 2B), right padded to [2B, T]; margin [B] (0 if none); reply_mask
    [2B, T] when the rows carry prompt lengths; ref_logps [2B] when they carry reference log-probs."""
    seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    margin = torch.tensor([float(r.get("margin") or 0.0) for r in rows], dtype=torch.float32)
    reply_mask = None
    if all("chosen_prompt_len" in r for r in rows):
        starts = [r["chosen_prompt_len"] for r in rows] + [r["rejected_prompt_len"] for r in rows]
        reply_mask = _reply_mask(seqs, starts)
    input_ids, attention_mask = pad_rows(seqs, pad_id)
    return PairBatch(input_ids=input_ids, attention_mask=attention_mask, margin=margin, reply_mask=reply_mask,
                     ref_logps=_ref_logps(rows))


def _reply_mask(seqs: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> torch.Tensor:
    """[N, T] 1 on each row's tokens after its prompt (the reply, which DPO and KTO score), 0 elsewhere."""
    return pad_rows([[0] * p + [1] * (len(s) - p) for s, p in zip(seqs, prompt_lens, strict=True)], 0)[0]


def _ref_logps(rows: Sequence[dict[str, Any]]) -> torch.Tensor | None:
    """[2B] the rows' cached reference log-probs (first values, then second values), or None without them."""
    if not all("ref_logps" in r for r in rows):
        return None
    return torch.tensor([r["ref_logps"][0] for r in rows] + [r["ref_logps"][1] for r in rows], dtype=torch.float32)


def collate_unpaired(rows: Sequence[dict[str, Any]], pad_id: int) -> UnpairedBatch:
    """KTO rows (`with_mismatched`) -> the examples [0, B) then their mismatched KL rows [B, 2B), right padded to
    [2B, T], with reply_mask, desirable [B] and ref_logps [2B] when the rows carry reference log-probs."""
    seqs = [r["input_ids"] for r in rows] + [r["kl_ids"] for r in rows]
    starts = [r["prompt_len"] for r in rows] + [r["kl_prompt_len"] for r in rows]
    input_ids, attention_mask = pad_rows(seqs, pad_id)
    return UnpairedBatch(input_ids=input_ids, attention_mask=attention_mask, reply_mask=_reply_mask(seqs, starts),
                         desirable=torch.tensor([bool(r["desirable"]) for r in rows]), ref_logps=_ref_logps(rows))


def pack_rows(rows: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Greedily concatenate SFT rows (in order) into rows of at most max_length tokens, labels kept.
    Rows are never split. Like TRL's simple packing, attention is NOT blocked at row boundaries:
    a packed row is one causal sequence, so later conversations can attend to earlier ones."""
    packed: list[dict[str, list[int]]] = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    for r in rows:
        ids, labels = list(r["input_ids"])[:max_length], list(r["labels"])[:max_length]
        if cur_ids and len(cur_ids) + len(ids) > max_length:
            packed.append({"input_ids": cur_ids, "labels": cur_labels})
            cur_ids, cur_labels = [], []
        cur_ids += ids
        cur_labels += labels
    if cur_ids:
        packed.append({"input_ids": cur_ids, "labels": cur_labels})
    return packed
