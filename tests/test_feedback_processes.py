"""Several processes on one SQLite feedback database (what several `chatrl serve --db` processes do): opening a
new file at once migrates it once, and concurrent writers all commit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select

from chatrl.feedback.db import Feedback, Message, open_db
from helpers import REPO, cli_env

PROCESSES = 4
WRITES = 40

# each process: open the (maybe new) database, record WRITES completions and rate each one
WRITER = f"""
import sys
from chatrl.feedback.db import open_db
from chatrl.feedback.store import FeedbackStore, Reply

store = FeedbackStore(open_db(sys.argv[1]))
me, tag = store.local_user(), sys.argv[2]
for i in range({WRITES}):
    cid = f"chatcmpl-{{tag}}-{{i}}"
    # read-then-write transactions (find the conversation, then insert), interleaved across processes
    store.record_completion(me, [{{"role": "user", "content": "same question"}}], [Reply(cid, f"{{tag}} {{i}}", "stop")],
                            model_name="tiny", version="v", sampling={{}})
    store.add_rating(me, cid, 1, tag)
print("ok")
"""


def test_processes_open_and_write_one_sqlite_database_at_once(tmp_path: Path):
    db = tmp_path / "new" / "chat.db"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), f"p{i}"], cwd=REPO, env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(PROCESSES)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0 and out.strip() == "ok", err[-3000:]
    with open_db(db).session() as s:
        assert s.scalar(select(func.count()).select_from(Feedback)) == PROCESSES * WRITES
        assert s.scalar(select(func.count()).select_from(Message).where(Message.role == "user")) == PROCESSES * WRITES
