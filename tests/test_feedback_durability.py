"""Nothing acknowledged is lost: `chatrl serve --db` SIGKILLed while 8 clients stream and rate replies keeps every
feedback event it answered 200 to (and every reply whose stream finished)."""

from __future__ import annotations

import threading
import time

import httpx
import openai
from sqlalchemy import select, text

from chatrl.feedback.db import Feedback, Message, open_db
from feedback_server import ServeProcess

CLIENTS = 8
ACKED_BEFORE_KILL = 40


def _client_loop(url: str, i: int, acked: list, finished: list, stop: threading.Event) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    turn = 0
    while not stop.is_set():
        turn += 1
        comment = f"client {i} turn {turn}"
        try:
            chunks = list(client.chat.completions.create(
                model="tiny-random", messages=[{"role": "user", "content": comment}], max_tokens=6, stream=True))
            if not any(c.model_extra.get("completion_ids") for c in chunks):
                return  # the stream was cut by the kill
            finished.append(chunks[0].id)
            r = httpx.post(url + "/v1/feedback", timeout=60,
                           json={"completion_id": chunks[0].id, "rating": 1 if turn % 2 else -1, "comment": comment})
        except (openai.APIError, httpx.HTTPError):
            return  # the server is gone
        if r.status_code == 200:
            acked.append((r.json()["id"], chunks[0].id, comment))


def test_sigkill_loses_no_acknowledged_feedback(tmp_path):
    db_path = tmp_path / "chat.db"
    server = ServeProcess(db_path, tmp_path)
    acked: list[tuple[str, str, str]] = []
    finished: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_client_loop, args=(server.url, i, acked, finished, stop), daemon=True)
               for i in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while len(acked) < ACKED_BEFORE_KILL and time.monotonic() < deadline and any(t.is_alive() for t in threads):
            time.sleep(0.05)
        server.kill()  # mid-traffic: streams and feedback writes in flight
    finally:
        stop.set()
        server.kill()
        for t in threads:
            t.join(60)
    assert len(acked) >= ACKED_BEFORE_KILL, server.log()[-3000:]

    db = open_db(db_path)
    with db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
    with db.session() as s:
        rows = s.execute(select(Feedback.id, Message.completion_id, Feedback.comment)
                         .join(Message, Message.id == Feedback.message_id)).all()
        stored_replies = set(s.scalars(select(Message.completion_id).where(Message.completion_id.is_not(None))))
    stored = {(f"fb-{fid}", cid, comment) for fid, cid, comment in rows}
    missing = [a for a in acked if a not in stored]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged feedback events lost: {missing[:5]}"
    assert set(finished) <= stored_replies  # a finished stream's reply was committed before its last chunk
