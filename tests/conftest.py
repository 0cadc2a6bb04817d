"""Shared fixtures. Tests run offline with their own cache dir (kept between runs, git-ignored)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("CHATRL_HOME", str(REPO / ".cache" / "test-home"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(os.environ["CHATRL_HOME"]) / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no spinning threads on shared cores


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """Path of the built-in tiny random model (a plain HF folder with the SmolLM2 tokenizer)."""
    from chatrl.models.builtin import TINY, resolve_model_path

    return resolve_model_path(TINY)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
