"""The whole loop on the tiny model: a real `chatrl serve --db` process, scripted users chatting and rating through the
official `openai` client, `chatrl feedback export --format kto`, `chatrl kto` on the export, `POST /admin/reload` of
the trained folder; then the same prompt (greedy) gets other text, stored under the new model version."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import select

from chatrl.feedback.db import Message, open_db
from chatrl.serve.reload import model_version
from feedback_server import ServeProcess
from helpers import read_metrics, run_cli

PROBES = [[{"role": "user", "content": f"Probe {i}: tell me something."}] for i in range(4)]


def _greedy(client: openai.OpenAI) -> list[str]:
    return [client.chat.completions.create(model="tiny-random", messages=m, temperature=0, max_tokens=12)
            .choices[0].message.content for m in PROBES]


def _users_chat_and_rate(client: openai.OpenAI, url: str, prompts: int) -> None:
    """A scripted taste: of two sampled replies, the shorter is liked, the longer disliked, and chosen over it."""
    for i in range(prompts):
        done = client.chat.completions.create(model="tiny-random", n=2, temperature=1.0, max_tokens=12, seed=i,
                                              messages=[{"role": "user", "content": f"Question number {i}?"}])
        ids, texts = done.model_extra["completion_ids"], [c.message.content for c in done.choices]
        short, long_ = sorted(range(2), key=lambda k: (len(texts[k]), k))
        for index, rating in ((short, 1), (long_, -1)):
            answer = httpx.post(url + "/v1/feedback", json={"completion_id": ids[index], "rating": rating}, timeout=60)
            assert answer.status_code == 200, answer.text
        if texts[short] != texts[long_]:
            answer = httpx.post(url + "/v1/feedback", timeout=60, json={
                "prompt_id": done.model_extra["prompt_id"], "chosen_id": ids[short], "rejected_id": ids[long_]})
            assert answer.status_code == 200, answer.text


@pytest.mark.slow
def test_chat_rate_export_train_reload_changes_the_served_model(tmp_path: Path, tiny_model_dir: str):
    db = tmp_path / "chat.db"
    server = ServeProcess(db, tmp_path / "logs", "--default-max-tokens", "12")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        before = _greedy(client)
        _users_chat_and_rate(client, server.url, prompts=24)

        rows = tmp_path / "kto.jsonl"
        done = run_cli("feedback", "export", "--db", str(db), "--format", "kto", "--out", str(rows), timeout=120)
        assert done.returncode == 0, done.stderr
        labels = [json.loads(line)["label"] for line in rows.read_text().splitlines()]
        assert len(labels) == 48 and sum(labels) == 24  # every rating, half of them liked

        out = tmp_path / "kto"
        done = run_cli("kto", "--config", "configs/tiny-kto.yaml", f"output_dir={out}", f"data.paths=[{rows}]",
                       "optim.max_steps=8", "logging.eval_every=8", "checkpoint.every=8", timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert read_metrics(out)[-1]["step"] == 8

        swapped = httpx.post(server.url + "/admin/reload", json={"model": str(out / "model")}, timeout=120).json()
        new_version = model_version(out / "model")
        assert swapped["model_version"] == new_version != swapped["previous_version"]
        after = _greedy(client)
    finally:
        server.stop()
    assert after != before  # greedy decoding of the same prompts: the trained weights answer differently
    with open_db(db).session() as s:
        last = s.scalars(select(Message).where(Message.completion_id.is_not(None)).order_by(Message.id.desc())
                         .limit(len(PROBES))).all()
        first = s.scalars(select(Message).where(Message.completion_id.is_not(None)).order_by(Message.id)
                          .limit(len(PROBES))).all()
    assert {m.model_version for m in last} == {new_version}
    assert {m.model_version for m in first} == {model_version(tiny_model_dir)}
