"""Experience for the policy update: episodes -> rewards -> log-probs, KL, advantages.

B = rollout rows on this process, P = prompt length (left padded), R = response length (right padded).
Shared by `chatrl ppo` and `chatrl grpo` (and the benches): nothing here knows which step runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from chatrl.algorithms.losses import token_logprobs
from chatrl.algorithms.rewards import final_reward, overlong_penalty, turn_rewards
from chatrl.batches import Rollout, pad_rows
from chatrl.judge import Judge
from chatrl.models.loading import last_positions
from chatrl.models.reward import position_ids_from_mask, sequence_scores, token_values
from chatrl.reward_functions import RewardFunctions, columns_of
from chatrl.rollout.episodes import EpisodeBatch


def joined(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
           response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt [B,P] + response [B,R] -> ids, mask [B, P+R] (holes only at the left and the right end)."""
    return torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1).long()


def response_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int,
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


def response_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """log pi(a_t | s_t) [B, R] of the response tokens (fp32) at the sampling temperature."""
    return token_logprobs(response_logits(model, ids, mask, prompt_len, temperature), ids[:, prompt_len:])


def response_values(critic: nn.Module, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """V(s_t) [B, R]: the critic's value at the token before each response token (fp32)."""
    return token_values(critic, ids, mask)[:, prompt_len - 1:-1]


# ----------------------------------------------------------------------------- episodes -> tensors


@dataclass
class EpisodeTensors:
    """An EpisodeBatch padded into tensors (see `Rollout` for the masks' meaning)."""

    prompt_ids: torch.Tensor     # [B, P] left padded
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor   # [B, R] right padded
    response_mask: torch.Tensor
    action_mask: torch.Tensor
    env_rewards: torch.Tensor    # [B, R] per-turn rewards on each turn's last generated token, discounted per turn
    final_discount: torch.Tensor  # [B] gamma^k of the last turn k: the final score's discount (same token)
    sampler_logprobs: torch.Tensor | None = None  # [B, R] the sampler's log-probs (EpisodeBatch.sampler_logprobs),
    #                                               0 off the actions; None when the batch carries none


def episode_tensors(batch: EpisodeBatch, pad_id: int, gamma: float, device: torch.device) -> EpisodeTensors:
    n = len(batch)
    prompt_ids, prompt_mask = pad_rows(batch.prompt_ids, pad_id, "left")
    # at least one response column, even when every reply is empty
    response_ids, response_mask = pad_rows(batch.response_ids, pad_id, "right", min_width=1)
    rlen = response_ids.shape[1]
    response_mask = response_mask.float()
    action_mask = pad_rows(batch.action_mask, 0, "right", min_width=rlen)[0].float()
    turns = max(1, max(len(t) for t in batch.turn_rewards))
    values, positions, valid = torch.zeros(n, turns), torch.zeros(n, turns, dtype=torch.long), torch.zeros(n, turns)
    for i in range(n):
        k = len(batch.turn_rewards[i])
        values[i, :k] = torch.tensor(batch.turn_rewards[i])
        positions[i, :k] = torch.tensor(batch.turn_ends[i], dtype=torch.long)
        valid[i, :k] = 1
    env_rewards = turn_rewards(values, positions, valid, rlen, gamma)
    final_discount = torch.tensor([gamma ** max(len(t) - 1, 0) for t in batch.turn_rewards], dtype=torch.float32)
    sampler = None
    if len(batch.sampler_logprobs) == n:
        sampler = torch.zeros((n, rlen), dtype=torch.float32)
        for i, lps in enumerate(batch.sampler_logprobs):
            sampler[i, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
        sampler = (sampler * action_mask).to(device)
    return EpisodeTensors(prompt_ids.to(device), prompt_mask.to(device), response_ids.to(device),
                          response_mask.to(device), action_mask.to(device), env_rewards.to(device),
                          final_discount.to(device), sampler)


# ----------------------------------------------------------------------------- rewards


@dataclass
class Scored:
    """Episodes with their rewards, before any KL (per-row, so rows of several sampling rounds can be selected and
    joined): `score` lands on the last generated token, the environment's per-turn rewards on each turn's last
    token; `outcome` (their sum: the episode return) is what group-relative estimators, dynamic sampling's tie
    test, the logged reward mean and RFT's selection compare (`algorithms.rewards`: one definition)."""

    episodes: EpisodeBatch
    score: torch.Tensor                    # [B] final_reward(reward functions + reward model + penalties): clipped,
                                           #     discounted like the last turn
    outcome: torch.Tensor                  # [B] score + the environment's (discounted) return
    has_eos: torch.Tensor                  # [B] the final reply ended with EOS
    by_function: dict[str, torch.Tensor]   # [B] each reward function's raw value
    rm_score: torch.Tensor | None          # [B] the reward model's raw score
    judge_score: torch.Tensor | None = None  # [B] the judge's score in [0, 1] (0 where not kept)
    kept: torch.Tensor | None = None       # [B] bool: False = the judge failed on the row's group (on_error=skip):
    #                                        out of the loss, the advantages and reward_mean. None = all kept

    def select(self, rows: list[int]) -> Scored:
        idx = torch.tensor(rows, dtype=torch.long, device=self.score.device)
        return Scored(self.episodes.select(rows), self.score[idx], self.outcome[idx], self.has_eos[idx],
                      {k: v[idx] for k, v in self.by_function.items()},
                      None if self.rm_score is None else self.rm_score[idx],
                      None if self.judge_score is None else self.judge_score[idx],
                      None if self.kept is None else self.kept[idx])

    def __add__(self, other: Scored) -> Scored:
        return Scored(self.episodes + other.episodes, torch.cat([self.score, other.score]),
                      torch.cat([self.outcome, other.outcome]), torch.cat([self.has_eos, other.has_eos]),
                      {k: torch.cat([v, other.by_function[k]]) for k, v in self.by_function.items()},
                      None if self.rm_score is None else torch.cat([self.rm_score, other.rm_score]),
                      None if self.judge_score is None else torch.cat([self.judge_score, other.judge_score]),
                      None if self.kept is None else torch.cat([self.kept, other.kept]))


@torch.no_grad()
def score_episodes(batch: EpisodeBatch, tensors: EpisodeTensors, functions: RewardFunctions,
                   reward_model: nn.Module | None, *, model_weight: float, eos_penalty: float,
                   overlong_buffer: int, overlong_factor: float, max_new_tokens: int, clip: float | None,
                   eos_id: int | None = None, judge: Judge | None = None, group_size: int = 1) -> Scored:
    """Reward functions on the final replies, the reward model at each conversation's end-of-turn token
    (`reward_model_inputs`: appended to replies cut at max_new_tokens when eos_id is given), the judge's
    weighted score of the final replies (groups of `group_size` rows; `chatrl.judge`), and the length penalties (no EOS: `eos_penalty`; DAPO's soft overlong ramp over the final reply's length); their sum
    clipped to [-clip, clip] and discounted like the last turn (`final_reward`)."""
    device = tensors.response_ids.device
    columns = columns_of(batch.infos, response_ids=batch.last_reply_ids, conversation=batch.conversations)
    fn = functions.score(batch.prompts, batch.replies, columns)
    score = fn.total.to(device)
    judged = kept = None
    if judge is not None:
        verdict = judge.score(batch.prompts, batch.replies, group_size)
        judged, kept = verdict.scores.to(device), verdict.kept.to(device)
        score = score + judge.weight * judged
    rm = None
    if reward_model is not None:
        ids, mask = reward_model_inputs(tensors, batch.last_reply_eos, eos_id)
        rm = sequence_scores(reward_model, ids, mask).float()
        score = score + model_weight * rm
    has_eos = torch.tensor(batch.last_reply_eos, dtype=torch.bool, device=device)
    score = score - eos_penalty * (~has_eos).float()
    if overlong_buffer > 0:
        lengths = torch.tensor([len(r) for r in batch.last_reply_ids], device=device)
        score = score + overlong_penalty(lengths, max_new_tokens, overlong_buffer, overlong_factor)
    score = final_reward(score, tensors.final_discount, clip)
    outcome = score + tensors.env_rewards.sum(-1)
    return Scored(batch, score, outcome, has_eos, {k: v.to(device) for k, v in fn.by_function.items()}, rm,
                  judged, kept)


def reward_model_inputs(tensors: EpisodeTensors, has_eos: list[bool],
                        eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + response ids and mask [B, P+R+1] for the reward model, with `eos_id` appended to every reply that
    was cut at max_new_tokens. A reward model learns to score a conversation at the reply's end-of-turn token
    (`chatrl reward` and the eval both read it there); read at a cut reply's last sampled token it scores a
    position it never saw in training. eos_id None: the ids as sampled, no extra column."""
    ids, mask = joined(tensors.prompt_ids, tensors.prompt_mask, tensors.response_ids, tensors.response_mask)
    if eos_id is None:
        return ids, mask
    ids = torch.cat([ids, torch.full_like(ids[:, :1], eos_id)], 1)  # [B, P+R+1]: room for one more token
    mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], 1)
    cut = torch.tensor([not e for e in has_eos], device=ids.device)
    end = mask.shape[1] - mask.flip(-1).argmax(-1)  # one past each row's last real token
    rows = cut.nonzero().squeeze(-1)
    ids[rows, end[rows]] = eos_id
    mask[rows, end[rows]] = 1
    return ids, mask


# ----------------------------------------------------------------------------- log-probs and values


@torch.no_grad()
def score_rollout(*, actor: nn.Module | None, reference: nn.Module | None, critic: nn.Module | None,
                  tensors: EpisodeTensors, scores: torch.Tensor, temperature: float = 1.0,
                  teacher: nn.Module | None = None) -> Rollout:
    """Everything the update needs, computed once with the rollout's weights. The models must be in eval mode
    (dropout off), so the first update's ratio is exactly 1. No reference (KL off): ref_logprobs = logprobs. A
    distillation teacher scores the same tokens with the same code as the reference (teacher_logprobs).
    actor=None skips the actor's forward (logprobs = 0): for a single on-policy update, where the update's own
    forward gives the old log-probs (the ratio is exactly 1, so they need not be computed twice)."""
    t = tensors
    ids, mask = joined(t.prompt_ids, t.prompt_mask, t.response_ids, t.response_mask)
    plen = t.prompt_ids.shape[1]
    logprobs = (response_logprobs(actor, ids, mask, plen, temperature) if actor is not None
                else torch.zeros_like(t.action_mask))
    ref_logprobs = response_logprobs(reference, ids, mask, plen, temperature) if reference is not None else logprobs
    teacher_logprobs = response_logprobs(teacher, ids, mask, plen, temperature) if teacher is not None else None
    values = response_values(critic, ids, mask, plen) if critic is not None else torch.zeros_like(logprobs)
    return Rollout(prompt_ids=t.prompt_ids, prompt_mask=t.prompt_mask, response_ids=t.response_ids,
                   response_mask=t.response_mask, action_mask=t.action_mask, logprobs=logprobs,
                   ref_logprobs=ref_logprobs, values=values * t.action_mask, scores=scores,
                   sampler_logprobs=t.sampler_logprobs, teacher_logprobs=teacher_logprobs)
