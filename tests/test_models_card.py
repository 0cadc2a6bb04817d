"""Model cards: every saved model folder carries a Hugging Face README.md (front matter + text) saying where the
model came from, on what data (and its license), with which settings, how well it did, and how to use it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from chatrl.config import RewardConfig
from chatrl.configbase import load_config
from chatrl.models.model_card import BaseModel, DataSource, ModelCard, base_model_of, data_source, front_matter, render
from chatrl.steps.common import _CARD_KEYS, StepContext, key_settings, model_card
from chatrl.steps.registry import STEPS
from helpers import read_metrics, run_cli

HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_dir: str) -> Path:
    """A tiny SFT run from a local folder whose own card names its hub ancestor (as a folder chatrl wrote does)."""
    root = tmp_path_factory.mktemp("card")
    base = root / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text(f"---\nbase_model: {HUB_BASE}\nlicense: apache-2.0\n---\n\n# base\n")
    out = root / "sft"
    proc = run_cli("sft", "--config", "configs/tiny-sft.yaml", f"output_dir={out}", f"model.name_or_path={base}",
                   "optim.max_steps=4", "logging.eval_every=2", "checkpoint.every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_sft_folder_card_names_base_step_data_license_and_final_metric(sft_run: Path) -> None:
    text = (sft_run / "model" / "README.md").read_text()
    meta = front_matter(text)
    assert meta["base_model"] == HUB_BASE and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["Anthropic/hh-rlhf"] and "sft" in meta["tags"]
    assert meta["pipeline_tag"] == "text-generation"
    final = read_metrics(sft_run, "eval")[-1]
    assert final["step"] == 4
    assert "## Final metrics (eval split, step 4)" in text
    assert re.search(rf"\| `loss` \| {final['loss']:.4g} \|", text)
    assert "`builtin:hh-rlhf-harmless` (Anthropic/hh-rlhf, MIT License)" in text
    assert "| `optim.max_steps` | 4 |" in text and "| `sft.packing` | False |" in text
    assert f"chatrl chat --model {sft_run / 'model'}" in text
    whole = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)  # the step's whole config, as YAML
    assert yaml.safe_load(whole)["optim"]["max_steps"] == 4


def test_the_cards_python_snippet_runs_without_chatrl(sft_run: Path) -> None:
    text = (sft_run / "model" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1).replace("max_new_tokens=64", "max_new_tokens=4")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", "import sys\n" + code + "\nassert 'chatrl' not in sys.modules"],
                          capture_output=True, text=True, timeout=300, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_huggingface_hub_parses_the_card(sft_run: Path) -> None:
    hub = pytest.importorskip("huggingface_hub")
    card = hub.ModelCard.load(sft_run / "model" / "README.md")
    assert card.data.base_model == HUB_BASE and card.data.license == "apache-2.0"
    assert card.data.datasets == ["Anthropic/hh-rlhf"] and card.data.library_name == "transformers"


def test_base_models_resolve_to_their_hub_ancestor(tmp_path: Path) -> None:
    assert base_model_of("smollm2-135m-instruct") == BaseModel("smollm2-135m-instruct", HUB_BASE, "apache-2.0")
    assert base_model_of("tiny-random").hub_id is None  # random weights: no hub model to point at
    assert base_model_of("Qwen/Qwen2.5-0.5B-Instruct").hub_id == "Qwen/Qwen2.5-0.5B-Instruct"
    (tmp_path / "README.md").write_text("no front matter here")
    assert base_model_of(str(tmp_path)) == BaseModel(str(tmp_path), None, None)


def test_data_sources_know_shipped_data_and_local_license_files(tmp_path: Path) -> None:
    assert data_source("builtin:gsm8k") == DataSource("builtin:gsm8k", "openai/gsm8k", "MIT License")
    gsm8k_file = data_source(str(Path("data/gsm8k/train.jsonl").resolve()))  # how the math env names it
    assert gsm8k_file.dataset_id == "openai/gsm8k" and gsm8k_file.license == "MIT License"
    (tmp_path / "rows.jsonl").write_text("{}\n")
    assert data_source(str(tmp_path / "rows.jsonl")) == DataSource(str(tmp_path / "rows.jsonl"), None, None)
    (tmp_path / "LICENSE").write_text("\nApache License\nVersion 2.0\n")
    assert data_source(str(tmp_path / "rows.jsonl")).license == "Apache License"


def test_a_reward_model_card_shows_scoring_not_chat() -> None:
    card = ModelCard(folder="runs/x/reward/model", step="reward", role="model", kind="score",
                     base=BaseModel("smollm2-135m-instruct", HUB_BASE, "apache-2.0"),
                     data=[DataSource("my.jsonl")], metrics={"accuracy": 0.625}, metrics_split="eval", metrics_step=80)
    text = render(card)
    meta = front_matter(text)
    assert meta["pipeline_tag"] == "text-classification" and "datasets" not in meta
    assert "AutoModelForSequenceClassification" in text and "chatrl score --model runs/x/reward/model" in text
    assert "chatrl chat" not in text and "| `accuracy` | 0.625 |" in text
    assert "data `my.jsonl`: unknown: check the data set terms" in text
    assert json.dumps("runs/x/reward/model") in text


def test_a_reward_model_card_lists_its_rm_loss_settings(tmp_path: Path) -> None:
    """The reward model's options section is rm_loss (not reward): the card written for it lists those settings."""
    cfg = load_config(RewardConfig, None, ["rm_loss.center_coef=0.025", "rm_loss.use_margin=false"])
    ctx = StepContext(rank=0, world=1, device=torch.device("cpu"), tokenizer=None, bf16=False,
                      weights_dtype=torch.float32, output_dir=tmp_path, model_dir=tmp_path / "model", step="reward",
                      config=cfg)
    text = model_card(ctx, tmp_path / "model", torch.nn.Linear(2, 1))
    assert "| `rm_loss.center_coef` | 0.025 |" in text and "| `rm_loss.use_margin` | False |" in text


@pytest.mark.parametrize("step", sorted(STEPS))
def test_every_steps_card_lists_its_own_options(step: str) -> None:
    """Besides the shared keys, a card lists the step's own options section (sft.*, rm_loss.*, ppo.*, ...): a
    renamed section that the card no longer finds leaves only the shared keys."""
    own = set(key_settings(STEPS[step].config(), step, 1)) - set(_CARD_KEYS) - {"processes"}
    assert own, f"the {step} card lists none of the step's own options"


def test_grpo_actor_card_names_the_environments_data_and_last_iteration(tmp_path: Path, tiny_model_dir: str) -> None:
    """An RL step's card: the data is what the environment reads (math: the shipped GSM8K subset, MIT), the final
    metrics are the last iteration's. The run also reports to mlflow, through the step's own logger."""
    pytest.importorskip("mlflow")
    out = tmp_path / "grpo"
    proc = run_cli("grpo", "--config", "configs/tiny-grpo.yaml", f"output_dir={out}", "env.name=math",
                   "grpo.iterations=1", "checkpoint.every=0", "logging.report_to=[mlflow]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "actor" / "README.md").read_text()
    meta = front_matter(text)
    assert meta["datasets"] == ["openai/gsm8k"] and meta["tags"][:2] == ["chatrl", "grpo"]
    assert "(openai/gsm8k, MIT License)" in text and "| `env.name` | math |" in text
    last = read_metrics(out)[-1]
    assert "## Final metrics (train split, step 1)" in text
    assert f"| `response_length` | {last['response_length']:.4g} |" in text
    assert (out / "mlflow" / "mlflow.db").exists() and not (out / "tensorboard").exists()
