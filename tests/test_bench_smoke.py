"""Smoke run of the PPO benchmark script: every rollout case, every iteration phase and every ratio is measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import REPO, cli_env


def test_bench_ppo_quick_tiny_writes_every_phase_and_ratio(tmp_path: Path) -> None:
    out = tmp_path / "ppo.json"
    proc = subprocess.run([sys.executable, "bench/ppo.py", "--quick", "--tiny", "--out", str(out)], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    cases = data["rollout"]
    assert set(cases) == {"hybrid-all", "hf-ppo-batch", "hybrid-ppo-batch", "hf-all", "hybrid-all-compiled",
                          "hybrid-ppo-batch-compiled"}
    assert data["compile_seconds"] > 0
    for name, case in cases.items():
        # --quick: 16 prompts x 8 new tokens, every case generates all of them (min = max new tokens)
        assert case["tokens"] == 16 * 8, name
        assert case["seconds"] > 0 and case["tokens_per_s"] > 0
    assert cases["hf-ppo-batch"]["calls"] == 2 and cases["hybrid-all"]["calls"] == 1
    phases = data["iteration"]["phases"]
    assert set(phases) == {"generate", "score", "rewards", "train"}
    assert all(p["seconds"] >= 0 for p in phases.values())
    assert data["iteration"]["new_tokens"] == 16 * 8
    assert abs(data["iteration"]["total_seconds"] - sum(p["seconds"] for p in phases.values())) < 0.01
    ratios = data["ratios"]
    assert set(ratios) == {"hybrid-all / hf-ppo-batch", "hybrid-all / hf-all", "hybrid-ppo-batch / hf-ppo-batch",
                           "hybrid-all-compiled / hf-ppo-batch", "hybrid-all-compiled / hf-all",
                           "hybrid-ppo-batch-compiled / hf-ppo-batch"}
    tps = {k: c["tokens_per_s"] for k, c in cases.items()}
    assert abs(ratios["hybrid-all / hf-ppo-batch"] - tps["hybrid-all"] / tps["hf-ppo-batch"]) < 0.01
    assert set(data["targets"]) == set(ratios)
    assert "hybrid-all / hf-ppo-batch" in proc.stdout and "PPO iteration" in proc.stdout
