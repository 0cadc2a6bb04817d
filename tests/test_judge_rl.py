"""`chatrl grpo` whose only reward is an LLM judge (a fake OpenAI-compatible server in this process, scoring each
reply by its length, and answering without a score for some prompts): the logged reward is what the judge
answered, a group the judge cannot score is left out and counted, and a rerun on the same cache asks the judge only
what it could not answer before."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from fake_judge import FakeJudge
from helpers import read_metrics, run_cli

PROMPTS = [f"{'Skip me' if i % 2 else 'Say something'} ({i})" for i in range(20)]


def parts(text: str) -> tuple[str, str]:
    """(prompt, reply) of a filled rubric."""
    return re.fullmatch(r"<<(.*)>>\[\[(.*)\]\]", text, re.DOTALL).groups()


def answer(text: str) -> str:
    """Score 1 + len(reply) % 10; no score at all for the 'Skip me' prompts (their groups are skipped)."""
    prompt, reply = parts(text)
    return "I cannot judge this." if prompt.startswith("Skip") else f"Score: {1 + len(reply) % 10}"


def scaled(text: str) -> float | None:
    """The judge's score in [0, 1], None when it answered none."""
    found = re.fullmatch(r"Score: (\d+)", answer(text))
    return None if found is None else (int(found.group(1)) - 1) / 9


def grpo(tmp_path: Path, url: str, out: Path) -> list[dict]:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": "ok"}) + "\n" for p in PROMPTS))
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("<<{prompt}>>[[{reply}]]")
    proc = run_cli("grpo", "--config", "configs/tiny-grpo.yaml", f"output_dir={out}", "env.name=chat",
                   f"data.paths=[{data}]", "data.split=0,0,1", "rollout.prompts_per_rollout=2",
                   "rollout.samples_per_prompt=2", "grpo.iterations=2", "grpo.mini_batches=1",
                   "grpo.micro_batch_size=4", "checkpoint.every=0", f"reward.judge.base_url={url}",
                   "reward.judge.model=fake-judge", f"reward.judge.rubric={rubric}", "reward.judge.on_error=skip",
                   f"reward.judge.cache={tmp_path / 'judge.sqlite'}", "reward.judge.concurrency=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(out)


@pytest.mark.slow  # two tiny GRPO runs of 2 iterations: ~1 minute each on a busy 2-core machine
def test_grpo_rewarded_by_a_judge_logs_what_it_answered(tmp_path: Path) -> None:
    with FakeJudge(answer) as server:
        rows = grpo(tmp_path, server.url, tmp_path / "run")
        asked = server.texts()
        assert len(rows) == 2 and len(asked) == 8  # 2 prompts x 2 samples per iteration, nothing cached yet
        unscored = []
        for it, row in enumerate(rows):
            scores = [scaled(t) for t in asked[4 * it:4 * it + 4]]  # the iterations ask one after the other
            groups = {parts(t)[0] for t in asked[4 * it:4 * it + 4]}
            assert len(groups) == 2  # 2 prompts of 2 samples: a prompt's replies are scored or not together
            kept = [s for s in scores if s is not None]
            unscored.append(scores.count(None))
            if kept:  # the logged reward is the judge's, over the groups it scored
                assert row["reward_mean"] == pytest.approx(sum(kept) / len(kept), abs=1e-6)
            else:  # nothing to learn from: no number is made up (the nonfinite alarm says so)
                assert math.isnan(row["reward_mean"])
            assert (row["judge/requests"], row["judge/cache_hits"]) == (4, 0) and row["judge/latency_s"] > 0
            assert row["judge/errors"] == row["judge/skipped"] == unscored[-1]
        assert 0 < sum(unscored) < 8  # this seed draws both kinds of prompt
        # the same run again on the same cache: only what had no score is asked again
        again = grpo(tmp_path, server.url, tmp_path / "rerun")
        assert len(server.texts()) == 8 + sum(unscored)
        assert all(scaled(t) is None for t in server.texts()[8:])
    for row, first, n in zip(again, rows, unscored, strict=True):
        assert (row["judge/requests"], row["judge/cache_hits"], row["judge/skipped"]) == (n, 4 - n, n)
        now, before = row["reward_mean"], first["reward_mean"]
        assert now == before or (math.isnan(now) and math.isnan(before))
