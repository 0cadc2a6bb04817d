"""PPO scoring: log-probs are those of the distribution the rollout sampled from (logits / temperature)."""

from __future__ import annotations

import torch

from chatrl.models.reward import position_ids_from_mask
from chatrl.steps.ppo_experience import score_rollout
from test_hybrid_generate import left_padded, tiny_model


def test_rollout_logprobs_are_at_the_sampling_temperature(tiny_model_dir):
    model = tiny_model(tiny_model_dir).eval()
    ids, mask = left_padded()
    b, plen = ids.shape
    resp = torch.randint(3, 100, (b, 5), generator=torch.Generator().manual_seed(3))
    rmask = torch.ones_like(resp)
    rmask[0, 3:] = 0  # a row that ended early (right padding)

    def scored(temperature: float):
        return score_rollout(actor=model, reference=model, critic=None, reward_model=None, prompt_ids=ids,
                             prompt_mask=mask, response_ids=resp, response_mask=rmask,
                             function_scores=torch.zeros(b), model_weight=1.0, temperature=temperature)

    full, full_mask = torch.cat([ids, resp], 1), torch.cat([mask, rmask], 1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=full_mask,
                       position_ids=position_ids_from_mask(full_mask)).logits[:, plen - 1:-1].float()
    for t in (0.5, 1.0):
        want = torch.log_softmax(logits / t, dim=-1).gather(-1, resp[..., None])[..., 0]
        got = scored(t)
        torch.testing.assert_close(got.logprobs, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.ref_logprobs, want, atol=1e-5, rtol=1e-5)  # same weights: KL 0
    assert not torch.allclose(scored(0.5).logprobs, scored(1.0).logprobs, atol=1e-3)
