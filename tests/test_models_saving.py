"""Saving plain HF folders: reload without chatrl, tied weights, LoRA merge, atomic replace, safetensors only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chatrl.config import LoraConfig, ModelConfig
from chatrl.errors import ChatrlError
from chatrl.models.loading import load_causal_lm, load_tokenizer
from chatrl.models.saving import load_state_dict_safetensors, save_hf_folder

IDS = torch.tensor([[1, 17, 300, 4000, 2, 0, 0], [1, 9, 99, 999, 9999, 77, 2]])
MASK = (IDS != 0).long()

# Runs in a fresh interpreter that never imports chatrl: the folder must be plain transformers.
RELOAD_SCRIPT = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, io_path = sys.argv[1], sys.argv[2]
inp = load_file(io_path)
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
with torch.no_grad():
    logits = model(input_ids=inp["ids"], attention_mask=inp["mask"]).logits
tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
assert "chatrl" not in sys.modules
save_file({"logits": logits.contiguous(), "tied": torch.tensor([tied]), "pad": torch.tensor([tok.pad_token_id]),
           "text_len": torch.tensor([len(text)])}, io_path)
print(text)
"""


class FakeEngine(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


def reload_in_subprocess(folder: Path, tmp_path: Path) -> dict:
    io_path = tmp_path / "io.safetensors"
    save_file({"ids": IDS, "mask": MASK}, io_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(folder), str(io_path)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = load_file(io_path)
    out["text"] = proc.stdout
    return out


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits.float()


def test_save_reload_without_chatrl_identical_logits(tiny_model_dir, tok, tmp_path):
    model = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir, dtype="fp32"), tokenizer=tok).eval()
    out = save_hf_folder(model, tok, tmp_path / "final")
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "generation_config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    with safe_open(out / "model.safetensors", "pt") as f:  # tied lm_head is stored once
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    config = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert config["pad_token_id"] == tok.pad_token_id == gen["pad_token_id"]
    assert gen["eos_token_id"] == tok.eos_token_id or tok.eos_token_id in gen["eos_token_id"]
    got = reload_in_subprocess(out, tmp_path)
    assert torch.equal(got["logits"], _logits(model))
    assert bool(got["tied"][0]) and int(got["pad"][0]) == tok.pad_token_id
    assert "<|im_start|>assistant" in got["text"]  # chat template travelled with the folder
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".final")]  # no temp dirs left


def test_lora_merge_on_save_gives_plain_folder(tiny_model_dir, tok, tmp_path):
    cfg = ModelConfig(name_or_path=tiny_model_dir, dtype="fp32", lora=LoraConfig(r=4, alpha=8))
    model = load_causal_lm(cfg, tokenizer=tok).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = save_hf_folder(model, tok, tmp_path / "lora-final")
    assert not (out / "adapter_config.json").exists()
    assert not any("lora" in k for k in load_state_dict_safetensors(out))
    got = reload_in_subprocess(out, tmp_path)
    torch.testing.assert_close(got["logits"], _logits(model), rtol=1e-4, atol=1e-4)


def test_lora_without_merge_writes_adapter_folder(tiny_model_dir, tok, tmp_path):
    cfg = ModelConfig(name_or_path=tiny_model_dir, dtype="fp32", lora=LoraConfig(r=2, alpha=4))
    model = load_causal_lm(cfg, tokenizer=tok)
    out = save_hf_folder(model, tok, tmp_path / "adapter", merge_lora=False)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert all("lora_" in k for k in load_state_dict_safetensors(out / "adapter_model.safetensors"))


def test_explicit_state_dict_with_wrapper_prefix_and_untied_copy(tiny_model_dir, tok, tmp_path):
    """What a ZeRO-3 caller passes: gathered tensors named after the engine's module, lm_head as a separate copy."""
    model = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir, dtype="fp32"), tokenizer=tok).eval()
    gathered = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        gathered["module.model.norm.weight"] += 0.5  # proves the given dict, not the model, is written
    engine = FakeEngine(model)  # unwrapped through `.module` like a DeepSpeed engine
    out = save_hf_folder(engine, tok, tmp_path / "z3", state_dict=gathered)
    sd = load_state_dict_safetensors(out)
    assert "lm_head.weight" not in sd
    torch.testing.assert_close(sd["model.norm.weight"], model.model.norm.weight + 0.5)


def test_explicit_lora_state_dict_is_merged(tiny_model_dir, tok, tmp_path):
    cfg = ModelConfig(name_or_path=tiny_model_dir, dtype="fp32", lora=LoraConfig(r=4, alpha=8))
    model = load_causal_lm(cfg, tokenizer=tok).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = save_hf_folder(model, tok, tmp_path / "z3-lora", state_dict=model.state_dict())
    got = reload_in_subprocess(out, tmp_path)
    torch.testing.assert_close(got["logits"], _logits(model), rtol=1e-4, atol=1e-4)


def test_failed_save_leaves_old_folder_intact(tiny_model_dir, tok, tmp_path, monkeypatch):
    model = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir, dtype="fp32"), tokenizer=tok).eval()
    out = save_hf_folder(model, tok, tmp_path / "final")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_save(self, folder, *args, **kwargs):
        (Path(folder) / "tokenizer.json").write_text("half-written")
        raise OSError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", broken_save)
    with torch.no_grad():
        model.model.norm.weight += 1.0
    with pytest.raises(ChatrlError, match=r"could not write .*disk full.*the previous .* is unchanged"):
        save_hf_folder(model, tok, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".final")] == []


def test_load_state_dict_safetensors_only(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    assert torch.equal(load_state_dict_safetensors(tmp_path)["a"], torch.ones(2))
    torch.save({"a": torch.ones(2)}, tmp_path / "weights.bin")
    with pytest.raises(ChatrlError, match="safetensors"):
        load_state_dict_safetensors(tmp_path / "weights.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ChatrlError, match="never loads"):
        load_state_dict_safetensors(empty)


def test_sharded_index_is_followed(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    sd = load_state_dict_safetensors(tmp_path)
    assert set(sd) == {"a", "b"} and sd["b"].shape == (3,)
