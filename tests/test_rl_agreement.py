"""Rollout/training agreement (`steps/rl_agreement`): the sampler's log-probs travel with multi-turn episodes
(0 on the environment's tokens), fp32 rollouts agree with the trainer to rounding, a stale inference copy does not;
the gap and KL formulas by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from chatrl.models.loading import load_tokenizer
from chatrl.rollout.episodes import Task, run_episodes
from chatrl.rollout.hybrid import HybridEngine
from chatrl.rollout.sampling import GenerationSettings
from chatrl.steps.rl_agreement import (
    agreement_metrics,
    logprob_gaps,
    probe_positions,
    sampled_vocab_kl,
    vocab_kl,
)
from chatrl.steps.rl_experience import episode_tensors, score_rollout
from helpers import tiny_model
from rl_envs import ThreeTurnEnv

T = 0.8


def test_logprob_gaps_by_hand():
    sampler = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    trainer = torch.tensor([[-1.1, -2.0, -5.0], [-0.2, -9.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # the -5 and -9 are off the actions
    top, total, count = logprob_gaps(sampler, trainer, mask)
    assert top == pytest.approx(0.3) and total == pytest.approx(0.4) and count == 3


def test_vocab_kl_by_hand():
    # p uniform over 2, q = (3/4, 1/4): KL(p || q) = 0.5 log(0.5 / 0.75) + 0.5 log(0.5 / 0.25) = 0.5 log(4/3)
    # (KL(q || p) = 0.75 log 1.5 + 0.25 log 0.5 = 0.1308 would be the wrong direction)
    kl = vocab_kl(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]))
    assert_close(kl, torch.tensor([0.5 * math.log(4 / 3)]))


def test_probe_positions_are_action_positions_of_at_most_n_rows():
    mask = torch.zeros(10, 30)
    mask[:, 5:25] = 1.0
    rows, chosen = probe_positions(mask, rows=4, positions=64, gen=torch.Generator().manual_seed(0))
    assert rows.numel() == 4 and chosen.shape == (4, 30) and int(chosen.sum()) == 64
    assert not chosen[:, :5].any() and not chosen[:, 25:].any()


def rollout(model, engine, tok, seed=0):
    """Two three-turn episodes (sampled at T = 0.8 with top-k/top-p and EOS blocked for 2 tokens) and the trainer's
    log-probs of them (the scoring pass)."""
    settings = GenerationSettings(max_new_tokens=6, min_new_tokens=2, do_sample=True, temperature=T, top_k=20,
                                  top_p=0.9, seed=seed)
    batch = run_episodes(engine, tok, [ThreeTurnEnv(), ThreeTurnEnv()], "three_turn", [Task("train", 0, 0)] * 2,
                         settings, max_turns=3, max_prompt_tokens=64, max_context=512)
    tensors = episode_tensors(batch, tok.pad_token_id, gamma=1.0, device=torch.device("cpu"))
    scored = score_rollout(actor=model, reference=None, critic=None, tensors=tensors, scores=torch.zeros(2),
                           temperature=T)
    return batch, scored


def metrics(engine, model, scored):
    return agreement_metrics(scored, *sampled_vocab_kl(engine, model, scored, T, seed=0))


def test_fp32_rollout_agrees_with_the_trainer_and_a_stale_copy_does_not(tiny_model_dir):
    model = tiny_model(tiny_model_dir).eval()
    tok = load_tokenizer(tiny_model_dir)
    engine = HybridEngine(model, inference_dtype=torch.float32, release_after_rollout=False)  # an fp32 copy
    batch, scored = rollout(model, engine, tok)
    for lps, ids, actions in zip(batch.sampler_logprobs, batch.response_ids, batch.action_mask, strict=True):
        assert len(lps) == len(ids) and sum(actions) == 18 and len(ids) > 18  # 3 replies + the env's messages
        assert all(lp == 0.0 for lp, a in zip(lps, actions, strict=True) if a == 0)
        assert all(lp < 0.0 for lp, a in zip(lps, actions, strict=True) if a == 1)
    assert torch.equal(scored.sampler_logprobs != 0, scored.action_mask.bool())
    good = metrics(engine, model, scored)
    assert good["agreement/logprob_max_abs_diff"] < 1e-4 and good["agreement/logprob_mean_abs_diff"] < 1e-5
    assert good["agreement/vocab_kl"] < 1e-6
    # the weights change but nobody marks them updated: the copy (kept, not released) is stale
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    _, scored = rollout(model, engine, tok, seed=1)
    stale = metrics(engine, model, scored)
    assert stale["agreement/logprob_max_abs_diff"] > 1e-2 and stale["agreement/vocab_kl"] > 1e-3, stale
    engine.mark_weights_updated()
    _, scored = rollout(model, engine, tok, seed=1)
    fresh = metrics(engine, model, scored)
    assert fresh["agreement/logprob_max_abs_diff"] < 1e-4 and fresh["agreement/vocab_kl"] < 1e-6
    print(good, stale, fresh)
