"""The benchmark suite's smoke run (`bench/run.py --quick`, tiny model): every part runs, writes its JSON, and the
headline table is built from them — so the suite cannot rot. Speed itself is never asserted here (bench/)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, cli_env

sys.path.insert(0, str(REPO / "bench"))

import common  # noqa: E402  (bench/common.py: FLOP and floor arithmetic, checked by hand below)


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench-quick")
    proc = subprocess.run([sys.executable, "bench/run.py", "--quick", "--out-dir", str(out),
                           "generate", "ppo", "grpo", "score", "serve"],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def test_every_part_writes_its_figures(quick_suite: Path) -> None:
    limits = json.loads((quick_suite / "limits.json").read_text())["limits"]
    assert limits["matmul_fp32_gflop_s"] > 0 and limits["bandwidth_gb_s"] > 0
    gen = json.loads((quick_suite / "generate.json").read_text())
    # --quick: batch 1 and 8, 8 new tokens, the eager Hybrid Engine and generate(); every token generated
    assert {(c["path"], c["batch"]) for c in gen["cases"]} == {(p, b) for p in ("hybrid", "hf-generate") for b in (1, 8)}
    assert all(c["tokens"] == c["batch"] * 8 and 0 < c["of_floor"] for c in gen["cases"])
    hyb = {c["batch"]: c["tokens_per_s"] for c in gen["cases"] if c["path"] == "hybrid"}
    hf = {c["batch"]: c["tokens_per_s"] for c in gen["cases"] if c["path"] == "hf-generate"}
    assert gen["ratios"]["hybrid / hf-generate @ 8x8"] == pytest.approx(hyb[8] / hf[8], rel=0.02)
    for algo, rows in (("ppo", 8), ("grpo", 32)):  # grpo: 8 prompts x 4 samples
        d = json.loads((quick_suite / f"{algo}.json").read_text())
        assert set(d["phases"]) == {"generate", "score", "train"} and d["rows"] == rows
        assert d["new_tokens"] == rows * 8  # min = max new tokens
        assert d["seconds"] == pytest.approx(sum(p["seconds"] for p in d["phases"].values()), abs=0.01)
        assert d["phases"]["train"]["of_limit"] > 0 and d["peak_rss_gib"] > d["rss_budget_gib"] > 0
    score = json.loads((quick_suite / "score.json").read_text())
    assert score["cases"]["length-sorted"]["sequences"] == 32  # 16 pairs, both replies
    # the batching order must not change a score beyond rounding: a row scored in another row's place moves it by
    # the scores' spread (0.28 for the tiny model's 32 scores, whose largest |score| is 0.26)
    if score["config"]["dtype"] == "bf16":  # dtype=auto on a CPU with native bf16: the dtype `chatrl score` uses
        # Both orders run the same bf16 model on the same tokens; only the padding differs, hence the summation
        # order and where activations round to bf16. A score lies on the bf16 grid, whose spacing at the largest
        # |score| is 2^(floor(log2 max|s|) - 7) (8 significant bits); a differently rounded hidden state (relative
        # 2^-8) moves it by at most ~1 step and its own rounding by 1 more. Measured (AVX-512-bf16): 1.8e-4, 0.09 of
        # a step of 2^-9 at max|s| 0.26; a misplaced row is ~140 steps.
        step = 2.0 ** (math.floor(math.log2(score["max_abs_score"])) - 7)
        assert score["max_score_difference"] <= 2 * step, (score["max_score_difference"], step)
    else:
        assert score["max_score_difference"] < 1e-5  # fp32: summation order only (measured 8e-8)


def test_serve_part_measures_both_cases(quick_suite: Path) -> None:
    """`bench/serve.py --quick` (tiny model): both cases measured, the ratio is the ratio of their rates."""
    data = json.loads((quick_suite / "serve.json").read_text())
    cases = data["cases"]
    assert set(cases) == {"1-stream", "8-streams"}
    assert cases["8-streams"]["requests"] == 8 and cases["1-stream"]["streams"] == 1
    for case in cases.values():
        assert 0 < case["tokens"] <= case["requests"] * 8  # --quick: max_tokens 8
        assert case["tokens_per_s"] > 0 and case["seconds"] > 0
        assert 0 < case["ttft_p50"] <= case["ttft_p90"] and case["ttft_mean"] > 0
    assert data["ratio_name"] == "8-streams / 1-stream"
    assert abs(data["ratio"] - cases["8-streams"]["tokens_per_s"] / cases["1-stream"]["tokens_per_s"]) < 0.01
    assert data["target"] == 4.0 and data["met"] == (data["ratio"] >= 4.0)
    assert data["config"]["model"] == "tiny-random" and "8-streams / 1-stream" in (quick_suite / "stdout.txt").read_text()


def test_headline_table_reads_the_parts(quick_suite: Path) -> None:
    summary = json.loads((quick_suite / "summary.json").read_text())
    rows = {r["what"]: r for r in summary["headline"]}
    train = next(r for k, r in rows.items() if k.startswith("PPO train phase"))
    ppo = json.loads((quick_suite / "ppo.json").read_text())
    assert train["value"] == ppo["phases"]["train"]["of_limit"] and train["met"] == (train["value"] >= 0.5)
    rss = rows["PPO peak RSS / what models + grads + Adam hold"]
    assert rss["value"] == ppo["rss_over_budget"] and rss["met"] == (rss["value"] <= 1.3)
    assert "| measure | this run | target | met |" in (quick_suite / "summary.md").read_text()
    assert "=== ppo" in (quick_suite / "stdout.txt").read_text()


def test_flop_and_floor_arithmetic_by_hand() -> None:
    # one layer, hidden 4, 2 heads of 2, 1 KV head, MLP 8, vocab 10
    s = common.Shape(layers=1, hidden=4, intermediate=8, heads=2, kv_heads=1, head_dim=2, vocab=10)
    assert s.body_params == 4 * 2 * (2 * 2 + 2 * 1) + 3 * 4 * 8  # q,o: 4x4 each; k,v: 4x2 each; MLP 3 x 4x8
    # 3 tokens, context 5: 2 x 144 x 3 + attention 4 x 1 x 2 x 2 x 5 x 3 + LM head 2 x 40 x 1
    assert s.forward_flops(3, 5, lm_head_tokens=1) == 2 * 144 * 3 + 240 + 80
    limits = {"bandwidth_gb_s": 1e-9 * 184 * 4, "matmul_fp32_gflop_s": 1e-9 * 1e6}  # 1 s per weight read
    f = common.decode_floor_tokens_per_s(s, batch=2, context=0, itemsize=4, limits=limits, dtype="fp32")
    assert f["bound"] == "bandwidth" and f["floor"] == pytest.approx(2.0)  # 2 rows per 1 s step


def test_readme_block_is_replaced_in_place(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    start, end = "<!-- demo-rlhf:start -->", "<!-- demo-rlhf:end -->"
    readme.write_text(f"intro\n<!-- bench:start -->\nbench\n<!-- bench:end -->\n{start}\nold table\n{end}\nrest\n")
    common.update_readme("| new |", "demo-rlhf", readme)
    assert readme.read_text() == (f"intro\n<!-- bench:start -->\nbench\n<!-- bench:end -->\n{start}\n| new |\n{end}"
                                  "\nrest\n")
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="bench:start"):
        common.update_readme("| new |", "bench", readme)


def test_demos_measure_the_bars_from_the_files_a_pipeline_wrote(tmp_path: Path) -> None:
    """bench/demos.py reads a finished RLHF run: paired gains per prompt (PPO minus SFT / base, by the reward model and
    the judge), the reward model's held-out accuracy, and whether issue 19's bar holds; the table states it."""
    import demos

    run = tmp_path / "rlhf-s1"
    (run / "eval").mkdir(parents=True)
    (run / "reward").mkdir()
    rewards = [{"base": 0.0, "sft": 0.1, "ppo": 1.1}, {"base": 0.5, "sft": 0.2, "ppo": 0.8},
               {"base": 1.0, "sft": 0.9, "ppo": 1.6}]
    judge = [{"base": 0.0, "sft": 0.0, "ppo": -0.1}, {"base": 0.0, "sft": 0.0, "ppo": 0.1},
             {"base": 0.0, "sft": 0.0, "ppo": 0.3}]
    (run / "eval" / "eval.json").write_text(json.dumps({
        "metrics": {m: {"reward_mean": 0.0, "kl": 1.5 if m == "ppo" else 0.0} for m in ("base", "sft", "ppo")},
        "samples": [{"rewards": r, "judge": j} for r, j in zip(rewards, judge, strict=True)]}))
    (run / "reward" / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "eval", "accuracy": 0.6,
                                                             "pairs": 100}) + "\n")
    out = demos.measure("rlhf", run)
    # PPO - SFT per prompt: 1.0, 0.6, 0.7 -> mean 0.7667, sd 0.2082, s.e. 0.1202 (6.4 s.e.)
    assert out["vs_sft"]["mean"] == pytest.approx(0.76667, abs=1e-4)
    assert out["vs_sft"]["se"] == pytest.approx(0.12019, abs=1e-4) and out["vs_sft"]["wins"] == 3
    # PPO - base: 1.1, 0.3, 0.6 -> mean 0.6667, s.e. 0.2333 (2.9 s.e.); judge - SFT: -0.1, 0.1, 0.3 -> 0.1 (0.1155)
    assert out["vs_base"]["se"] == pytest.approx(0.23333, abs=1e-4)
    assert out["judge_vs_sft"]["mean"] == pytest.approx(0.1, abs=1e-9) and out["holds"] is True
    assert out["rm_accuracy"] == 0.6 and out["rm_pairs"] == 100
    for j, v in zip(judge, (-0.5, -0.4, -0.6), strict=True):  # judge - SFT: mean -0.5, s.e. 0.0577: the bar fails
        j["ppo"] = v
    (run / "eval" / "eval.json").write_text(json.dumps({
        "metrics": {m: {"reward_mean": 0.0, "kl": 0.0} for m in ("base", "sft", "ppo")},
        "samples": [{"rewards": r, "judge": j} for r, j in zip(rewards, judge, strict=True)]}))
    failed = demos.measure("rlhf", run)
    assert failed["holds"] is False
    row = {"seed": 1, "minutes": None, "dtype": "auto", "transformers": "5", "machine": {
        "cores": 2, "cpu_kind": "AVX2", "torch": "2.13", "measured": "2026-12-02T08:00", "load_avg_1min": 2.0}}
    text = demos.demo_table("rlhf", [{**row, **out}, {**row, **failed, "seed": 2}])
    assert "| 1 | +0.767 (0.120); 3/0 |" in text and "| resumed | yes |" in text and "**no**" in text
    assert "60.0% (4.9%)" in text and "1 of 2 seeds hold the bar" in text


def test_limits_from_another_kind_of_cpu_are_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    """A part run alone reads bench/results/limits.json: limits measured on another CPU kind (an AVX2 machine's
    emulated bf16 peak on an AVX-512-bf16 machine gave "3577% of the floor") are not used."""
    path = tmp_path / "limits.json"
    path.write_text(json.dumps({"machine": {"cpu_kind": "AVX2"}, "limits": {"matmul_bf16_gflop_s": 0.3}}))
    monkeypatch.setattr(common, "cpu_kind", lambda: "AVX-512-bf16")
    assert common.load_limits(path) is None and "measured on a AVX2 CPU" in capsys.readouterr().err
    monkeypatch.setattr(common, "cpu_kind", lambda: "AVX2")
    assert common.load_limits(path) == {"matmul_bf16_gflop_s": 0.3}
    path.write_text(json.dumps({"machine": {}, "limits": {}}))  # limits written before the kind was recorded
    assert common.load_limits(path) is None
