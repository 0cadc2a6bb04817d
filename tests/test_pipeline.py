"""`chatrl pipeline` on the tiny model: all three steps, eval and report; finished steps are skipped;
config mistakes fail before any training."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from helpers import read_metrics, run_cli

TINY = "configs/tiny-pipeline.yaml"


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_model_dir) -> Path:
    run = tmp_path_factory.mktemp("pipeline") / "run"
    proc = run_cli("pipeline", "--config", TINY, f"run_dir={run}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


def test_pipeline_runs_every_step_then_eval_and_report(pipeline_run: Path) -> None:
    for step, folder in (("sft", "model"), ("reward", "model"), ("ppo", "actor")):
        assert (pipeline_run / step / folder / "config.json").exists()
        assert read_metrics(pipeline_run / step)
    reward_cfg = (pipeline_run / "reward" / "config.yaml").read_text()
    assert str(pipeline_run / "sft" / "model") in reward_cfg  # step 2 starts from step 1's output
    ppo_cfg = (pipeline_run / "ppo" / "config.yaml").read_text()
    assert str(pipeline_run / "reward" / "model") in ppo_cfg
    result = json.loads((pipeline_run / "eval" / "eval.json").read_text())
    assert list(result["models"]) == ["base", "sft", "ppo"]
    assert all(result["metrics"][m]["reward_mean"] is not None for m in result["models"])
    html = (pipeline_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "ppo" in html


def test_pipeline_skips_finished_steps(pipeline_run: Path) -> None:
    before = (pipeline_run / "sft" / "model" / "model.safetensors").stat().st_mtime
    started = time.time()
    proc = run_cli("pipeline", "--config", TINY, f"run_dir={pipeline_run}", "--steps", "1,2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("already finished, skipping") == 2
    assert (pipeline_run / "sft" / "model" / "model.safetensors").stat().st_mtime == before
    assert (pipeline_run / "report.html").stat().st_mtime >= started


@pytest.mark.parametrize(("algorithm", "extra", "title"), [
    ("dpo", ["dpo.optim.max_steps=3", "dpo.optim.micro_batch_size=2"], "DPO (offline, on preference pairs)"),
    ("kto", ["kto.optim.max_steps=3", "kto.optim.micro_batch_size=2"], "KTO (offline, on replies labelled"),
    ("ilql", ["ilql.optim.max_steps=3", "ilql.optim.micro_batch_size=2"], "ILQL (offline Q-learning)")])
def test_pipeline_offline_runs_sft_then_step_3_and_scores_with_another_runs_reward_model(
        pipeline_run: Path, tmp_path: Path, algorithm: str, extra: list[str], title: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(pipeline_run / "sft", run / "sft")  # step 1 finished: skipped
    proc = run_cli("pipeline", "--config", TINY, f"run_dir={run}", f"algorithm={algorithm}", *extra,
                   f"{algorithm}.logging.progress=false", f"eval.reward_model={pipeline_run / 'reward' / 'model'}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 1: " in proc.stdout and "already finished, skipping" in proc.stdout
    assert (run / algorithm / "model" / "config.json").exists() and not (run / "reward").exists()
    assert str(run / "sft" / "model") in (run / algorithm / "config.yaml").read_text()  # starts from SFT
    assert read_metrics(run / algorithm, "eval")
    result = json.loads((run / "eval" / "eval.json").read_text())
    assert list(result["models"]) == ["base", "sft", algorithm]
    assert all(result["metrics"][m]["reward_mean"] is not None for m in result["models"])
    assert title in (run / "report.html").read_text()


def test_pipeline_rft_samples_from_sft_with_the_runs_reward_model(pipeline_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in ("sft", "reward"):
        shutil.copytree(pipeline_run / step, run / step)  # steps 1-2 finished: skipped
    proc = run_cli("pipeline", "--config", TINY, f"run_dir={run}", "algorithm=rft", "rft.rft.rounds=1",
                   "rft.rollout.prompts_per_rollout=4", "rft.rollout.samples_per_prompt=2",
                   "rft.rollout.max_new_tokens=8", "rft.rollout.inference_dtype=fp32", "rft.rft.eval_prompts=4",
                   "rft.optim.max_steps=2", "rft.optim.micro_batch_size=1", "rft.logging.progress=false")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("already finished, skipping") == 2
    rft_cfg = (run / "rft" / "config.yaml").read_text()
    assert str(run / "sft" / "model") in rft_cfg and str(run / "reward" / "model") in rft_cfg
    assert (run / "rft" / "round-01" / "sft" / "model" / "config.json").exists()
    result = json.loads((run / "eval" / "eval.json").read_text())
    assert list(result["models"]) == ["base", "sft", "rft"]
    assert all(result["metrics"][m]["reward_mean"] is not None for m in result["models"])


def test_pipeline_fails_fast_on_missing_data(tmp_path: Path) -> None:
    started = time.time()
    proc = run_cli("pipeline", "--config", TINY, f"run_dir={tmp_path / 'run'}",
                   f"data.paths=[{tmp_path / 'nope.jsonl'}]")
    assert proc.returncode == 2
    assert "nope.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "sft").exists()
    assert time.time() - started < 60


def test_pipeline_rejects_bad_step_keys(tmp_path: Path) -> None:
    proc = run_cli("pipeline", "--config", TINY, f"run_dir={tmp_path / 'run'}", "reward.optim.lr=fast")
    assert proc.returncode == 2 and "pipeline section 'reward'" in proc.stderr and "optim.lr" in proc.stderr
    proc = run_cli("pipeline", "--config", TINY, f"run_dir={tmp_path / 'run'}", "ppo.ppo.mini_batches=3")
    assert proc.returncode == 2 and "mini_batches=3" in proc.stderr
    assert not (tmp_path / "run" / "sft").exists()


def test_step_sections_refine_the_shared_model_but_inputs_are_chained(tmp_path: Path) -> None:
    from chatrl.config import PipelineConfig
    from chatrl.configbase import load_config
    from chatrl.steps.pipeline import build_plan

    cfg = load_config(PipelineConfig, path=TINY, overrides=[
        f"run_dir={tmp_path}", "model.gradient_checkpointing=true", "reward.model.trainable_layers=1",
        "reward.model.name_or_path=ignored", "sft.model.lora.r=4"])
    plan = build_plan(cfg)
    assert plan.reward.model.trainable_layers == 1 and plan.sft.model.trainable_layers is None
    assert plan.reward.model.gradient_checkpointing and plan.sft.model.gradient_checkpointing  # shared
    assert plan.reward.model.name_or_path == str(tmp_path / "sft" / "model")  # always the SFT output
    assert plan.sft.model.lora.r == 4 and plan.reward.model.lora.r == 0
    assert plan.rl.actor.name_or_path == str(tmp_path / "sft" / "model")
    # eval.judge=train: step 2's settings on the pairs step 2 never saw, from the SFT model, in its own folder
    assert plan.judge.data.reward_shards == ["sft", "rlhf"] and plan.reward.data.reward_shards == ["reward"]
    assert plan.judge.model.trainable_layers == 1 and plan.judge.optim == plan.reward.optim
    assert plan.judge.model.name_or_path == str(tmp_path / "sft" / "model")
    assert plan.judge.output_dir == str(tmp_path / "judge")
