"""RL experience: log-probs are those of the distribution the rollout sampled from (logits / temperature);
episodes become tensors with environment tokens masked out of the actions and turn rewards on turn ends."""

from __future__ import annotations

import torch

from chatrl.models.reward import position_ids_from_mask
from chatrl.rollout.episodes import EpisodeBatch
from chatrl.steps.rl_experience import EpisodeTensors, episode_tensors, score_rollout
from helpers import left_padded, tiny_model


def test_rollout_logprobs_are_at_the_sampling_temperature(tiny_model_dir):
    model = tiny_model(tiny_model_dir).eval()
    ids, mask = left_padded()
    b, plen = ids.shape
    resp = torch.randint(3, 100, (b, 5), generator=torch.Generator().manual_seed(3))
    rmask = torch.ones_like(resp)
    rmask[0, 3:] = 0  # a row that ended early (right padding)

    def scored(temperature: float):
        tensors = EpisodeTensors(ids, mask, resp, rmask.float(), rmask.float(), torch.zeros(b, 5), torch.ones(b))
        return score_rollout(actor=model, reference=model, critic=None, tensors=tensors, scores=torch.zeros(b),
                             temperature=temperature)

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


def test_episode_tensors_pad_mask_and_place_turn_rewards():
    # row 0: a 2-turn episode: reply [5, 6], environment tokens [7, 8], reply [9]; rewards 1 then 2, gamma 0.5
    # row 1: one turn, reply [4], reward 3
    batch = EpisodeBatch(prompt_ids=[[1, 2], [3]], response_ids=[[5, 6, 7, 8, 9], [4]],
                         action_mask=[[1, 1, 0, 0, 1], [1]], turn_ends=[[1, 4], [0]], turn_rewards=[[1.0, 2.0], [3.0]],
                         last_reply_ids=[[9], [4]], last_reply_eos=[True, False], prompts=[[], []],
                         conversations=[[], []], infos=[{}, {}], success=[True, False], truncated=[False, False],
                         context_truncated=[False, False])
    t = episode_tensors(batch, pad_id=0, gamma=0.5, device=torch.device("cpu"))
    assert t.prompt_ids.tolist() == [[1, 2], [0, 3]] and t.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert t.response_ids.tolist() == [[5, 6, 7, 8, 9], [4, 0, 0, 0, 0]]
    assert t.response_mask.tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert t.action_mask.tolist() == [[1, 1, 0, 0, 1], [1, 0, 0, 0, 0]]
    # turn 0's reward on column 1, turn 1's (discounted by 0.5) on column 4
    assert t.env_rewards.tolist() == [[0, 1.0, 0, 0, 1.0], [3.0, 0, 0, 0, 0]]
