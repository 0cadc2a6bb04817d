"""`chatrl grpo` through the real CLI: an environment's reward rises without a critic, dynamic sampling fills the
batch and counts what it dropped, bad environments stop with one line, and a killed run resumes to the same
weights as an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import kill_after_checkpoint, read_metrics, run_cli, same_weights


def grpo_args(word_sft: Path, out: Path, *extra: str) -> list[str]:
    return ["grpo", "--config", "configs/tiny-grpo.yaml", f"output_dir={out}", f"actor.name_or_path={word_sft}",
            *extra]


def test_grpo_raises_the_environment_reward(word_sft: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli(*grpo_args(word_sft, out, "grpo.advantage=rloo", "grpo.clip_eps_high=0.28",
                              "checkpoint.every=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert len(rows) == 20 and "value_loss" not in rows[-1]  # no critic
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert last > first + 0.2, (first, last)
    assert rows[-1]["success_rate"] > rows[0]["success_rate"]
    for key in ("success_rate", "zero_variance_groups", "policy_clipfrac_low", "policy_clipfrac_high", "entropy",
                "truncation_rate", "response_length", "time_generate", "time_score", "time_train"):
        assert key in rows[-1], key
    assert not (out / "critic").exists() and (out / "actor" / "model.safetensors").exists()


def test_grpo_kl_in_the_loss_loads_a_reference(word_sft: Path, tmp_path: Path) -> None:
    out = tmp_path / "kl"
    proc = run_cli(*grpo_args(word_sft, out, "grpo.kl_coef=0.1", "grpo.iterations=3", "checkpoint.every=0",
                              "grpo.loss_agg=seq_mean_token_sum_norm", "grpo.importance_sampling_level=sequence"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert all("kl_loss" in r for r in rows)
    assert abs(rows[0]["kl"]) < 1e-6 < rows[-1]["kl"]  # the rollout of step 1 comes from the reference's weights


def test_dynamic_sampling_fills_the_batch_and_counts_drops(word_sft: Path, tmp_path: Path) -> None:
    # TiedEvenEnv: even tasks always reward 1 (tied groups), odd ones reward the reply's length parity (a group of 4
    # is tied with probability ~1/8). 4 groups a round, 2 of them tied: the batch of 4 varied groups takes >= 2
    # rounds, and a cap of 8 rounds is (almost) never reached, so the trained batch holds no tied group at all
    # (without dynamic sampling half of it would be: zero_variance_groups >= 0.5)
    out = tmp_path / "dyn"
    proc = run_cli(*grpo_args(word_sft, out, "env.name=rl_envs:TiedEvenEnv", "grpo.dynamic_sampling=true",
                              "grpo.max_sampling_rounds=8", "grpo.iterations=2", "checkpoint.every=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in read_metrics(out):
        assert row["groups_dropped"] >= 2 and 2 <= row["sampling_rounds"] < 8  # half of every round is tied
        assert row["zero_variance_groups"] == 0 and row["groups_tied_in_batch"] == 0


def test_a_broken_reward_raises_an_alarm_in_the_log_and_the_report(word_sft: Path, tmp_path: Path) -> None:
    """ConstantRewardEnv ties every group: the all_tied alarm fires in the first iteration (a warning line, alarms.jsonl)
    and the report shows it in a red box; the diagnostics of issue 19 are logged every iteration."""
    from chatrl.eval.report import write_report
    from chatrl.steps.rl_alarms import read_alarms

    out = tmp_path / "run" / "grpo"
    proc = run_cli(*grpo_args(word_sft, out, "env.name=rl_envs:ConstantRewardEnv", "grpo.iterations=2",
                              "checkpoint.every=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ALARM [all_tied] iteration 1" in proc.stderr
    assert [(a.step, a.kind) for a in read_alarms(out)] == [(1, "all_tied")]  # once per window, not every iteration
    rows = read_metrics(out)
    for key in ("reward_sd_within_group", "reward_sd_between_groups", "advantage_std", "policy_grad_norm",
                "policy_clipfrac", "policy_approx_kl", "entropy", "agreement/logprob_max_abs_diff",
                "agreement/logprob_mean_abs_diff", "agreement/vocab_kl"):
        assert key in rows[-1], key
    assert rows[-1]["reward_sd_within_group"] == 0 and rows[-1]["advantage_std"] == 0
    assert rows[-1]["policy_grad_norm"] == 0  # every advantage 0: the policy gradient is exactly 0
    page = write_report(tmp_path / "run").read_text()
    assert "<div class='alarm'><b>Alarms (1)</b>" in page and "<b>all_tied</b>" in page


@pytest.mark.parametrize(("env", "needle"), [("rl_envs:NaNRewardEnv", "reward nan"),
                                             ("rl_envs:RaisingEnv", "the scorer is down")])
def test_bad_environment_stops_with_one_line(word_sft: Path, tmp_path: Path, env: str, needle: str) -> None:
    proc = run_cli(*grpo_args(word_sft, tmp_path / "bad", f"env.name={env}", "grpo.iterations=1"))
    assert proc.returncode == 2 and env in proc.stderr and needle in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_grpo_killed_and_resumed_ends_with_the_same_weights(word_sft: Path, tmp_path: Path) -> None:
    common = ["grpo.iterations=6", "checkpoint.every=2", "grpo.dynamic_sampling=true"]
    straight = tmp_path / "straight"
    proc = run_cli(*grpo_args(word_sft, straight, *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = tmp_path / "resumed"
    kill_after_checkpoint(resumed, 2, grpo_args(word_sft, resumed, *common), jitter=1.0, seed=5)
    assert not (resumed / "actor").exists()
    proc = run_cli(*grpo_args(word_sft, resumed, *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert same_weights(straight / "actor", resumed / "actor") == []


def test_grpo_trains_on_multi_turn_episodes(word_sft: Path, tmp_path: Path) -> None:
    """guess_number answers every wrong guess, so episodes run several turns; the update trains on them."""
    out = tmp_path / "guess"
    proc = run_cli(*grpo_args(word_sft, out, "env.name=guess_number", "env.max_turns=3", "grpo.iterations=2",
                              "checkpoint.every=0", "rollout.is_correction=tis", "rollout.is_cap=1.5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert len(rows) == 2 and all(2 < r["turns"] <= 3 for r in rows)  # few of the word model's guesses are right
    assert all(r["response_length"] > 16 for r in rows)  # generated tokens of several turns
    # the sampler's log-probs reached the update through multi-turn episodes: an fp32 copy agrees to rounding
    # (measured: max 2.4e-6, vocab KL 0), and the TIS weights are ~1 under the cap
    for r in rows:
        assert 0 <= r["agreement/logprob_mean_abs_diff"] <= r["agreement/logprob_max_abs_diff"] < 1e-4, r
        assert 0 <= r["agreement/vocab_kl"] < 1e-6 and abs(r["is_weight_mean"] - 1) < 1e-3, r


@pytest.mark.parametrize(("options", "keys"), [
    (["grpo.policy_loss=cispo", "grpo.clip_eps_high=0.28"], ("policy_clipfrac", "policy_clipfrac_low",
                                                             "policy_clipfrac_high")),
    (["grpo.policy_loss=sapo", "grpo.importance_sampling_level=sequence"], ("policy_gate_mean", "policy_gatefrac")),
    (["rollout.is_correction=mis"], ("policy_clipfrac", "is_weight_mean", "is_masked_frac")),
], ids=["cispo", "sapo", "mis"])
def test_grpo_runs_each_policy_loss_on_arithmetic(word_sft: Path, tmp_path: Path, options: list[str],
                                                  keys: tuple[str, ...]) -> None:
    """Two iterations on the arithmetic environment (+ the banana share, so that groups' rewards differ) per loss:
    the loss's own fractions are logged, and the second mini-batch of an iteration sees the first one's step
    (ratio != 1: approx_kl > 0), so the loss's gradient moved the actor. MIS with an fp32 copy drops nothing."""
    out = tmp_path / "run"
    proc = run_cli(*grpo_args(word_sft, out, "env.name=arithmetic", "reward.functions=[reward_fns:banana_share]",
                              "grpo.iterations=2", "checkpoint.every=0", *options))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert len(rows) == 2 and all(key in r for r in rows for key in keys)
    assert any(r["policy_approx_kl"] > 0 for r in rows) and all(r["reward_std"] > 0 for r in rows)
    for r in rows:
        assert all(0 <= r[key] <= 1 for key in keys), r
        if "policy_gate_mean" in r:
            assert 0.5 < r["policy_gate_mean"] <= 1 and r["policy_gatefrac"] == 0  # r stays near 1 in 2 steps
        if "is_masked_frac" in r:
            assert r["is_masked_frac"] == 0 and r["is_weight_mean"] == 1, r
