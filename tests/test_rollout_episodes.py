"""Multi-turn episodes: the environment's tokens are in the sequence but carry action mask 0, per-turn rewards
land on each turn's last generated token and sum (discounted) to the episode return; bad environments stop with
one line naming them."""

from __future__ import annotations

import pytest
import torch

from chatrl.errors import ChatrlError
from chatrl.models.loading import load_tokenizer
from chatrl.rollout.episodes import Task, continuation_ids, run_episodes
from chatrl.rollout.hybrid import HybridEngine
from chatrl.rollout.sampling import GenerationSettings
from chatrl.steps.rl_experience import episode_tensors
from helpers import tiny_model
from rl_envs import NaNRewardEnv, RaisingEnv, ThreeTurnEnv


def play(tiny_model_dir, envs, n=2, max_turns=5, max_context=512, new=6):
    model = tiny_model(tiny_model_dir).eval()
    tok = load_tokenizer(tiny_model_dir)
    engine = HybridEngine(model, inference_dtype=None)
    settings = GenerationSettings(max_new_tokens=new, min_new_tokens=new, do_sample=True, seed=0)
    tasks = [Task("train", 0, 0)] * n
    return tok, run_episodes(engine, tok, envs, "three_turn", tasks, settings, max_turns=max_turns,
                             max_prompt_tokens=64, max_context=max_context)


def test_three_turn_episode_masks_environment_tokens_and_sums_turn_rewards(tiny_model_dir):
    tok, batch = play(tiny_model_dir, [ThreeTurnEnv(), ThreeTurnEnv()])
    for i in range(2):
        assert batch.turn_rewards[i] == [1.0, 2.0, 10.0] and batch.success[i] and not batch.truncated[i]
        ids, actions = batch.response_ids[i], batch.action_mask[i]
        assert len(ids) == len(actions) and sum(actions) == 3 * 6  # three replies of 6 generated tokens
        env_text = tok.decode([t for t, a in zip(ids, actions, strict=True) if a == 0])
        assert "Turn 1 done, go on." in env_text and "Turn 2 done, go on." in env_text
        # every turn ends on a generated token; the environment's tokens follow the first two
        ends = batch.turn_ends[i]
        assert all(actions[e] == 1 for e in ends) and ends[-1] == len(ids) - 1
        assert all(actions[e + 1] == 0 for e in ends[:-1])
        roles = [m["role"] for m in batch.conversations[i]]
        assert roles[-6:] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    t = episode_tensors(batch, tok.pad_token_id, gamma=1.0, device=torch.device("cpu"))
    assert t.env_rewards.sum(-1).tolist() == [13.0, 13.0]
    assert torch.equal(t.action_mask.sum(-1), torch.tensor([18.0, 18.0]))
    discounted = episode_tensors(batch, tok.pad_token_id, gamma=0.5, device=torch.device("cpu"))
    assert discounted.env_rewards.sum(-1).tolist() == [1 + 0.5 * 2 + 0.25 * 10] * 2


def test_turn_and_context_limits_truncate(tiny_model_dir):
    _, batch = play(tiny_model_dir, [ThreeTurnEnv()], n=1, max_turns=2)
    assert batch.turn_rewards[0] == [1.0, 2.0] and batch.truncated[0] and not batch.context_truncated[0]
    _, batch = play(tiny_model_dir, [ThreeTurnEnv()], n=1, max_context=60)
    assert batch.context_truncated[0] and batch.truncated[0] and len(batch.turn_rewards[0]) < 3


def test_continuation_closes_the_turn_unless_eos_did():
    tok = load_tokenizer("tiny-random")
    conv = [{"role": "user", "content": "Guess."}]
    env = [{"role": "user", "content": "Higher."}]
    closed = tok.decode(continuation_ids(tok, conv, "50", True, env))
    open_ = tok.decode(continuation_ids(tok, conv, "50", False, env))
    assert closed == "\n<|im_start|>user\nHigher.<|im_end|>\n<|im_start|>assistant\n"
    assert open_ == tok.eos_token + closed


@pytest.mark.parametrize(("env", "needle"), [(NaNRewardEnv(), "reward nan"), (RaisingEnv(), "the scorer is down")])
def test_bad_environment_is_one_line_naming_it(tiny_model_dir, env, needle):
    with pytest.raises(ChatrlError) as err:
        play(tiny_model_dir, [env], n=1)
    assert "three_turn" in str(err.value) and needle in str(err.value) and "\n" not in str(err.value)


def test_repeated_prompts_share_one_prefill_and_decode_like_hf(tiny_model_dir):
    """A GRPO rollout repeats each prompt G times: the decoder prefills each distinct prompt once and expands the
    KV cache; greedy tokens still equal transformers' generate() on the repeated batch, with EOS rows dropped."""
    from helpers import PAD, hf_greedy, left_padded, pick_eos

    model = tiny_model(tiny_model_dir).eval()
    ids, mask = left_padded()
    eos = pick_eos(model, ids, mask, 8)
    rep, rep_mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    engine = HybridEngine(model, inference_dtype=None)
    calls = []
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    got, _ = engine.generate(rep, rep_mask, GenerationSettings(max_new_tokens=8, do_sample=False),
                             eos_token_id=eos, pad_token_id=PAD)
    hook.remove()
    assert calls[0][0] == ids.shape[0]  # the prefill ran on the distinct prompts only
    want = hf_greedy(model, rep, rep_mask, 8, eos)
    assert torch.equal(got, want[:, :got.shape[1]]) and (want[:, got.shape[1]:] == PAD).all()
