"""Model adapters for evaluation: load, format prompts, generate, token log-probs, reward scores.

Everything that touches a model lives here, on top of the shared helpers: `chatrl.models.loading` (pad != eos,
chat template), `chatrl.data.tokenize` (prompt / reply encoding exactly as training sees it),
`chatrl.models.reward.sequence_scores` (the score at the last real token) and the engine's batched decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from chatrl.algorithms.losses import token_logprobs
from chatrl.batches import pad_rows
from chatrl.data.tokenize import assistant_spans, encode_prompt, length_batches
from chatrl.data.types import Message
from chatrl.eval.metrics import position_kl
from chatrl.models.loading import last_positions, load_frozen_causal_lm, load_tokenizer
from chatrl.models.reward import load_reward_model, sequence_scores
from chatrl.rollout.decode import generate as engine_generate
from chatrl.rollout.guided import load_guidance
from chatrl.rollout.sampling import GenerationSettings


@dataclass
class Generation:
    """Responses to a list of prompts; `response_ids` end with the EOS token when the model emitted one."""
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    ended_with_eos: list[bool]

    @property
    def lengths(self) -> list[int]:
        """Response length in tokens, not counting the closing EOS."""
        return [len(r) - int(e) for r, e in zip(self.response_ids, self.ended_with_eos, strict=True)]


def load_policy(path: str, dtype: str | torch.dtype = "fp32"):
    """A frozen causal LM and its tokenizer (pad != eos, chat template present); aliases like `tiny-random` work.
    A folder with ILQL heads is the Q-guided policy at its saved beta (what `chatrl chat` decodes with).

    fp32 by default: KL and greedy decoding should not depend on bf16 rounding. Returns (model, tokenizer).
    """
    tok = load_tokenizer(path)
    model = load_frozen_causal_lm(path, dtype=dtype, tokenizer=tok)
    guidance = load_guidance(path, model, beta=None) if Path(path).is_dir() else None
    return (guidance.wrap(model) if guidance else model), tok


def load_reward(path: str, dtype: str | torch.dtype = "fp32"):
    """A frozen reward model (one-label sequence classifier) and its tokenizer; returns (model, tokenizer)."""
    tok = load_tokenizer(path)
    return load_reward_model(path, dtype=dtype, tokenizer=tok, trainable=False), tok


def _max_positions(model) -> int:
    return int(getattr(model.config.get_text_config(), "max_position_embeddings", None) or 2048)


def encode_prompts(tok, prompts: Sequence[Sequence[Message]], max_tokens: int) -> list[list[int]]:
    """Token ids of each rendered prompt (ending with the generation prompt), keeping the last `max_tokens`."""
    return [encode_prompt(tok, list(m), max_tokens) for m in prompts]


def reward_ids(tok, prompt: Sequence[Message], reply: str, max_tokens: int) -> list[int]:
    """Ids of prompt + reply ending exactly at the reply's end-of-turn token (as the reward step trains),
    keeping the last `max_tokens`: the score is read at the final token."""
    text, spans = assistant_spans(tok, list(prompt) + [{"role": "assistant", "content": reply}])
    return tok(text[:spans[-1][1]], add_special_tokens=False)["input_ids"][-max_tokens:]


@torch.inference_mode()
def generate(model, tok, prompts: Sequence[Sequence[Message]], *, max_new_tokens: int, greedy: bool = True,
             temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8, seed: int = 0,
             max_prompt_tokens: int | None = None) -> Generation:
    """One response per prompt with the engine's batched decoder (left-padded B x P prompts)."""
    limit = max(1, _max_positions(model) - max_new_tokens)
    prompt_ids = encode_prompts(tok, prompts, min(limit, max_prompt_tokens or limit))  # keeps the last tokens
    eos, pad = tok.eos_token_id, tok.pad_token_id
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=temperature,
                                  top_p=top_p, generator=torch.Generator().manual_seed(seed))
    responses: list[list[int]] = [[] for _ in prompt_ids]
    for rows in length_batches([len(p) for p in prompt_ids], batch_size):  # prompts of similar length together
        chunk = [prompt_ids[i] for i in rows]
        input_ids, mask = pad_rows(chunk, pad, side="left")
        out, out_mask = engine_generate(model, input_ids, mask, settings, eos, pad)
        for i, row, n in zip(rows, out.tolist(), out_mask.sum(-1).tolist(), strict=True):
            responses[i] = row[:n]  # up to and including the first EOS
    ended = [bool(r) and r[-1] == eos for r in responses]
    texts = [tok.decode(r[:len(r) - int(e)], skip_special_tokens=True).strip()
             for r, e in zip(responses, ended, strict=True)]
    return Generation(prompt_ids, responses, texts, ended)


def response_step_logits(model, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]],
                         pad_id: int, batch_size: int = 8):
    """Yield (row, logits [r_len, V] fp32) predicting each response token of each row (rows right-padded), in
    batches of similar total length; only positions from the batch's shortest prompt on go through the LM head."""
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    for batch in length_batches(lengths, batch_size):
        rows = [list(prompt_ids[b]) + list(response_ids[b]) for b in batch]
        ids, attn = pad_rows(rows, pad_id)
        width = ids.shape[1]
        first = max(0, min(len(prompt_ids[b]) for b in batch) - 1)  # no prompt logits are ever read before this
        logits = model(input_ids=ids, attention_mask=attn,
                       logits_to_keep=last_positions(width, width - first)).logits  # B x (T - first) x V
        for j, b in enumerate(batch):
            p_len, r_len = len(prompt_ids[b]) - first, len(response_ids[b])
            if r_len:  # logits at position t predict token t + 1
                yield b, logits[j, p_len - 1:p_len - 1 + r_len].float()


@torch.inference_mode()
def response_logprobs(model, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]],
                      pad_id: int, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each response token given its prompt.

    Returns (logp, mask), both B x R (R = longest response), mask 1 on real response tokens.
    """
    width_r = max((len(r) for r in response_ids), default=0)
    logp = torch.zeros(len(response_ids), max(width_r, 1))
    mask = torch.zeros_like(logp)
    for b, step_logits in response_step_logits(model, prompt_ids, response_ids, pad_id, batch_size):
        targets = torch.tensor(response_ids[b])
        logp[b, :len(targets)] = token_logprobs(step_logits[None], targets[None])[0]
        mask[b, :len(targets)] = 1
    return logp, mask


@torch.inference_mode()
def response_kl(model, ref_model, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]],
                pad_id: int, batch_size: int = 8) -> list[float]:
    """Exact KL(model || ref) summed over each response's positions (full next-token distributions)."""
    out = [0.0] * len(response_ids)
    ref_rows = response_step_logits(ref_model, prompt_ids, response_ids, pad_id, batch_size)
    for (b, logits), (_, ref_logits) in zip(response_step_logits(model, prompt_ids, response_ids, pad_id,
                                                                 batch_size), ref_rows, strict=True):
        out[b] = position_kl(logits, ref_logits).sum().item()
    return out


@torch.inference_mode()
def reward_scores(model, tok, prompts: Sequence[Sequence[Message]], replies: Sequence[str],
                  batch_size: int = 8, advance: Callable[[int], object] = lambda n: None) -> list[float]:
    """Reward-model score of each (prompt, reply): the value at the last real token of right-padded rows.
    `advance(n)` is called after each batch of n replies (a progress bar's `update`)."""
    max_len = min(_max_positions(model), tok.model_max_length)
    pad = tok.pad_token_id
    encoded = [reward_ids(tok, m, r, max_len) for m, r in zip(prompts, replies, strict=True)]
    scores = [0.0] * len(encoded)
    for batch in length_batches([len(e) for e in encoded], batch_size):  # similar lengths: little padding
        ids, attn = pad_rows([encoded[i] for i in batch], pad)
        for i, s in zip(batch, sequence_scores(model, ids, attn).tolist(), strict=True):
            scores[i] = s
        advance(len(batch))
    return scores
