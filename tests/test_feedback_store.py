"""The feedback database without a server: schema and migrations, users and keys, conversations as message trees,
feedback checks, and the exports read back by chatrl's own data readers."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text, update

from chatrl.cli import main
from chatrl.config import DataConfig
from chatrl.data.clean import DataReport
from chatrl.data.prepare import load_records, read_examples
from chatrl.errors import ChatrlError
from chatrl.feedback.api import UserGate
from chatrl.feedback.db import MIGRATIONS, Base, Feedback, User, open_db, utcnow
from chatrl.feedback.export import Filters, export_rows, stats, write_jsonl
from chatrl.feedback.store import FeedbackStore, Reply, StoreError
from chatrl.serve.ratelimit import RateLimited, RateLimiter
from chatrl.serve.server import ApiError

Q = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]


@pytest.fixture
def store(tmp_path: Path) -> FeedbackStore:
    return FeedbackStore(open_db(tmp_path / "runs" / "chat.db"))


def _record(store, user, messages, texts, cid, version="v1", conversation=None):
    replies = [Reply(cid if i == 0 else f"{cid}:{i}", t, "stop") for i, t in enumerate(texts)]
    return store.record_completion(user, messages, replies, model_name="tiny", version=version,
                                   sampling={"temperature": 0.7}, conversation=conversation)


def test_open_makes_the_migrated_schema_in_wal_mode_and_reopens(tmp_path: Path):
    db = open_db(tmp_path / "new" / "chat.db")
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert set(inspect(conn).get_table_names()) == {"alembic_version", "users", "conversations", "messages",
                                                        "feedback"}
        assert conn.execute(text("select version_num from alembic_version")).scalar() == "0001"
        # the shipped migration builds exactly the tables the models declare (columns, types, indexes)
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    again = open_db(tmp_path / "new" / "chat.db")  # upgrading a current database is a no-op
    assert again.revision == "0001"
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with db.write_engine.begin() as conn:  # the migration goes down cleanly too
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    with db.engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) == {"alembic_version"}
    assert open_db(tmp_path / "new" / "chat.db").revision == "0001"
    with pytest.raises(ChatrlError, match="is a folder"):
        open_db(tmp_path)
    with pytest.raises(ChatrlError, match="no SQLAlchemy driver"):
        open_db("nonsense://x")


def test_users_keys_are_stored_hashed(store: FeedbackStore):
    assert not store.has_users()
    store.local_user()
    assert not store.has_users()  # the keyless local user does not switch on authentication
    key = store.add_user("alice", admin=True)
    assert key.startswith("sk-chatrl-") and len(key) > 40 and store.has_users()
    with store.db.session() as s:
        row = s.scalar(select(User).where(User.name == "alice"))
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest() and key not in row.key_hash
    assert store.authenticate(key).name == "alice" and store.authenticate(key).is_admin
    assert store.authenticate(key + "x") is None and store.authenticate("") is None
    with pytest.raises(ChatrlError, match="already exists"):
        store.add_user("alice")
    for bad in ("", "a b", "x'; DROP TABLE users;--", "local", "é" * 3):
        with pytest.raises(ChatrlError, match="user name"):
            store.add_user(bad)


def test_a_continued_request_extends_its_conversation_and_regenerations_are_siblings(store: FeedbackStore):
    me = store.local_user()
    first = _record(store, me, Q, ["Paris."], "chatcmpl-a")
    follow = [*Q, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}]
    second = _record(store, me, follow, ["Madrid."], "chatcmpl-b")
    assert second.conversation_id == first.conversation_id
    again = _record(store, me, follow, ["Madrid!"], "chatcmpl-c", conversation=first.conversation_id)
    assert again.prompt_id == second.prompt_id  # the same prompt message: the two replies are siblings
    fresh = _record(store, me, Q, ["Lyon."], "chatcmpl-d")  # same question, no conversation id: a new one
    assert fresh.conversation_id != first.conversation_id
    (conv,) = [c for c in store.conversations(me) if c["id"] == first.conversation_id]
    assert [m["content"] for m in conv["messages"]] == ["Be brief.", "Capital of France?", "Paris.", "And Spain?",
                                                        "Madrid.", "Madrid!"]
    assert store.counts()["messages"] == 6 + 3  # the fresh conversation: system, user, reply
    with pytest.raises(StoreError) as err:
        store.check_conversation(me, "conv-999")
    assert err.value.status == 404


def test_feedback_is_checked_against_owner_and_prompt(store: FeedbackStore):
    alice, bob = (store.authenticate(store.add_user(name)) for name in ("alice", "bob"))
    rec = _record(store, alice, Q, ["Paris.", "Lyon."], "chatcmpl-a")
    other = _record(store, alice, [{"role": "user", "content": "Hi"}], ["Hello."], "chatcmpl-o")
    assert store.add_rating(alice, "chatcmpl-a", 1, "good") == "fb-1"
    cases = [
        (lambda: store.add_rating(bob, "chatcmpl-a", -1, None), 404),  # not bob's: as if it did not exist
        (lambda: store.add_rating(alice, "chatcmpl-zzz", 1, None), 404),
        (lambda: store.add_pair(alice, rec.prompt_id, "chatcmpl-a", "chatcmpl-a"), 400),
        (lambda: store.add_pair(alice, rec.prompt_id, "chatcmpl-a", "chatcmpl-o"), 400),  # another prompt's reply
        (lambda: store.add_pair(alice, other.prompt_id, "chatcmpl-a", "chatcmpl-a:1"), 400),
        (lambda: store.add_pair(alice, "msg-1 OR 1=1", "chatcmpl-a", "chatcmpl-a:1"), 404),
        (lambda: store.add_edit(alice, "chatcmpl-a", " Paris. "), 400),  # unchanged
    ]
    for call, status in cases:
        with pytest.raises(StoreError) as err:
            call()
        assert err.value.status == status
    assert store.add_pair(alice, rec.prompt_id, "chatcmpl-a:1", "chatcmpl-a") == "fb-2"
    assert store.counts()["feedback"] == 2


def _scenario(store: FeedbackStore):
    """Two users, the same question: alice changes her rating, repeats a choice and edits; bob's choice has the
    same texts as alice's (a duplicate row)."""
    alice, bob = (store.authenticate(store.add_user(name)) for name in ("alice", "bob"))
    a = _record(store, alice, Q, ["Paris.", "Lyon."], "chatcmpl-a", version="v1")
    b = _record(store, bob, Q, ["Paris.", "Lyon."], "chatcmpl-b", version="v2")
    store.add_rating(alice, "chatcmpl-a", 1, "good")                # fb-1, replaced by fb-2
    store.add_rating(alice, "chatcmpl-a", -1, "no, too short")      # fb-2
    store.add_rating(alice, "chatcmpl-a:1", 1, None)                # fb-3
    store.add_pair(alice, a.prompt_id, "chatcmpl-a", "chatcmpl-a:1")  # fb-4, repeated by fb-5
    store.add_pair(alice, a.prompt_id, "chatcmpl-a", "chatcmpl-a:1")  # fb-5
    store.add_edit(alice, "chatcmpl-a:1", "Paris, of course.")      # fb-6
    store.add_rating(bob, "chatcmpl-b", 1, None)                    # fb-7
    store.add_pair(bob, b.prompt_id, "chatcmpl-b", "chatcmpl-b:1")  # fb-8: alice's fb-5 texts again
    return alice, bob


def test_exports_keep_the_latest_feedback_and_drop_duplicates(store: FeedbackStore):
    _scenario(store)
    pairs = export_rows(store.db, "pairs")
    assert pairs.rows == [{"prompt": Q, "chosen": "Paris.", "rejected": "Lyon."},
                          {"prompt": Q, "chosen": "Paris, of course.", "rejected": "Lyon."}]
    assert (pairs.events, pairs.superseded, pairs.duplicates) == (4, 1, 1)
    kto = export_rows(store.db, "kto")
    assert kto.rows == [{"prompt": Q, "completion": "Paris.", "label": False},
                        {"prompt": Q, "completion": "Lyon.", "label": True},
                        {"prompt": Q, "completion": "Paris.", "label": True}]
    assert (kto.events, kto.superseded, kto.duplicates) == (4, 1, 0)
    sft = export_rows(store.db, "sft")
    assert sft.rows == [{"messages": [*Q, {"role": "assistant", "content": "Lyon."}]},
                        {"messages": [*Q, {"role": "assistant", "content": "Paris."}]}]
    # filters: bob's alone, by model version or by user, then by time
    only_bob = [{"prompt": Q, "chosen": "Paris.", "rejected": "Lyon."}]
    by_version = export_rows(store.db, "pairs", Filters(model_version="v2"))
    assert by_version.rows == only_bob and by_version.other_version == 2
    assert export_rows(store.db, "pairs", Filters(user="bob")).rows == only_bob
    with store.db.session() as s, s.begin():
        s.execute(update(Feedback).where(Feedback.id <= 6).values(created=utcnow() - timedelta(days=2)))
    recent = export_rows(store.db, "kto", Filters(since=utcnow() - timedelta(days=1)))
    assert recent.rows == [{"prompt": Q, "completion": "Paris.", "label": True}] and recent.events == 1


def test_stats_count_per_version_rating_and_user(store: FeedbackStore):
    _scenario(store)
    tables = stats(store.db)  # every event counts (alice rated chatcmpl-a up, then down)
    assert tables["per model version"][1] == [["v1", "tiny", 2, 2, 1, 2, 1], ["v2", "tiny", 2, 1, 0, 1, 0]]
    assert tables["per rating"][1] == [["+1", 3], ["-1", 1]]
    assert tables["per user"][1] == [["alice", "", 1, 2, 1, 2, 1], ["bob", "", 1, 1, 0, 1, 0]]


def test_exported_files_are_read_by_chatrl_data_readers(store: FeedbackStore, tmp_path: Path):
    _scenario(store)
    pairs = write_jsonl(export_rows(store.db, "pairs").rows, tmp_path / "pairs.jsonl")
    ds = read_examples(str(pairs), DataConfig(paths=[str(pairs)]), DataReport())
    assert ds.schema == "preference" and len(ds.examples) == 2
    # exactly what `chatrl reward` and `chatrl dpo` train on: the reward shard's preference pairs
    records, _ = load_records(DataConfig(paths=[str(pairs)], split="0,1,0", eval_fraction=0.0), "reward", "train")
    assert sorted((r.chosen, r.rejected) for r in records) == [("Paris, of course.", "Lyon."), ("Paris.", "Lyon.")]
    assert all(r.prompt_messages == Q for r in records)
    sft = write_jsonl(export_rows(store.db, "sft").rows, tmp_path / "sft.jsonl")
    convs, _ = load_records(DataConfig(paths=[str(sft)], split="1,0,0", eval_fraction=0.0), "sft", "train")
    assert sorted(c.messages[-1]["content"] for c in convs) == ["Lyon.", "Paris."]
    kto = write_jsonl(export_rows(store.db, "kto").rows, tmp_path / "kto.jsonl")
    assert read_examples(str(kto), DataConfig(paths=[str(kto)]), DataReport()).schema == "kto"
    # what `chatrl kto` trains on (it reads the reward shard, as dpo does)
    labeled, _ = load_records(DataConfig(paths=[str(kto)], split="0,1,0", eval_fraction=0.0), "kto", "train")
    assert sorted((r.completion, r.desirable) for r in labeled) == [("Lyon.", True), ("Paris.", False),
                                                                    ("Paris.", True)]


def test_cli_users_export_and_stats(tmp_path: Path, capsys: pytest.CaptureFixture):
    db = tmp_path / "chat.db"
    assert main(["users", "add", "carol", "--db", str(db), "--admin"]) == 0
    added = capsys.readouterr()
    key = added.out.strip()  # stdout is the key alone (scripts capture it); the notice goes to stderr
    assert key.startswith("sk-chatrl-") and "admin 'carol'" in added.err
    store = FeedbackStore(open_db(db))
    carol = store.authenticate(key)
    assert carol.is_admin
    rec = _record(store, carol, Q, ["Paris.", "Lyon."], "chatcmpl-c")
    store.add_pair(carol, rec.prompt_id, "chatcmpl-c", "chatcmpl-c:1")
    out = tmp_path / "pairs.jsonl"
    assert main(["feedback", "export", "--db", str(db), "--format", "pairs", "--out", str(out),
                 "--since", "2000-01-01"]) == 0
    assert "1 pairs rows" in capsys.readouterr().err
    assert main(["data", "inspect", str(out), "--tokenizer", "none"]) == 0
    assert "preference" in capsys.readouterr().out
    assert main(["feedback", "stats", "--db", str(db)]) == 0
    shown = capsys.readouterr().out
    assert "carol" in shown and "per model version" in shown
    assert main(["feedback", "export", "--db", str(db), "--format", "kto", "--out", str(out), "--since", "soon"]) == 2
    assert "--since 'soon'" in capsys.readouterr().err
    assert main(["users", "add", "carol", "--db", str(db)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["users", "list", "--db", str(db)]) == 0
    listed = capsys.readouterr().out
    assert "carol" in listed and "yes" in listed and key not in listed


def test_rate_limiter_counts_a_sliding_minute_per_key():
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    limiter.check("k1")
    limiter.check("k1")
    limiter.check("k2")  # another key has its own budget
    now[0] = 30.0
    with pytest.raises(RateLimited) as err:
        limiter.check("k1")
    assert err.value.retry_after == 30
    now[0] = 60.5  # the first two requests left the window
    limiter.check("k1")
    RateLimiter(0).check("k1")  # 0 = no limit


def test_user_gate_with_and_without_users_and_a_shared_key(store: FeedbackStore):
    gate = UserGate(store, api_key="shared-secret")
    for wrong in ("", "shared-secre", "' OR 1=1 --"):
        with pytest.raises(ApiError) as err:
            gate.who(wrong)
        assert err.value.status == 401 and err.value.body["error"]["code"] == "invalid_api_key"
    assert gate.who("shared-secret").name == "local"  # no users yet: --api-key guards the one local user
    key = store.add_user("dora")
    assert gate.who(key).name == "dora"
    assert gate.who("shared-secret").name == "local"  # the operator's key still works, as the local admin
    with pytest.raises(ApiError):
        gate.who("")
    open_gate = UserGate(store, api_key=None)
    with pytest.raises(ApiError):
        open_gate.who("")  # once a user exists, a key is needed even without --api-key
    assert open_gate.who(key).name == "dora"
