"""bench/vs_trl.py: the medians / ratios / equal-work arithmetic, the exact-length prompts (checked through chatrl's
own data pipeline), the chatrl overrides, the shared reward function, and a `--quick` smoke run against real TRL
releases (slow; skipped when pip cannot reach the package index and the TRL venvs were never made)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, cli_env

sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "bench" / "trl"))

import vs_trl  # noqa: E402
from prompts import make_prompts, verified_prompt_ids, write_prompts  # noqa: E402
from report import compare, run_summary, steady, table, work_mismatches  # noqa: E402
from rewards import length_mod  # noqa: E402


def its(*seconds: float) -> list[dict[str, float]]:
    return [{"seconds": s, "generate": s / 2, "score": s / 4, "train": s / 4} for s in seconds]


def test_run_summary_is_the_median_of_iterations_2_to_k() -> None:
    s = run_summary(its(100.0, 3.0, 1.0, 2.0), peak_rss_gib=1.5)
    assert s["seconds"] == 2.0 and s["iterations_used"] == 3  # the warm-up iteration 1 (100 s) is left out
    assert s["generate"] == 1.0 and s["train"] == 0.5 and s["peak_rss_gib"] == 1.5
    assert steady(its(7.0)) == its(7.0)  # a single iteration is all there is
    partial = run_summary([{"seconds": 2.0, "generate": 1.0}, {"seconds": 4.0}], None)
    assert partial["generate"] is None  # a phase missing in a used iteration is not guessed


def test_compare_ratios_per_pair_and_of_the_medians() -> None:
    chatrl = [run_summary(its(9, 2.0, 2.0), 1.0), run_summary(its(9, 4.0, 4.0), 1.2)]
    trl = [run_summary(its(9, 10.0, 10.0), 3.0), run_summary(its(9, 12.0, 12.0), 3.2)]
    c = compare(chatrl, trl, "ppo")
    assert c["ratio_per_pair"] == [5.0, 3.0]
    assert c["median"]["chatrl"]["seconds"] == 3.0 and c["median"]["trl"]["seconds"] == 11.0
    assert c["ratio"] == pytest.approx(11 / 3) and c["target"] == 4.0 and not c["met"]
    assert c["phase_ratios"]["generate"] == pytest.approx(11 / 3)
    assert compare(chatrl, trl, "grpo")["met"]  # target 3x
    text = table("PPO", chatrl, trl, c, "1.12.0")
    assert "| chatrl | 2.00, 4.00 | 3.00 |" in text and "TRL 1.12.0 | 10.00, 12.00 | 11.00" in text
    assert "per pair 5.00x, 3.00x; overall 3.67x (target >= 4.0x: NOT met)" in text


def test_work_mismatches_names_what_differs() -> None:
    a = [{"sequences": 8, "prompt_tokens": 512, "new_tokens": 512}] * 2
    assert work_mismatches(a, [dict(x) for x in a]) == []
    b = [dict(a[0]), {**a[0], "new_tokens": 480}]
    assert work_mismatches(a, b) == ["iteration 2 new_tokens: chatrl 512, trl 480"]
    assert work_mismatches(a, a[:1]) == ["iterations: chatrl 2, trl 1"]


def test_prompts_are_exactly_the_length_in_chatrls_pipeline(tmp_path: Path, tiny_model_dir: str) -> None:
    from chatrl.config_rl import GRPOConfig
    from chatrl.configbase import load_config
    from chatrl.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    texts = make_prompts(tok, 12, 48)
    assert len(set(texts)) == 12
    w = {"kind": "grpo", "model": tiny_model_dir, "new_tokens": 8, "prompt_tokens": 48, "prompts_per_iteration": 4,
         "samples_per_prompt": 2, "micro_batch": 4, "iterations": 3, "prompts_file": str(tmp_path / "p.jsonl")}
    write_prompts(tmp_path / "p.jsonl", texts)
    cfg = load_config(GRPOConfig, overrides=vs_trl.chatrl_overrides(w, tmp_path / "out"))
    ids = verified_prompt_ids(cfg.data, tok, texts, 48)
    assert [len(x) for x in ids] == [48] * 12
    # TRL's side tokenizes the same text with the chat template: the same ids
    assert ids[3] == tok.apply_chat_template([{"role": "user", "content": texts[3]}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    write_prompts(tmp_path / "p.jsonl", texts[:-1] + [texts[-1] + " and more words"])
    with pytest.raises(ValueError, match="not 48"):
        verified_prompt_ids(cfg.data, tok, texts[:-1] + [texts[-1] + " and more words"], 48)
    with pytest.raises(ValueError, match="shorter than"):
        make_prompts(tok, 1, 10)


def test_chatrl_overrides_give_the_benchmark_batch_plan(tmp_path: Path) -> None:
    from chatrl.config_rl import GRPOConfig, PPOConfig
    from chatrl.configbase import load_config

    w = {"kind": "ppo", "model": "tiny-random", "new_tokens": 64, "prompt_tokens": 64, "prompts_per_iteration": 8,
         "samples_per_prompt": 1, "micro_batch": 8, "iterations": 8, "prompts_file": str(tmp_path / "p.jsonl")}
    ppo = load_config(PPOConfig, overrides=vs_trl.chatrl_overrides(w, tmp_path))
    plan = ppo.batch_plan(1)
    assert (plan.rollout, plan.mini_batch, plan.grad_accum) == (8, 8, 1)
    assert ppo.rollout.min_new_tokens == ppo.rollout.max_new_tokens == 64 and ppo.ppo.ppo_epochs == 1
    assert ppo.actor.dtype == ppo.critic.dtype == ppo.reward.dtype == "fp32" and ppo.ppo.kl_coef == 0.05
    grpo = load_config(GRPOConfig, overrides=vs_trl.chatrl_overrides({**w, "kind": "grpo", "samples_per_prompt": 4},
                                                                     tmp_path))
    plan = grpo.batch_plan(1)
    assert (plan.rollout, plan.mini_batch, plan.grad_accum) == (32, 32, 4) and grpo.grpo.kl_coef == 0
    assert grpo.reward.functions[0].endswith("rewards.py:length_mod")


def test_the_reward_function_takes_both_call_styles() -> None:
    assert length_mod(prompts=["p", "q"], responses=["abcdefg", "abc"]) == [0.0, 0.5]  # chatrl
    assert length_mod(prompts=["p"], completions=[[{"role": "assistant", "content": "abc"}]]) == [0.5]  # TRL


def test_pip_failures_are_named_by_their_error_line() -> None:
    err = "WARNING: Location 'file:///x' is ignored\nERROR: Could not find trl==9 (from versions: 1.0)\n" \
          "ERROR: No matching distribution found for trl==9\n"
    assert vs_trl.last_error(err, "Looking in links: /opt/wheels\n") == "ERROR: No matching distribution found for trl==9"
    assert vs_trl.last_error("", "Looking in links: x\nboom\n") == "boom"


def test_peak_rss_is_each_runs_own(tmp_path: Path) -> None:
    big = "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096])"  # touch every page: 300 MiB resident
    rc, rss = vs_trl.measured([sys.executable, "-c", big], tmp_path / "big.log", dict(os.environ), timeout=60)
    assert rc == 0 and rss > 0.29
    rc, small = vs_trl.measured([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / "small.log",
                                dict(os.environ), timeout=60)
    assert rc == 3 and small < 0.1  # not the earlier run's peak
    with pytest.raises(vs_trl.BenchError, match="ran past"):
        vs_trl.measured([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "slow.log",
                        dict(os.environ), timeout=1)


def _trl_reachable_or_made() -> str | None:
    """The GRPO TRL version for the smoke run, or None (skip): the newest on the index when pip reaches it, else
    the newest venv made (offline, the run needs venvs of both TRLs already made)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "trl"], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode == 0:
        return vs_trl.newest_trl()
    made = vs_trl.made_venvs()  # conftest points CHATRL_HOME at the tests' home, as cli_env() does
    others = [v for v in made if v != vs_trl.PPO_TRL]
    return others[-1] if vs_trl.PPO_TRL in made and others else None


@pytest.mark.slow
def test_vs_trl_quick_smoke(tmp_path: Path) -> None:
    version = _trl_reachable_or_made()
    if version is None:
        pytest.skip("pip cannot reach the package index (pip index versions trl failed) and no TRL venv was made")
    out = tmp_path / "vs_trl.json"
    proc = subprocess.run([sys.executable, "bench/vs_trl.py", "--quick", "--grpo-trl", version, "--out", str(out)],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["versions"] == {"ppo": vs_trl.PPO_TRL, "grpo": version}
    for kind, seqs in (("ppo", 8), ("grpo", 32)):
        res = data["results"][f"{kind}-tiny"]
        assert res["size"] == "tiny" and res["ratio"] > 0 and res["work_mismatches"] == []
        for system in ("chatrl", "trl"):
            (run,) = res["runs"][system]
            assert len(run["iterations"]) == 2 and run["peak_rss_gib"] > 0.1
            assert run["counts"][0]["sequences"] == seqs and run["counts"][0]["new_tokens"] == seqs * 8
            assert all(it["seconds"] > 0 for it in run["iterations"])
    assert "TRL/chatrl s/iteration" in proc.stdout and "PPO at tiny size" in proc.stdout
