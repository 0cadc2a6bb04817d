"""Model/tokenizer loading: dtype resolution, the pad-token rule, fallback chat template, errors."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import pytest
import torch

from chatrl.config import ModelConfig
from chatrl.errors import ChatrlError
from chatrl.models import loading
from chatrl.models.loading import (
    FALLBACK_CHAT_TEMPLATE,
    NEW_PAD_TOKEN,
    ensure_pad_token,
    load_causal_lm,
    load_frozen_causal_lm,
    load_tokenizer,
    resolve_dtype,
)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_resolve_dtype_names(monkeypatch):
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("fp32") is torch.float32
    assert resolve_dtype(torch.float16) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "_cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto") is torch.bfloat16
    monkeypatch.setattr(loading, "_cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto") is torch.float32
    with pytest.raises(ChatrlError, match="model.dtype"):
        resolve_dtype("fp8")


def test_chatrl_auto_dtype_decides_what_auto_means(monkeypatch):
    """CHATRL_AUTO_DTYPE=fp32 makes every 'auto' fp32 on a bf16 machine (how bench/demos.py --dtype fp32 runs an
    AVX2 machine's recipe there); explicit dtypes are untouched; a wrong value is refused, naming the variable."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "_cpu_has_native_bf16", lambda: True)
    monkeypatch.setenv("CHATRL_AUTO_DTYPE", "fp32")
    assert resolve_dtype("auto") is torch.float32 and resolve_dtype("bf16") is torch.bfloat16
    monkeypatch.setattr(loading, "_cpu_has_native_bf16", lambda: False)
    monkeypatch.setenv("CHATRL_AUTO_DTYPE", "bf16")
    assert resolve_dtype("auto") is torch.bfloat16
    monkeypatch.setenv("CHATRL_AUTO_DTYPE", "fp16")
    with pytest.raises(ChatrlError, match="CHATRL_AUTO_DTYPE"):
        resolve_dtype("auto")


@pytest.mark.parametrize(("caps", "native"), [
    ({"avx2": True, "avx512f": True, "avx512_bf16": False, "amx_bf16": False}, False),  # AVX-512 without bf16
    ({"avx2": True, "avx512_bf16": True}, True),   # Cooper Lake / Zen 4
    ({"avx2": True, "amx_bf16": True}, True),      # Sapphire Rapids AMX
    ({"asimd": True, "bf16": True}, True),         # ARMv8.6 BF16
    ({"asimd": True, "sve": True, "sve_bf16": True}, True),
    ({"asimd": True, "sve": True}, False),
])
def test_cpu_bf16_detection_reads_the_bf16_flags(monkeypatch, caps, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert loading._cpu_has_native_bf16() is native


def test_cpu_bf16_detection_agrees_with_the_kernels_cpu_flags():
    """An independent source: on x86 Linux the kernel lists avx512_bf16 / amx_bf16 in /proc/cpuinfo."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() not in ("x86_64", "AMD64") or not cpuinfo.exists():
        pytest.skip("needs x86 Linux's /proc/cpuinfo")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    assert loading._cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_pad_token_rule_uses_unk_for_smollm2_tokenizer(tok):
    # SmolLM2 ships pad == eos == <|im_end|>; the rule swaps in unk <|endoftext|>.
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token == tok.unk_token == "<|endoftext|>"
    assert tok.padding_side == "right"
    assert "<|im_start|>" in tok.chat_template  # the real template is kept, not the fallback


def test_pad_token_rule_adds_token_without_unk_and_model_grows(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    old_len = len(tok)
    tok.pad_token = tok.eos_token
    tok.unk_token = None
    assert ensure_pad_token(tok) is True
    assert tok.pad_token == NEW_PAD_TOKEN and tok.pad_token_id == old_len and len(tok) == old_len + 1
    model = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir, dtype="fp32"), tokenizer=tok)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == old_len + 1
    torch.testing.assert_close(emb[-1], emb[:-1].mean(0))
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # still tied
    assert model.config.pad_token_id == old_len


def test_existing_distinct_pad_token_is_kept(tok):
    assert ensure_pad_token(tok) is False
    assert tok.pad_token == "<|endoftext|>"


def test_fallback_chat_template_when_missing(tiny_model_dir, tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    tok = load_tokenizer(str(folder))
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    full = tok.apply_chat_template(msgs, tokenize=False)
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert full == "Human: Hi\n\nAssistant: Hello<|im_end|>\n\n"
    assert prompt == "Human: Hi\n\nAssistant:"
    assert full.startswith(prompt)


def test_missing_local_folder_is_a_user_error(tmp_path):
    with pytest.raises(ChatrlError, match="does not exist.*model.name_or_path"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ChatrlError, match="not a Hugging Face model folder"):
        load_causal_lm(ModelConfig(name_or_path=str(tmp_path)))


def test_unreachable_hub_id_is_a_user_error():
    with pytest.raises(ChatrlError, match="local Hugging Face folder"):
        load_tokenizer("nobody-chatrl/does-not-exist-anywhere")


def test_load_causal_lm_trainable_with_checkpointing(tiny_model_dir, tok):
    cfg = ModelConfig(name_or_path=tiny_model_dir, dtype="fp32", gradient_checkpointing=True)
    model = load_causal_lm(cfg, tokenizer=tok)
    assert model.dtype == torch.float32 and model.training
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.get_input_embeddings().padding_idx == tok.pad_token_id
    assert all(p.requires_grad for p in model.parameters())
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_load_causal_lm_bf16_from_config_default(tiny_model_dir, tok):
    model = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir, dtype="bf16"), tokenizer=tok)
    assert model.dtype == torch.bfloat16


def test_frozen_model(tiny_model_dir, tok):
    model = load_frozen_causal_lm(tiny_model_dir, "fp32", tokenizer=tok)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_smollm2_answers_capital_of_france():
    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_causal_lm(ModelConfig(name_or_path="smollm2-135m-instruct"), tokenizer=tok, trainable=False)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_token_id)
    reply = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply
