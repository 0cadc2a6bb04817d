"""The HTML run report, built from a synthetic run folder and rendered in real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from chatrl.cli import main
from chatrl.eval.report import (
    collect_series,
    env_headline,
    eval_headline,
    group_keys,
    lost_to_start,
    smooth,
    write_report,
)
from chatrl.eval.results import EvalResult, save_result

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
HAS_CJK_FONT = bool(subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout.strip()
                    if shutil.which("fc-list") else "")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def make_run(root: Path) -> Path:
    """A run folder like `chatrl pipeline` writes: sft + reward + ppo metrics and configs, eval results."""
    run = root / "demo-run"
    _jsonl(run / "sft" / "metrics.jsonl",
           [{"step": s, "split": "train", "time": 1.7e9 + s, "loss": 3.0 - 0.2 * s, "lr": 1e-4,
             "tokens_per_s": 900.0 + s} for s in range(1, 11)]
           + [{"step": s, "split": "eval", "loss": 3.1 - 0.2 * s} for s in (5, 10)]
           + [{"step": 10, "split": "eval", "perplexity": 4.25}]
           + ['{"step": 11, "loss": 1.'])  # a torn last line from a killed run
    (run / "sft" / "config.yaml").write_text("model:\n  name_or_path: tiny-random\noptim:\n  lr: 1.0e-4\n")
    _jsonl(run / "reward" / "metrics.jsonl",
           [{"step": s, "loss": 0.7 - 0.03 * s, "accuracy": 0.5 + 0.04 * s, "margin": 0.1 * s,
             "chosen_score": 0.05 * s, "rejected_score": -0.05 * s} for s in range(1, 9)])
    _jsonl(run / "ppo" / "metrics.jsonl",
           [{"step": s, "reward/mean": 0.1 * s, "kl": 0.01 * s, "response_length": 20 + s, "actor_loss": -0.1,
             "critic_loss": 0.5 / s, "samples_per_s": 3.5, "done": False, "note": "text"} for s in range(1, 7)])
    result = EvalResult(models={"sft": "runs/demo-run/sft/final", "ppo": "runs/demo-run/ppo/final"},
                        settings={"num_prompts": 2, "max_new_tokens": 32, "greedy": True})
    result.metrics = {"sft": {"reward_mean": 0.25, "reward_std": 0.5, "win_rate": None, "kl": 0.0,
                              "length_mean": 12.0, "eos_rate": 1.0},
                      "ppo": {"reward_mean": 1.5, "reward_std": 0.25, "win_rate": 0.75, "kl": 2.5,
                              "length_mean": 18.5, "eos_rate": 0.5, "reward_gain": 1.25, "reward_gain_se": 0.3}}
    result.samples = [{"prompt": [{"role": "user", "content": "How do I bake <bread>?"}], "reference": None,
                       "responses": {"sft": "Mix flour & water.", "ppo": "Knead, proof, then bake at 230C."},
                       "rewards": {"sft": 0.1, "ppo": 1.9}, "kl": {}},
                      {"prompt": [{"role": "user", "content": "Say hi"}], "reference": None,
                       "responses": {"sft": "hi", "ppo": "Hello there!"}, "rewards": {}, "kl": {}},
                      {"prompt": [{"role": "user", "content": "Greet me in Chinese"}], "reference": None,
                       "responses": {"sft": "你好 👋", "ppo": "你好！很高兴见到你 😊"}, "rewards": {}, "kl": {}}]
    save_result(result, run / "eval")
    return run


def test_metric_grouping_and_series():
    groups = group_keys(["loss", "eval_loss", "kl", "reward/mean", "accuracy", "margin", "response_length",
                         "tokens_per_s", "lr", "entropy", "policy_grad_norm", "policy_approx_kl",
                         "agreement/vocab_kl", "reward_sd_within_group", "misc"])
    assert groups["Losses"] == ["loss", "eval_loss"] and groups["KL"] == ["kl"]
    assert groups["Accuracy"] == ["accuracy"]
    assert groups["Rewards, scores and margins"] == ["reward/mean", "margin", "reward_sd_within_group"]
    assert groups["Response length"] == ["response_length"] and groups["Throughput and time"] == ["tokens_per_s"]
    assert groups["Update diagnostics"] == ["entropy", "policy_grad_norm", "policy_approx_kl", "agreement/vocab_kl"]
    assert groups["Learning rate"] == ["lr"] and groups["Other"] == ["misc"]
    series = collect_series([{"step": 1, "loss": 2.0, "done": True, "x": "s", "time": 1.7e9},
                             {"step": 2, "split": "eval", "loss": 1.5, "acc": float("nan")},
                             {"step": 3, "loss": 1.0}, {"step": 2, "loss": 1.2}, {"step": 3, "loss": 0.9}])
    # a resumed run re-logs steps 2-3: sorted by step, the later line wins; wall-clock "time" is no curve
    assert series == {"loss": {"train": ([1, 2, 3], [2.0, 1.2, 0.9]), "eval": ([2], [1.5])}}


def test_smoothing_is_tensorboards_debiased_ema():
    # w = 0.5: s1 = 0.5 / (1 - 0.5) = 1; s2 = (0.25 + 1) / (1 - 0.25) = 1.6667; s3 = (0.625 + 1.5) / 0.875 = 2.4286
    assert smooth([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 5 / 3, 2.125 / 0.875])
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # a constant stays put (debiased)


def test_headlines_say_what_changed():
    result = EvalResult(models={"base": "a", "ppo": "b"})
    result.metrics = {"base": {}, "ppo": {"reward_gain": 0.22, "reward_gain_se": 0.08, "kl": 2.6, "win_rate": 0.62}}
    assert eval_headline(result) == "ppo beat base by +0.22 reward, 2.8 s.e., at KL 2.60 to the reference; win rate 62%."
    result.metrics["ppo"] = {"reward_gain": -0.05, "reward_gain_se": 0.1}
    assert eval_headline(result) == "ppo and base are level: -0.05 reward, 0.5 s.e. (under 2 s.e.)."
    result.metrics["ppo"] = {"reward_gain": -0.5, "reward_gain_se": 0.1}
    assert eval_headline(result).startswith("ppo scored below base by -0.5 reward, 5.0 s.e.")
    result.metrics["ppo"] = {"reward_gain": None}
    assert eval_headline(result) is None  # no reward model: no sentence
    models = {"base": {"success": 0.155, "vs_first": None}, "grpo": {"success": 0.355, "vs_first": 0.2,
                                                                    "vs_first_se": 0.0347}}
    assert env_headline(models) == ("grpo: held-out success 35.5% against 15.5% for base (+20.0 points, "
                                    "5.8 s.e. (paired)).")


def test_judge_in_the_headline_and_the_lost_to_start_alarm():
    result = EvalResult(models={"sft": "a", "ppo": "b"})
    result.metrics = {"sft": {}, "ppo": {"reward_gain": 0.3, "reward_gain_se": 0.1, "judge_gain": -0.25,
                                         "judge_gain_se": 0.1}}
    assert eval_headline(result) == ("ppo beat sft by +0.3 reward, 3.0 s.e.; by the judge, ppo scored below sft by "
                                     "-0.25 judge score, 2.5 s.e..")
    assert lost_to_start(result) == "ppo lost to the starting model sft by the judge: -0.25 (2.5 s.e.)"
    result.metrics["ppo"]["judge_gain"] = -0.19  # 1.9 s.e.: level, no alarm
    assert lost_to_start(result) is None


def test_alarms_show_in_a_red_box(tmp_path):
    run = make_run(tmp_path)
    _jsonl(run / "ppo" / "alarms.jsonl", [{"step": 7, "kind": "stale_rollout", "message": "differ by <0.5>"}])
    page = write_report(run).read_text()
    box = page[page.index("<div class='alarm'>"):]
    assert "Alarms (1)" in box and "iteration 7: <b>stale_rollout</b> differ by &lt;0.5&gt;" in box
    assert page.index("id='ppo'") < page.index("<div class='alarm'>")
    assert page.count("<div class='alarm'") == 1  # sft and reward have none; the eval did not lose


def test_report_html_sections_and_missing_parts(tmp_path):
    run = make_run(tmp_path)
    page = write_report(run).read_text()
    assert page.count("data:image/png;base64,") >= 7  # sft 3 groups, reward 3, ppo 5
    assert "name_or_path: tiny-random" in page and "1 line(s) of sft/metrics.jsonl" in page
    assert "How do I bake &lt;bread&gt;?" in page and "Mix flour &amp; water." in page  # escaped
    assert "75.0%" in page and "2.500" in page
    # the answer first: headline and eval table before the step curves
    assert page.index("id='headline'") < page.index("id='eval-table'") < page.index("id='sft'")
    assert "ppo beat sft by +1.25 reward, 4.2 s.e." in page
    # a metric logged once is a table row, not a chart; the 10-point train loss gets a smoothed line
    assert "metric (logged once)" in page and "<td>perplexity</td><td>eval</td><td class='num'>10</td>" in page

    bare = tmp_path / "bare"
    _jsonl(bare / "sft" / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    assert main(["report", str(bare)]) == 0
    page = (bare / "report.html").read_text()
    assert "No reward/ folder" in page and "No ppo/ folder" in page and "No eval/eval.json" in page
    assert "No sft/config.yaml" in page and page.count("data:image/png") == 0  # one point: a table row
    assert "<td>loss</td><td>train</td>" in page
    assert main(["report", str(tmp_path / "nope")]) == 2


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium) for the browser check")
def test_report_renders_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    report = write_report(make_run(tmp_path))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(report.as_uri())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all(
                "img.chart", "els => els.map(e => ({done: e.complete, w: e.naturalWidth, h: e.naturalHeight}))")
            assert len(images) >= 7
            assert all(i["done"] and i["w"] > 0 and i["h"] > 0 for i in images), images
            assert page.locator("#eval-table").is_visible()
            cells = page.locator("#eval-table tr").all_inner_texts()
            assert len(cells) == 3 and cells[2].split("\t")[0] == "ppo" and "75.0%" in cells[2]
            assert "Knead, proof, then bake at 230C." in page.locator("#samples").inner_text()
            assert "你好！很高兴见到你 😊" in page.locator("#samples").inner_text()
            fonts = page.evaluate("getComputedStyle(document.body).fontFamily")
            assert "Noto Sans CJK SC" in fonts and "Noto Color Emoji" in fonts  # fallbacks that cover CJK and emoji
            assert page.locator("#headline").is_visible()
            if HAS_CJK_FONT:  # CJK glyphs are ~1 em wide; a missing-glyph box ("tofu") is ~0.6 em
                em = page.evaluate("""() => { const s = document.createElement('span'); s.textContent = '你好你好你好你好';
                    document.body.appendChild(s); const w = s.getBoundingClientRect().width / 8;
                    return w / parseFloat(getComputedStyle(s).fontSize); }""")
                assert 0.9 < em < 1.1, em
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            if os.environ.get("CHATRL_KEEP_SCREENSHOT"):
                shutil.copy(tmp_path / "report.png", os.environ["CHATRL_KEEP_SCREENSHOT"])
        finally:
            browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
