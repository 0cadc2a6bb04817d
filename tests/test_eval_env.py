"""`chatrl eval --env` and `chatrl pipeline` with algorithm=grpo: success rate and pass@k with standard errors on
held-out tasks, the environment table in the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from chatrl.eval import env_eval
from chatrl.rollout.episodes import EpisodeBatch
from helpers import read_metrics, run_cli


def test_eval_env_success_and_pass_at_k_by_hand(tmp_path: Path) -> None:
    # EvenTaskEnv solves tasks 0, 2, 4, 6 of 0..7 whatever the model says: success 0.5, s.e. sqrt(.25 / 8)
    out = tmp_path / "ev"
    proc = run_cli("eval", "--env", "rl_envs:EvenTaskEnv", "--model", "a=tiny-random", "--model", "b=tiny-random",
                   "--tasks", "8", "--k", "3", "--max-new-tokens", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "eval_env.json").read_text())
    assert data["env"] == "rl_envs:EvenTaskEnv" and set(data["models"]) == {"a", "b"}
    for r in data["models"].values():
        assert r["success"] == 0.5 and r["pass_k"] == 0.5 and r["k"] == 3 and r["n_tasks"] == 8
        assert math.isclose(r["success_se"], math.sqrt(0.25 / 8)) and r["mean_return"] == 0.5
    assert data["models"]["b"]["vs_first"] == 0.0 and data["models"]["b"]["vs_first_se"] == 0.0  # same tasks solved
    assert "| a | 50.0% | 17.7% | 50.0% | 17.7% | 0.500 | - |" in (out / "eval_env.md").read_text()


def test_vs_first_is_this_model_minus_the_first(monkeypatch) -> None:
    # "base" solves tasks 1, 3; "tuned" solves 0, 1, 4: differences 1, 0, 0, -1, 1 -> +0.2, s.e. sqrt(0.7 / 5)
    solved = {"base": [False, True, False, True, False], "tuned": [True, True, False, False, True]}

    def play(engine, tok, env_name, kwargs, tasks, settings, *rest):  # the engine stands for the model's path
        return EpisodeBatch(success=solved[engine], turn_rewards=[[float(s)] for s in solved[engine]],
                            conversations=[[] for _ in tasks])

    monkeypatch.setattr(env_eval, "load_policy", lambda path, dtype: (path, None))
    monkeypatch.setattr(env_eval, "HybridEngine", lambda model, **kw: model)
    monkeypatch.setattr(env_eval, "_play", play)
    got = env_eval.evaluate_env({"base": "base", "tuned": "tuned"}, "any", {}, n_tasks=5, k=0, log=lambda m: None)
    assert got["base"].vs_first is None and got["base"].success == pytest.approx(0.4)
    assert got["tuned"].vs_first == pytest.approx(0.2) and got["tuned"].vs_first_se == pytest.approx(math.sqrt(0.7 / 5))
    assert got["tuned"].success_se == pytest.approx(math.sqrt(0.6 * 0.4 / 5))


def test_eval_needs_prompts_or_an_env(tmp_path: Path) -> None:
    proc = run_cli("eval", "--model", "a=tiny-random", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--prompts" in proc.stderr and "--env" in proc.stderr


def test_pipeline_grpo_in_an_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""run_dir: {tmp_path / 'run'}
algorithm: grpo
model: {{name_or_path: tiny-random, dtype: fp32}}
grpo:
  env: {{name: "rl_envs:EvenTaskEnv"}}
  reference: {{dtype: fp32}}
  rollout: {{prompts_per_rollout: 2, samples_per_prompt: 4, max_new_tokens: 4, inference_dtype: fp32}}
  grpo: {{iterations: 2, micro_batch_size: 8}}
  logging: {{progress: false}}
eval: {{env_tasks: 6, pass_k: 2, max_new_tokens: 4, dtype: fp32}}
""")
    proc = run_cli("pipeline", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert not (run / "sft").exists() and not (run / "reward").exists()  # the environment rewards by itself
    assert [r["step"] for r in read_metrics(run / "grpo")] == [1, 2]
    models = json.loads((run / "eval" / "eval_env.json").read_text())["models"]
    assert set(models) == {"base", "grpo"} and models["grpo"]["success"] == 0.5  # tasks 0, 2, 4 of 0..5
    page = (run / "report.html").read_text()
    assert "env-eval-table" in page and "GRPO (critic-free RL in an environment)" in page
    assert "Success rate" in page  # the success curve's group
