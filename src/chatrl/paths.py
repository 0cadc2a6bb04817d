"""Where chatrl keeps caches: one directory, `$CHATRL_HOME` (default `~/.cache/chatrl`).

Converted models, tokenized data and compiled DeepSpeed extensions all live below it, never in
site-packages, so deleting that one folder resets every cache.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]  # valid for a source checkout / editable install


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the chatrl cache dir."""
    root = Path(os.environ.get("CHATRL_HOME", Path.home() / ".cache" / "chatrl")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def setup_extension_cache() -> None:
    """Point torch/DeepSpeed JIT extension builds (CPU Adam) and inductor's compiled kernels (rollout.compile)
    into our cache dir."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir("torch_extensions")))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir("torchinductor")))


def builtin_data_dir() -> Path:
    """The data shipped with the repo (hh-rlhf harmless sample, with its LICENSE)."""
    return REPO_ROOT / "data"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temp path beside `path` to write into; renamed onto `path` when the block ends without error and
    removed otherwise, so a reader (or a restarted run) never sees a half-written file. Beside it, not in /tmp:
    the rename must stay on one filesystem to be atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically (`atomic_path`); returns the path."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """`obj` as JSON (`json.dumps(obj, **dumps_kwargs)`) written atomically to `path`."""
    return atomic_write(path, json.dumps(obj, **dumps_kwargs))
