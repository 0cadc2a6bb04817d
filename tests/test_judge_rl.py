"""`chatrl grpo` whose only reward is an LLM judge (a fake OpenAI-compatible server in this process, scoring each
reply by its length, and answering without a score for some prompts): the logged reward is what the judge
answered, a group the judge cannot score is left out and counted, and a rerun on the same cache asks the judge only
what it could not answer before."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from chatrl.config_rl import GRPOConfig
from chatrl.rollout.episodes import EpisodeBatch
from chatrl.steps.rl import make_experience
from chatrl.steps.rl_experience import Scored
from fake_judge import FakeJudge
from helpers import FixedLogitsLM, read_metrics, run_cli

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


def test_a_skipped_group_is_out_of_the_update() -> None:
    """Two groups of two one-token episodes, scores [2, 0 | 5, 5], the second group not scored by the judge
    (kept False). REINFORCE++ whitens returns over the batch: over the kept rows only, 2 and 0 (mean 1, unbiased sd
    sqrt(2)) give +-1/sqrt(2); had the skipped rows counted, mean 3 and sd sqrt(6) would give -0.41 and -1.22."""
    n = 4
    batch = EpisodeBatch(prompt_ids=[[1]] * n, response_ids=[[3]] * n, action_mask=[[1]] * n, turn_ends=[[0]] * n,
                         turn_rewards=[[0.0]] * n, last_reply_ids=[[3]] * n, last_reply_eos=[True] * n,
                         prompts=[[]] * n, conversations=[[]] * n, infos=[{}] * n, success=[False] * n,
                         truncated=[False] * n, context_truncated=[False] * n)
    score = torch.tensor([2.0, 0.0, 5.0, 5.0])
    scored = Scored(batch, score=score, outcome=score.clone(), has_eos=torch.ones(n, dtype=torch.bool),
                    by_function={}, rm_score=None, judge_score=score / 5,
                    kept=torch.tensor([True, True, False, False]))
    cfg = GRPOConfig()
    cfg.rollout.samples_per_prompt, cfg.grpo.advantage = 2, "reinforce_pp"
    m = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0), hybrid=SimpleNamespace(device=torch.device("cpu")),
                        actor=FixedLogitsLM([0.0] * 5), reference=None, critic=None, teacher=None,
                        eval_mode=lambda: None, train_mode=lambda: None)
    exp = make_experience(m, cfg, scored, beta=0.0, times={})
    assert exp.rollout.action_mask.tolist() == [[1], [1], [0], [0]]
    assert_close(exp.advantages, torch.tensor([[0.5 ** 0.5], [-(0.5 ** 0.5)], [0.0], [0.0]]), atol=1e-5, rtol=0)
