"""The RL update on fake models (test_rl_update_units, test_algorithms_policy_losses): a table LM whose every token has
its own gradient, a table critic, hand-made experience, and one mini-batch of `policy_update` through FakeEngine."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from chatrl.batches import Rollout
from chatrl.config_rl import BatchPlan, GRPOConfig
from chatrl.models.reward import TokenValueModel
from chatrl.steps.rl_experience import joined, response_logprobs
from chatrl.steps.rl_update import Experience, policy_update
from helpers import FakeEngine

V = 7  # vocabulary of the fake models


class TableLM(nn.Module):
    """Logits of a position = a learned row per input token (enough to give every token its own gradient)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=None):
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits if logits_to_keep is None else logits[:, logits_to_keep])


class TableCritic(TokenValueModel):
    """V(s_t) = a learned number per token."""

    def __init__(self, seed: int = 1) -> None:
        nn.Module.__init__(self)
        self.table = nn.Parameter(torch.randn(V, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids, attention_mask):
        return self.table[input_ids] * attention_mask


def experience(lengths: list[int], advantages: list[float], *, on_policy: bool = True, kl_coef: float = 0.0,
               width: int = 4, seed: int = 3) -> Experience:
    """Rows of one prompt token and `width` response tokens, the first lengths[i] of them actions with advantage
    advantages[i]; old log-probs from the fake actor itself (ratio 1), reference log-probs shifted, returns and old
    values drawn."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    rollout = Rollout(prompt_ids=torch.randint(0, V, (b, 1), generator=g), prompt_mask=torch.ones(b, 1, dtype=torch.long),
                      response_ids=torch.randint(0, V, (b, width), generator=g), response_mask=torch.ones(b, width),
                      action_mask=mask, logprobs=torch.zeros(b, width),
                      ref_logprobs=-2.0 + 0.5 * torch.randn(b, width, generator=g),
                      values=torch.randn(b, width, generator=g) * mask, scores=torch.zeros(b))
    adv = torch.tensor(advantages).unsqueeze(1) * mask
    returns = torch.randn(b, width, generator=g) * mask
    return Experience(rollout, torch.zeros(b, width), adv, returns, on_policy, kl_coef=kl_coef)


def run(cfg, exp: Experience, micro: int, *, critic: bool = False, reference: bool = False):
    """One mini-batch of the whole experience in micro-batches of `micro` rows (one process); returns the logged
    stats and the accumulated gradients of the actor (and critic)."""
    n = exp.advantages.shape[0]
    cfg.policy.micro_batch_size = micro
    grad_accum = n // micro
    actor, value = TableLM(), TableCritic() if critic else None
    m = SimpleNamespace(actor=FakeEngine(actor, grad_accum),
                        critic=FakeEngine(value, grad_accum) if critic else None,
                        reference=object() if reference else None, ptx_batches=None)
    plan = BatchPlan(rollout=n, per_process=n, mini_batch=n, grad_accum=grad_accum, world=1)
    stats = policy_update(m, exp, cfg, plan)
    return stats, actor.table.grad, None if value is None else value.table.grad


def grpo(**options) -> GRPOConfig:
    cfg = GRPOConfig()
    cfg.rollout.max_new_tokens = 4
    for k, v in options.items():
        setattr(cfg.grpo, k, v)
    return cfg


def weighted_experience(weights: list[list[float]], advantages: list[float]) -> Experience:
    """Two-token rows whose old log-probs are the fake actor's own (ratio 1) and whose sampler log-probs are
    old - log w: the rollout/trainer weights exp(old - sampler) are exactly `weights` (TIS / MIS tests)."""
    exp = experience([len(w) for w in weights], advantages, on_policy=False, width=len(weights[0]))
    r = exp.rollout
    ids, attn = joined(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
    with torch.no_grad():
        r.logprobs = response_logprobs(TableLM(), ids, attn, 1)
    r.sampler_logprobs = r.logprobs - torch.tensor(weights).log()
    return exp
