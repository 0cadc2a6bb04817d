"""PPO experience: turn generated responses into a `Rollout` (log-probs, reference log-probs, values,
sequence scores), plus Python reward functions. B = rollout rows on this process, P = prompt length
(left padded), R = response length (right padded)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from chatrl.algorithms.losses import token_logprobs
from chatrl.batches import Rollout
from chatrl.errors import ChatrlError
from chatrl.models.loading import last_positions
from chatrl.models.reward import position_ids_from_mask, sequence_scores, token_values
from chatrl.plugins import load_object

RewardFn = Callable[..., list[float]]


def joined(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
           response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt [B,P] + response [B,R] -> ids, mask [B, P+R] (holes only at the left and the right end)."""
    return torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1).long()


def response_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int,
                    temperature: float = 1.0) -> torch.Tensor:
    """Logits [B, R, V] that predict each response token: positions P-1 .. P+R-2 of the joined sequence, divided
    by the rollout's sampling temperature, so log-probs, ratios, KL and entropy are those of the distribution the
    responses were sampled from (as TRL and veRL do). Only the last R+1 positions go through the LM head
    (`logits_to_keep`): prompt logits are never needed."""
    keep = ids.shape[1] - prompt_len + 1
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False,
                logits_to_keep=last_positions(ids.shape[1], keep, ids.device))
    logits = out.logits[:, :-1]
    return logits if temperature == 1.0 else logits / temperature


def response_logprobs(model: Any, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """log pi(a_t | s_t) [B, R] of the response tokens (fp32) at the sampling temperature."""
    return token_logprobs(response_logits(model, ids, mask, prompt_len, temperature), ids[:, prompt_len:])


def response_values(critic: Any, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """V(s_t) [B, R]: the critic's value at the token before each response token (fp32)."""
    return token_values(critic, ids, mask)[:, prompt_len - 1:-1]


# ----------------------------------------------------------------------------- reward functions


def load_reward_function(spec: str) -> RewardFn:
    """`pkg.module:fn` (importable) or `path/to/file.py:fn`; fn(prompts, responses, **columns) -> list[float]."""
    return load_object(spec, "reward function", "reward.functions")  # type: ignore[return-value]


def call_reward_function(fn: RewardFn, spec: str, prompts: list[Any], responses: list[str],
                         columns: dict[str, list[Any]]) -> torch.Tensor:
    """Call one function and check it returned one finite float per response."""
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    extra = {k: v for k, v in columns.items() if takes_any or k in params}
    values = fn(prompts=prompts, responses=responses, **extra)
    try:
        out = torch.tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError):
        raise ChatrlError(f"reward function '{spec}' must return a list of floats, got {values!r:.200}") from None
    if out.shape[0] != len(responses):
        raise ChatrlError(f"reward function '{spec}' returned {out.shape[0]} values for {len(responses)} responses")
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_rollout(*, actor: Any, reference: Any, critic: Any | None, reward_model: Any | None,
                  prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                  response_mask: torch.Tensor, function_scores: torch.Tensor, model_weight: float,
                  temperature: float = 1.0) -> Rollout:
    """Step 2 of a PPO iteration: everything the update needs, computed once with the rollout's weights."""
    ids, mask = joined(prompt_ids, prompt_mask, response_ids, response_mask)
    plen = prompt_ids.shape[1]
    logprobs = response_logprobs(actor, ids, mask, plen, temperature)
    ref_logprobs = response_logprobs(reference, ids, mask, plen, temperature)
    values = response_values(critic, ids, mask, plen) if critic is not None else torch.zeros_like(logprobs)
    scores = function_scores.to(logprobs.device)
    if reward_model is not None:
        # an empty response is scored at the prompt's last token: the rule handles it, nothing crashes
        scores = scores + model_weight * sequence_scores(reward_model, ids, mask).float()
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                   response_mask=response_mask.float(), logprobs=logprobs, ref_logprobs=ref_logprobs,
                   values=values * response_mask, scores=scores)


def select(rollout: Rollout, idx: torch.Tensor, **extra: torch.Tensor) -> tuple[Rollout, dict[str, torch.Tensor]]:
    """Rows `idx` of a rollout (and of extra per-row tensors such as advantages)."""
    fields = {k: getattr(rollout, k)[idx] for k in rollout.__dataclass_fields__}
    return Rollout(**fields), {k: v[idx] for k, v in extra.items()}
