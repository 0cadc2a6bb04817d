"""Live model swap: `POST /admin/reload` and `--watch RUN_DIR`. In-flight answers finish on the model they started
on, new requests get the new one, and the feedback store names the version that wrote each reply."""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import time
from pathlib import Path

import httpx
import openai
from safetensors.torch import load_file, save_file
from sqlalchemy import select

from chatrl.feedback.db import Message, open_db
from chatrl.feedback.store import FeedbackStore
from chatrl.serve.generation import ChatModel
from chatrl.serve.reload import ModelSlot, Served, Watcher, model_version, newest_model_folder
from chatrl.serve.server import create_app, start_in_thread

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


def _load(path: str) -> ChatModel:
    return ChatModel(path, dtype="fp32")


def _other_weights(tiny: str, out: Path) -> Path:
    """A copy of the tiny model with its output layer scaled and shifted: other weights, other greedy text."""
    shutil.copytree(tiny, out)
    tensors = load_file(out / "model.safetensors")
    name = next(k for k in tensors if "embed_tokens" in k)
    tensors[name] = tensors[name].flip(0).contiguous()  # every token gets another token's embedding
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_model_version_hashes_the_safetensors_files(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "a" / "config.json").write_text("{}")
    expected = hashlib.sha256(b"model.safetensors\0weights").hexdigest()[:16]
    assert model_version(tmp_path / "a") == expected
    (tmp_path / "a" / "config.json").write_text('{"changed": 1}')  # only the weights count
    assert model_version(tmp_path / "a") == expected
    (tmp_path / "a" / "model.safetensors").write_bytes(b"weightz")
    assert model_version(tmp_path / "a") != expected
    assert model_version(tmp_path / "missing") == "unknown"


def test_newest_model_folder_picks_the_last_written_weights(tmp_path: Path):
    assert newest_model_folder(tmp_path) is None
    for i, sub in enumerate(("sft/model", "ppo/actor", "notes")):
        folder = tmp_path / sub
        folder.mkdir(parents=True)
        if sub != "notes":
            (folder / "config.json").write_text("{}")
            (folder / "model.safetensors").write_bytes(b"w")
            os.utime(folder / "model.safetensors", (1000 + i, 1000 + i))
    assert newest_model_folder(tmp_path) == tmp_path / "ppo" / "actor"
    os.utime(tmp_path / "sft" / "model" / "model.safetensors", (5000, 5000))
    assert newest_model_folder(tmp_path) == tmp_path / "sft" / "model"
    assert newest_model_folder(tmp_path / "sft" / "model") == tmp_path / "sft" / "model"


def test_reload_swaps_models_while_streams_finish_on_the_old_one(tmp_path: Path, tiny_model_dir: str):
    v2_dir = _other_weights(tiny_model_dir, tmp_path / "v2")
    app = create_app(tiny_model_dir, chat=_load(tiny_model_dir), model_name="tiny", db=str(tmp_path / "chat.db"),
                     load=_load)
    srv, thread, url = start_in_thread(app)
    slot: ModelSlot = app.state.slot
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        ask = dict(model="tiny", messages=HELLO, max_tokens=120, temperature=0)
        before = client.chat.completions.create(**ask)
        old = slot.current
        stream = client.chat.completions.create(**ask, stream=True)
        first = next(iter(stream))  # the stream has started on the old model
        swapped = httpx.post(url + "/admin/reload", json={"model": str(v2_dir)}, timeout=120).json()
        assert swapped["model_version"] == model_version(v2_dir) != swapped["previous_version"] == old.version
        assert not old.retired.is_set()  # still leased by the open stream
        after = client.chat.completions.create(**ask)
        rest = list(stream)
        streamed = "".join(c.choices[0].delta.content or "" for c in [first, *rest] if c.choices)
        assert streamed == before.choices[0].message.content  # finished on the old weights
        assert after.choices[0].message.content != streamed
        assert after.model_extra["model_version"] == model_version(v2_dir)
        assert httpx.get(url + "/health").json()["model_version"] == model_version(v2_dir)
        del stream, rest
        deadline = time.monotonic() + 10
        while not old.retired.is_set() and time.monotonic() < deadline:  # the lease returns with the stream
            gc.collect()
            time.sleep(0.05)
        assert old.retired.is_set()

        with open_db(tmp_path / "chat.db").session() as s:
            versions = {m.completion_id: m.model_version for m in s.scalars(select(Message))}
        assert versions[before.id] == versions[first.id] == old.version
        assert versions[after.id] == model_version(v2_dir)

        bad = httpx.post(url + "/admin/reload", json={"model": str(tmp_path / "nothing-here")}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
        assert httpx.post(url + "/admin/reload", content=b"{oops", timeout=60).status_code == 400
        assert client.chat.completions.create(**ask).choices[0].message.content == after.choices[0].message.content
    finally:
        srv.should_exit = True
        thread.join(15)


def test_watch_swaps_once_new_weights_stay_put(tmp_path: Path, tiny_model_dir: str):
    first = Served(_load(tiny_model_dir), max_active=2, max_queue=4)
    slot = ModelSlot(first, lambda path: Served(_load(path), max_active=2, max_queue=4))
    lines: list[str] = []
    run = tmp_path / "run"
    run.mkdir()
    watcher = Watcher(slot, run, interval=60, log=lines.append)
    try:
        assert watcher.poll() is None  # nothing there yet
        shutil.copytree(tiny_model_dir, run / "sft" / "model")  # the same weights: nothing to do
        assert watcher.poll() is None and watcher.poll() is None and slot.current is first
        _other_weights(tiny_model_dir, run / "ppo" / "actor")
        assert watcher.poll() is None  # seen once: maybe still being written
        assert watcher.poll() == model_version(run / "ppo" / "actor") == slot.current.version
        assert first.retired.is_set() and "now serving" in lines[-1]
        assert watcher.poll() is None  # nothing new
    finally:
        slot.stop()


def test_reload_needs_an_admin_when_there_are_users(tmp_path: Path, tiny_model_dir: str):
    store = FeedbackStore(open_db(tmp_path / "chat.db"))
    alice, boss = store.add_user("alice"), store.add_user("boss", admin=True)
    app = create_app(tiny_model_dir, chat=_load(tiny_model_dir), db=str(tmp_path / "chat.db"), load=_load)
    srv, thread, url = start_in_thread(app)
    try:
        def reload(key: str | None) -> httpx.Response:
            return httpx.post(url + "/admin/reload", json={}, timeout=120,
                              headers={"Authorization": f"Bearer {key}"} if key else {})

        assert reload(None).status_code == 401
        assert reload(alice).status_code == 403
        answer = reload(boss)  # no model given: the current folder again
        assert answer.status_code == 200 and answer.json()["model_version"] == model_version(tiny_model_dir)
    finally:
        srv.should_exit = True
        thread.join(15)
