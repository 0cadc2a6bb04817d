"""Step 3 through the real CLI: PPO raises a Python reward function's score while KL stays bounded."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from chatrl.steps.rl_models import EMA
from helpers import (
    REPO,
    ROUNDING_EPS,
    SAME_UP_TO_ROUNDING,
    cli_env,
    kill_after_checkpoint,
    load_with_plain_transformers,
    max_rel_diff,
    read_metrics,
    run_cli,
    same_weights,
)


def ppo_args(word_sft: Path, out: Path, *extra: str) -> list[str]:
    data = word_sft.parent.parent / "words.jsonl"
    return ["ppo", "--config", "configs/tiny-ppo.yaml", f"output_dir={out}", f"actor.name_or_path={word_sft}",
            f"critic.name_or_path={word_sft}", "reward.functions=[reward_fns:banana_share]",
            f"data.paths=[{data}]", "data.split=1,0,1", *extra]


@pytest.fixture(scope="module")
def ppo_run(word_sft: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ppo") / "run"
    proc = run_cli(*ppo_args(word_sft, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_ppo_reward_rises_with_bounded_kl(ppo_run: Path) -> None:
    rows = read_metrics(ppo_run)
    assert len(rows) == 30
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert last > first + 0.3, (first, last)
    assert max(r["kl"] for r in rows) < 25  # nats per sequence of <= 16 tokens
    for key in ("policy_loss", "value_loss", "policy_clipfrac", "policy_approx_kl", "entropy", "eos_rate",
                "response_length", "reward_fn/reward_fns:banana_share", "time_generate", "time_score", "time_train",
                "generate_tokens_per_s"):
        assert key in rows[-1]


def test_grpo_raises_the_reward_without_a_critic(word_sft: Path, tmp_path: Path) -> None:
    """The demo's estimator (group-relative advantages, 4 samples per prompt, no critic) learns the same target."""
    out = tmp_path / "grpo"
    proc = run_cli(*ppo_args(word_sft, out, "ppo.advantage=grpo", "rollout.samples_per_prompt=4",
                             "rollout.prompts_per_rollout=4", "ppo.iterations=20", "checkpoint.every=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert len(rows) == 20 and "value_loss" not in rows[-1]  # no critic
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert last > first + 0.3, (first, last)


def test_ppo_outputs_are_plain_hf_folders(ppo_run: Path) -> None:
    assert "OK True" in load_with_plain_transformers(ppo_run / "actor")
    from transformers import AutoModelForSequenceClassification

    critic = AutoModelForSequenceClassification.from_pretrained(ppo_run / "critic")
    assert critic.config.num_labels == 1


def test_ppo_bad_reward_function_is_a_clear_error(word_sft: Path, tmp_path: Path) -> None:
    proc = run_cli(*ppo_args(word_sft, tmp_path / "run", "reward.functions=[reward_fns:not_a_list]",
                             "ppo.iterations=1"))
    assert proc.returncode == 2 and "reward_fns:not_a_list" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(*ppo_args(word_sft, tmp_path / "run2", "reward.functions=[nowhere:fn]", "ppo.iterations=1"))
    assert proc.returncode == 2 and "cannot be loaded" in proc.stderr


@pytest.mark.slow
def test_ppo_two_process_zero3_matches_one_process(word_sft: Path, tmp_path: Path) -> None:
    """2 processes under ZeRO-3 == 1 process under ZeRO-0 (fp32). Rollouts are made comparable by top_k=1 (sampling
    from one token is greedy, whatever the per-rank random streams), and one epoch of one mini-batch makes the update
    a single token mean over all 16 episodes on both sides; scores, KL and lengths of every iteration must agree, and
    the final actors and critics be the same weights up to fp32 rounding (see ROUNDING_EPS)."""
    same = ["ppo.iterations=3", "ppo.micro_batch_size=4", "ppo.ppo_epochs=1", "ppo.mini_batches=1",
            "rollout.top_k=1", "checkpoint.every=0", f"actor_optim.eps={ROUNDING_EPS}",
            f"critic_optim.eps={ROUNDING_EPS}"]
    one, two = tmp_path / "one", tmp_path / "z3"
    proc = run_cli(*ppo_args(word_sft, one, "deepspeed.zero_stage=0", *same))
    assert proc.returncode == 0, proc.stderr[-3000:]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29537", "-m", "chatrl",
           *ppo_args(word_sft, two, "deepspeed.zero_stage=3", *same)]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows_one, rows_two = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] == [1, 2, 3]
    # (not advantage_mean: whitened advantages have mean 0 by construction, the logged value is rounding noise ~1e-6)
    for a, b in zip(rows_one, rows_two, strict=True):
        for key in ("reward_mean", "reward_std", "response_length", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert abs(rows_one[-1]["kl"]) > 1e-3  # the actor moved away from the reference: updates are being compared
    for model in ("actor", "critic"):
        assert max_rel_diff(one / model, two / model) < SAME_UP_TO_ROUNDING, model
    assert load_with_plain_transformers(two / "actor").startswith("OK")


@pytest.mark.slow
def test_ppo_killed_at_a_random_moment_and_resumed_gives_the_same_weights(word_sft: Path, tmp_path: Path) -> None:
    common = ["ppo.iterations=4", "checkpoint.every=2"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    proc = run_cli(*ppo_args(word_sft, straight, *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    kill_after_checkpoint(cut, 2, ppo_args(word_sft, cut, *common), jitter=1.5, seed=3)
    assert not (cut / "actor").exists()
    proc = run_cli(*ppo_args(word_sft, cut, *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert same_weights(straight / "actor", cut / "actor") == []  # bit-exact in fp32
    assert same_weights(straight / "critic", cut / "critic") == []


def test_ema_update_by_hand() -> None:
    """ema = decay * ema + (1 - decay) * w, with decay 0.9 (0.5 would hide a decay / 1 - decay swap)."""
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = EMA(SimpleNamespace(module=layer), decay=0.9, zero3=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[11.0, 22.0]]))
    assert ema.weights["weight"].tolist() == [[1.0, 2.0]]  # a copy, not a view of the actor
    ema.update()  # 0.9 * [1, 2] + 0.1 * [11, 22] = [2, 4]   (swapped: [10, 20])
    assert_close(ema.weights["weight"], torch.tensor([[2.0, 4.0]]), rtol=1e-6, atol=0)
    ema.update()  # 0.9 * [2, 4] + 0.1 * [11, 22] = [2.9, 5.8]
    assert_close(ema.weights["weight"], torch.tensor([[2.9, 5.8]]), rtol=1e-6, atol=0)
    assert layer.weight.tolist() == [[11.0, 22.0]]  # the actor is only read


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_ppo_ema_is_checkpointed_and_resumed(word_sft: Path, tmp_path: Path) -> None:
    """The EMA (decay 0.8, updated once per iteration) is in the checkpoint; the resumed run continues it from the
    saved values (not from the restored actor): EMA_3 = 0.8 EMA_2 + 0.2 actor_3; actor_ema holds EMA_3."""
    out = tmp_path / "ema"
    # keep_final_state: the second run continues the finished first one from its last checkpoint
    args = ppo_args(word_sft, out, "ppo.ema_decay=0.8", "checkpoint.every=2", "checkpoint.keep_last=5",
                    "checkpoint.keep_final_state=true")
    proc = run_cli(*args, "ppo.iterations=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ema2 = load_file(str(out / "checkpoints" / "step-000002" / "ema.safetensors"))
    actor2 = load_file(str(out / "actor" / "model.safetensors"))
    proc = run_cli(*args, "ppo.iterations=3")  # resumes from step 2, EMA included
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    ema3 = load_file(str(out / "checkpoints" / "step-000003" / "ema.safetensors"))
    actor3 = load_file(str(out / "actor" / "model.safetensors"))
    final = load_file(str(out / "actor_ema" / "model.safetensors"))
    names = sorted(ema3.keys() & actor3.keys())
    assert len(names) >= len(ema3) - 1  # all but a tied output embedding, saved once
    for k in names:  # fp32 arithmetic: a few ulps
        assert _rel(ema3[k], 0.8 * ema2[k].double() + 0.2 * actor3[k].double()) < 1e-6, k
        assert final[k].equal(ema3[k]), k
    # what a wrong EMA would give is far from it: decay swapped, or restarted from the restored actor
    assert max(_rel(ema3[k], 0.2 * ema2[k].double() + 0.8 * actor3[k].double()) for k in names) > 1e-3
    assert max(_rel(ema3[k], 0.8 * actor2[k].double() + 0.2 * actor3[k].double()) for k in names) > 1e-3
    assert load_with_plain_transformers(out / "actor_ema").startswith("OK")


def test_first_update_ratio_is_one_with_lora_dropout(word_sft: Path, tmp_path: Path) -> None:
    """Scoring runs in eval mode and dropout is disabled for RL (TRL's default): the first update of an iteration
    sees exactly the distribution the old log-probs came from, even with LoRA dropout 0.5 configured."""
    # iteration 2: LoRA's B starts at 0, so only after an update does the adapter (and its dropout) act
    base = ["actor.lora.r=4", "actor.lora.dropout=0.5", "ppo.iterations=2", "ppo.ppo_epochs=1",
            "ppo.mini_batches=1", "ppo.micro_batch_size=16", "ppo.advantage=grpo", "rollout.samples_per_prompt=2",
            "rollout.prompts_per_rollout=8", "checkpoint.every=0", "actor_optim.lr=2e-2"]
    ratios = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        proc = run_cli(*ppo_args(word_sft, out, *base, f"ppo.disable_dropout={flag}"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        ratios[flag] = read_metrics(out)[1]
    assert abs(ratios["true"]["policy_ratio_mean"] - 1) < 1e-5 and ratios["true"]["policy_approx_kl"] < 1e-9
    # measured: 0.0 with dropout off; ~7e-4 with LoRA dropout 0.5 acting in the update's forward only
    assert ratios["false"]["policy_approx_kl"] > 1e-5
