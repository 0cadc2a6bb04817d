"""Pickle weights (`pytorch_model.bin`) are refused unless opted in (`model.allow_pickle=true`): every model load
goes through `loading.weights_kwargs`, for local folders and hub ids alike."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from chatrl.config import ModelConfig
from chatrl.errors import ChatrlError
from chatrl.models.loading import load_causal_lm, load_frozen_causal_lm, weights_kwargs
from chatrl.models.reward import load_reward_model
from helpers import REPO, cli_env, run_cli

HUB_ID = "chatrl-test/pickle-only"


@pytest.fixture(scope="module")
def pickle_folder(tiny_model_dir: str, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny random Llama folder with only pickle weights (pytorch_model.bin), and its weights."""
    folder = tmp_path_factory.mktemp("pickle-model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    # transformers 5 no longer writes pickles (`safe_serialization=False` is ignored): write the legacy file
    # that transformers 4 wrote, the state dict pickled by torch.save
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tokenizer.save_pretrained(folder)
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_refusal(message: str, folder: Path, auto_class: str = "AutoModelForCausalLM") -> None:
    assert "\n" not in message
    assert str(folder / "pytorch_model.bin") in message and "model.allow_pickle=true" in message
    assert "safe_serialization=True" in message and auto_class in message


def test_causal_lm_loaders_refuse_pickle_only_folder(pickle_folder):
    folder, _ = pickle_folder
    with pytest.raises(ChatrlError) as err:
        load_causal_lm(ModelConfig(name_or_path=str(folder), dtype="fp32"))
    _assert_refusal(str(err.value), folder)
    with pytest.raises(ChatrlError) as err:  # serve, chat, eval and the PPO reference load through this one
        load_frozen_causal_lm(str(folder), "fp32")
    _assert_refusal(str(err.value), folder)


def test_reward_loader_refuses_pickle_only_folder(pickle_folder):
    folder, _ = pickle_folder
    with pytest.raises(ChatrlError) as err:
        load_reward_model(str(folder), dtype="fp32", trainable=False)
    _assert_refusal(str(err.value), folder, "AutoModelForSequenceClassification")


def test_opt_in_loads_the_pickled_weights(pickle_folder):
    folder, weights = pickle_folder
    model = load_causal_lm(ModelConfig(name_or_path=str(folder), dtype="fp32", allow_pickle=True), trainable=False)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    assert torch.equal(load_frozen_causal_lm(str(folder), "fp32", allow_pickle=True).model.norm.weight,
                       weights["model.norm.weight"])
    rm = load_reward_model(str(folder), dtype="fp32", trainable=False, allow_pickle=True)
    assert torch.equal(rm.model.layers[0].mlp.up_proj.weight, weights["model.layers.0.mlp.up_proj.weight"])


def test_safetensors_win_and_a_bin_next_to_them_is_never_read(pickle_folder, tmp_path):
    folder, weights = pickle_folder
    both = tmp_path / "both"
    shutil.copytree(folder, both)
    LlamaForCausalLM.from_pretrained(folder, use_safetensors=False).save_pretrained(both)  # adds model.safetensors
    (both / "pytorch_model.bin").write_bytes(b"not a pickle: reading this file fails the load")
    model = load_causal_lm(ModelConfig(name_or_path=str(both), dtype="fp32"), trainable=False)
    assert torch.equal(model.model.norm.weight, weights["model.norm.weight"])
    # a config that names a pickle file outright (transformers would load it first) is a pickle-only folder
    config = json.loads((both / "config.json").read_text())
    (both / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    (both / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(ChatrlError, match="allow_pickle"):
        weights_kwargs(str(both), allow_pickle=False)


def test_hub_ids_ask_for_safetensors_only_unless_opted_in():
    assert weights_kwargs(HUB_ID, allow_pickle=False) == {"use_safetensors": True}
    assert weights_kwargs(HUB_ID, allow_pickle=True) == {}


def _fake_hub_cache(cache: Path, folder: Path) -> None:
    """The offline HF cache layout of `HUB_ID` holding `folder`'s files (config, tokenizer, pytorch_model.bin)."""
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


LOAD_FROM_HUB = f"""
import json
from chatrl.config import ModelConfig
from chatrl.errors import ChatrlError
from chatrl.models.loading import load_causal_lm
try:
    load_causal_lm(ModelConfig(name_or_path="{HUB_ID}", dtype="fp32"), trainable=False)
    refused = ""
except ChatrlError as e:
    refused = str(e)
model = load_causal_lm(ModelConfig(name_or_path="{HUB_ID}", dtype="fp32", allow_pickle=True), trainable=False)
print(json.dumps({{"refused": refused, "norm": model.model.norm.weight.tolist()}}))
"""


def test_hub_repo_with_only_pickle_weights_does_not_silently_fall_back(pickle_folder, tmp_path):
    folder, weights = pickle_folder
    _fake_hub_cache(tmp_path / "hub", folder)
    env = cli_env(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", LOAD_FROM_HUB], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "model.safetensors" in result["refused"] and "model.allow_pickle=true" in result["refused"]
    assert result["norm"] == weights["model.norm.weight"].tolist()  # opted in: transformers loads the .bin


def test_chat_cli_refuses_pickle_only_folder(pickle_folder):
    folder, _ = pickle_folder
    out = run_cli("chat", "--model", str(folder), "--dtype", "fp32", timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    error_lines = [line for line in out.stderr.splitlines() if line.startswith("chatrl: error:")]
    assert len(error_lines) == 1
    _assert_refusal(error_lines[0], folder)
    assert "--allow-pickle" in error_lines[0]
    out = subprocess.run([sys.executable, "-m", "chatrl", "chat", "--model", str(folder), "--dtype", "fp32",
                          "--allow-pickle", "--max-new-tokens", "3", "--temperature", "0"], input="Hi\n",
                         cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]  # the opt-in loads the pickle and answers
