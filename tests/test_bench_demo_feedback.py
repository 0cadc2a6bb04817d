"""bench/demo_feedback.py end to end on the tiny model with tiny sizes: rater, served chats rated through the HTTP API,
KTO on the export, reload, arena; its numbers agree with what the database holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from chatrl.feedback.db import Feedback, Message, open_db
from chatrl.serve.reload import model_version
from helpers import REPO, cli_env

sys.path.insert(0, str(REPO / "bench"))

from demo_feedback import report  # noqa: E402  (bench/demo_feedback.py)


@pytest.mark.slow
def test_demo_feedback_runs_on_the_tiny_model(tmp_path: Path, tiny_model_dir: str):
    run, out = tmp_path / "run", tmp_path / "result.json"
    args = ["--model", "tiny-random", "--prompts", "8", "--arena-prompts", "8", "--users", "2", "--max-tokens", "8",
            "--rater-steps", "2", "--kto-steps", "2", "--trainable-layers", "0", "--dtype", "fp32", "--lr", "3e-3",
            "--run-dir", str(run), "--out", str(out)]
    done = subprocess.run([sys.executable, "bench/demo_feedback.py", *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["new_version"] == model_version(run / "kto" / "model") != r["old_version"] == model_version(tiny_model_dir)
    assert r["decided"] + r["arena_ties"] == 8 and 0 <= r["new_wins"] <= r["decided"]
    assert r["new_preference"] == pytest.approx(r["new_wins"] / r["decided"])
    assert (run / "feedback-kto.jsonl").read_text().count("\n") == r["ratings"] > 0

    with open_db(run / "chat.db").session() as s:
        pairs = s.scalars(select(Feedback).where(Feedback.kind == "pair")).all()
        arena = [(s.get(Message, f.chosen_id), s.get(Message, f.rejected_id)) for f in pairs]
        arena = [(c, x) for c, x in arena if c.model_version != x.model_version]
        users = {f.user_id for f in pairs}
    assert len(arena) == r["decided"] and len(users) == 2  # every decided arena choice stored, by both users
    assert sum(c.model_name == "new" for c, _ in arena) == r["new_wins"]
    assert {c.model_version for c, _ in arena} | {x.model_version for _, x in arena} == {r["old_version"],
                                                                                        r["new_version"]}
    text = report(r)
    assert f"{r['new_preference']:.1%} ± {r['new_preference_se']:.1%}" in text
    assert text in done.stdout
