"""Where chatrl keeps caches: one directory, `$CHATRL_HOME` (default `~/.cache/chatrl`).

Converted models, tokenized data and compiled DeepSpeed extensions all live below it, never in
site-packages, so deleting that one folder resets every cache.
"""

from __future__ import annotations

import os
from pathlib import Path

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
