"""Live model swap for `chatrl serve`: `POST /admin/reload` and `--watch RUN_DIR`.

A request leases the model that is current when it starts (`ModelSlot.lease`) and keeps it to its end: a swap
loads the new model beside the old one, new requests go to the new one, and the old model's worker stops once its
last lease is returned, so in-flight streams finish on the weights they started with. Each loaded model carries its
version (a hash of its safetensors files), which the feedback store writes next to every reply.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from chatrl.serve.generation import ChatModel
from chatrl.serve.worker import GenerationWorker


def model_version(folder: str | Path) -> str:
    """The first 16 hex digits of a SHA-256 over the folder's *.safetensors files (names and bytes, sorted by
    name): two folders with the same weights have the same version. 'unknown' when it has no safetensors."""
    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        return "unknown"
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


class Served:
    """One loaded model, its worker thread, its version, and how many requests hold it."""

    def __init__(self, chat: ChatModel, max_active: int, max_queue: int):
        self.chat, self.path, self.version = chat, chat.path, model_version(chat.path)
        self.worker = GenerationWorker(chat, max_active=max_active, max_queue=max_queue).start()
        self.leases = 0
        self.retired = threading.Event()


class ModelSlot:
    """The current model; `swap(path)` replaces it, `lease()`/`release()` bracket each request."""

    def __init__(self, first: Served, load: Callable[[str], Served]):
        self.current, self._load = first, load
        self._lock = threading.Lock()  # guards current and leases
        self._swapping = threading.Lock()  # one load at a time

    def lease(self) -> Served:
        with self._lock:
            self.current.leases += 1
            return self.current

    def release(self, served: Served) -> None:
        with self._lock:
            served.leases -= 1
            idle = served.leases == 0 and served is not self.current and not served.retired.is_set()
        if idle:
            self._retire(served)

    def swap(self, path: str) -> tuple[Served, Served]:
        """Load `path` (seconds; blocking) and make it current; returns (old, new). A load error leaves the old
        model serving."""
        with self._swapping:
            new = self._load(path)
            with self._lock:
                old, self.current = self.current, new
                idle = old.leases == 0
            if idle:
                self._retire(old)
            return old, new

    @staticmethod
    def _retire(served: Served) -> None:
        served.retired.set()
        served.worker.stop()

    def stop(self) -> None:
        self._retire(self.current)


class Watcher:
    """Polls a run folder every `interval` seconds; when its newest model folder has new weights that stayed the
    same for two polls (a save in progress is not loaded), swaps to it."""

    def __init__(self, slot: ModelSlot, run_dir: str | Path, interval: float,
                 log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)):
        self.slot, self.run_dir, self.interval, self.log = slot, Path(run_dir), interval, log
        self._stop = threading.Event()
        self._seen: tuple[str, str] | None = None
        self._thread = threading.Thread(target=self._run, name="chatrl-watch", daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def poll(self) -> str | None:
        """One look; returns the version swapped to, if any."""
        folder = newest_model_folder(self.run_dir)
        if folder is None:
            return None
        seen = (str(folder), model_version(folder))
        stable, self._seen = seen == self._seen, seen
        if not stable or seen[1] in ("unknown", self.slot.current.version):
            return None
        try:
            _, new = self.slot.swap(str(folder))
        except Exception as e:  # a broken save: keep serving the old model, say why, try again next change
            self.log(f"chatrl serve: --watch: could not load {folder}: {e}")
            return None
        self.log(f"chatrl serve: --watch: now serving {folder} (version {new.version})")
        return new.version

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()


def newest_model_folder(run_dir: Path) -> Path | None:
    """`run_dir` itself if it is a model folder (config.json + *.safetensors), else the one of its sub-folders (two
    levels down: runs/x/sft/model, runs/x/ppo/actor) whose weights were written last."""
    def is_model(p: Path) -> bool:
        return (p / "config.json").is_file() and any(p.glob("*.safetensors"))

    if is_model(run_dir):
        return run_dir
    candidates = [p for p in (*run_dir.glob("*"), *run_dir.glob("*/*")) if p.is_dir() and is_model(p)]
    return max(candidates, key=lambda p: max(f.stat().st_mtime for f in p.glob("*.safetensors")), default=None)


def install_reload(app: FastAPI, slot: ModelSlot, auth: list[Any], api_error: Callable[..., Exception]) -> None:
    """`POST /admin/reload {"model": PATH}` (default: the current folder again): admins only (or anyone allowed
    on a server without users); answers once the new model serves."""

    @app.post("/admin/reload", dependencies=auth)
    async def reload(request: Request) -> dict[str, Any]:
        user = getattr(request.state, "user", None)
        if user is not None and not user.is_admin:
            raise api_error(403, "only an admin key may reload the model", "permission_error", code="forbidden")
        body = await request.body()
        path = _reload_path(body, slot.current.path, api_error)
        try:
            old, new = await asyncio.to_thread(slot.swap, path)
        except Exception as e:  # a path that is no model: the old one keeps serving
            raise api_error(400, f"could not load {path!r}: {e}", param="model", code="invalid_value") from None
        return {"object": "reload", "model_path": new.path, "model_version": new.version,
                "previous_version": old.version}


def _reload_path(body: bytes, default: str, api_error: Callable[..., Exception]) -> str:
    try:
        data = json.loads(body) if body.strip() else {}
    except ValueError:
        raise api_error(400, "the body must be JSON: {\"model\": PATH}", code="invalid_json") from None
    model = data.get("model", default) if isinstance(data, dict) else None
    if not isinstance(model, str) or not model or len(model) > 4096:
        raise api_error(400, "model must be a model folder path", param="model", code="invalid_value")
    return model
