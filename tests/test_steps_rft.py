"""`chatrl rft` (fine-tuning from evaluation): selection by hand-made scores, a CLI run whose SFT round raises a
rule reward's held-out score, the kept dataset read back by the data pipeline, restarts that skip finished work,
and bad input stopping with one line."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from chatrl.config import DataConfig
from chatrl.config_offline import RFTConfig
from chatrl.configbase import load_config
from chatrl.data.prepare import read_all
from chatrl.errors import ChatrlError
from chatrl.steps.rft_samples import Sample, read_samples, round_stats, select_samples, write_jsonl_atomic
from helpers import kill_after_checkpoint, load_with_plain_transformers, read_metrics, run_cli

CONFIG = "configs/tiny-rft.yaml"


def sample(task: int, index: int, score: float, reply: str = "some words") -> Sample:
    conv = [{"role": "user", "content": f"prompt {task}"}, {"role": "assistant", "content": reply}]
    return Sample(task, index, conv, score, success=score > 0.5)


def banana_share(reply: str) -> float:
    words = reply.split()
    return words.count("banana") / len(words) if words else 0.0


# ----------------------------------------------------------------------------- selection (no model)


HAND_MADE = [sample(0, 0, 0.1), sample(0, 1, 0.9), sample(0, 2, 0.5),
             sample(1, 0, 0.3), sample(1, 1, 0.3),                       # a tie: the first sample wins
             sample(2, 0, 2.0, reply="   "), sample(2, 1, 0.2)]          # the top one is empty: nothing to train on


def test_best_keeps_the_top_scored_sample_of_each_prompt() -> None:
    kept = select_samples(HAND_MADE, "best", None)
    assert [(s.task, s.index) for s in kept] == [(0, 1), (1, 0), (2, 1)]


def test_best_with_a_threshold_drops_prompts_whose_best_falls_short() -> None:
    kept = select_samples(HAND_MADE, "best", 0.25)
    assert [(s.task, s.index) for s in kept] == [(0, 1), (1, 0)]


def test_threshold_keeps_every_sample_at_or_above_it() -> None:
    kept = select_samples(HAND_MADE, "threshold", 0.3)
    assert [(s.task, s.index) for s in kept] == [(0, 1), (0, 2), (1, 0), (1, 1)]


def test_round_stats_by_hand() -> None:
    stats = round_stats(HAND_MADE, select_samples(HAND_MADE, "best", None))
    assert stats["best_of_n_score"] == pytest.approx((0.9 + 0.3 + 2.0) / 3)  # best-of-n counts every sample
    assert stats["sample_score"] == pytest.approx((0.1 + 0.9 + 0.5 + 0.3 + 0.3 + 2.0 + 0.2) / 7)
    assert stats["kept"] == 3 and stats["kept_score"] == pytest.approx((0.9 + 0.3 + 0.2) / 3)


def test_kept_file_is_a_chat_dataset_with_scores(tmp_path: Path) -> None:
    path = write_jsonl_atomic(tmp_path / "kept.jsonl", select_samples(HAND_MADE, "best", None))
    (ds,), _ = read_all(DataConfig(paths=[str(path)]))
    assert ds.schema == "chat"
    assert [(e.response, e.extra["score"]) for e in ds.examples] == [("some words", 0.9), ("some words", 0.3),
                                                                      ("some words", 0.2)]
    assert [(s.task, s.score) for s in read_samples(path)] == [(0, 0.9), (1, 0.3), (2, 0.2)]


@pytest.mark.parametrize(("overrides", "needle"), [
    (["rft.keep=threshold", "rft.threshold=null"], "rft.threshold"),
    (["reward.functions=[]"], "reward.functions"),
    (["rft.rounds=0"], "rft.rounds"),
    (["data.eval_fraction=0"], "data.eval_fraction"),
])
def test_bad_config_fails_before_any_work(overrides: list[str], needle: str) -> None:
    with pytest.raises(ChatrlError, match=needle.replace(".", r"\.")):
        load_config(RFTConfig, CONFIG, overrides)


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def rft_run(word_sft: Path, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("rft") / "run"
    proc = run_cli("rft", "--config", CONFIG, f"output_dir={out}", f"model.name_or_path={word_sft}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_rft_round_raises_the_rule_reward_over_the_starting_model(rft_run: tuple[Path, str]) -> None:
    out, stdout = rft_run
    rounds = json.loads((out / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    start, tuned = rounds
    # held-out prompts, sampled replies: the fine-tuned model says 'banana' clearly more often than the start
    noise = 2 * math.hypot(start["eval_score_se"], tuned["eval_score_se"])
    assert tuned["eval_score"] > start["eval_score"] + max(noise, 0.03), (start, tuned)
    assert tuned["best_of_n_score"] > tuned["sample_score"]
    assert "best-of-12" in stdout and "held-out score" in stdout
    logged = {r["step"]: r for r in read_metrics(out)}
    assert logged[1]["eval_score"] == tuned["eval_score"] and "eval_score" in logged[0]


def test_kept_samples_are_each_prompts_best_with_their_scores(rft_run: tuple[Path, str]) -> None:
    out, _ = rft_run
    samples = [json.loads(line) for line in (out / "round-01" / "samples.jsonl").read_text().splitlines()]
    kept = [json.loads(line) for line in (out / "round-01" / "kept.jsonl").read_text().splitlines()]
    assert len(samples) == 24 * 12
    for row in samples:  # the score is the rule reward of the reply (chat env: no reward of its own)
        assert row["score"] == pytest.approx(banana_share(row["messages"][-1]["content"]), abs=1e-6)
    best = {}
    for row in samples:
        best[row["task"]] = max(best.get(row["task"], -1.0), row["score"])
    assert len({r["task"] for r in kept}) == len(kept) >= 2  # one per prompt
    for row in kept:  # the prompt's best, and only when it reached rft.threshold (0.01)
        assert row["score"] == best[row["task"]] >= 0.01
    assert len(kept) == sum(score >= 0.01 for score in best.values())
    (ds,), _ = read_all(DataConfig(paths=[str(out / "round-01" / "kept.jsonl")]))
    # the data pipeline reads every kept row, dropping only exact repeats (the 8 prompts recur over 24 tasks)
    distinct = {json.dumps(r["messages"]): r["score"] for r in kept}
    assert sorted(e.extra["score"] for e in ds.examples) == sorted(distinct.values())


def test_rft_model_loads_with_plain_transformers(rft_run: tuple[Path, str]) -> None:
    out, _ = rft_run
    sft_rows = read_metrics(out / "round-01" / "sft")
    assert len(sft_rows) == 12  # the SFT step's own loop: optim.max_steps=12 on the kept samples
    assert "OK True" in load_with_plain_transformers(out / "round-01" / "sft" / "model")


def test_restart_skips_finished_rounds_and_resumes_the_sft(rft_run: tuple[Path, str], word_sft: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(rft_run[0], out)
    r1, r2 = out / "round-01", out / "round-02"
    watched = [out / "round-00.json", r1 / "round.json", r1 / "samples.jsonl", r1 / "kept.jsonl",
               r1 / "sft" / "model" / "model.safetensors"]
    before = [p.stat().st_mtime_ns for p in watched]
    # a second round (smaller, so the test stays quick), killed in its SFT right after the checkpoint of step 1
    args = ["rft", "--config", CONFIG, f"output_dir={out}", f"model.name_or_path={word_sft}", "rft.rounds=2",
            "rollout.prompts_per_rollout=8", "rollout.samples_per_prompt=4", "rft.threshold=null",
            "optim.max_steps=3", "optim.micro_batch_size=2", "checkpoint.every=1", "rft.eval_prompts=2",
            "rft.eval_samples=2"]
    kill_after_checkpoint(r2 / "sft", 1, args)
    assert (r2 / "kept.jsonl").is_file() and not (r2 / "sft" / "model").exists()
    sampled = (r2 / "samples.jsonl").stat().st_mtime_ns
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 1: finished earlier" in proc.stdout
    assert [p.stat().st_mtime_ns for p in watched] == before  # round 0 and round 1 untouched
    assert (r2 / "samples.jsonl").stat().st_mtime_ns == sampled  # round 2's sampling is not redone ...
    assert re.search(r"resumed from \S+ at step [12]/3", proc.stdout)  # ... and its SFT continues
    second = json.loads((r2 / "round.json").read_text())
    assert second["sampled_from"] == str(r1 / "sft" / "model")  # round 2 samples from round 1's model
    assert [r["round"] for r in json.loads((out / "rounds.json").read_text())["rounds"]] == [0, 1, 2]
    assert (r2 / "sft" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize(("override", "needle"), [
    ("reward.functions=[reward_fns:not_a_list]", "reward function 'reward_fns:not_a_list' must return"),
    ("env.kwargs={prompts: []}", "env.kwargs.prompts must be a non-empty list"),
])
def test_bad_input_stops_with_one_line(override: str, needle: str, tmp_path: Path) -> None:
    proc = run_cli("rft", "--config", CONFIG, f"output_dir={tmp_path / 'bad'}", override, "rft.eval_prompts=1")
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
