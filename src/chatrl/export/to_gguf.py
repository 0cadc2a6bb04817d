"""A chatrl model folder (Llama architecture) -> one GGUF file that llama.cpp and ollama run.

The reverse of the GGUF -> HF conversion chatrl uses for its built-in SmolLM2 (transformers' GGUF loader), with
that loader's own tables read backwards: tensor names from `get_gguf_hf_weights_map` (gguf-py's name map),
hyper-parameters from `GGUF_CONFIG_MAPPING`. Like llama.cpp's convert_hf_to_gguf.py, the Q and K projections
are permuted into llama.cpp's rotary layout (transformers un-permutes them when loading), norms stay fp32, and
the tokenizer goes in as llama.cpp's "gpt2" BPE: tokens, token types, merges, special ids, chat template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.integrations import GGUF_CONFIG_MAPPING
from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

from chatrl.errors import ChatrlError
from chatrl.models.builtin import resolve_model_path
from chatrl.models.model_card import front_matter
from chatrl.models.saving import load_state_dict_safetensors
from chatrl.paths import atomic_path

Dtype = Literal["f32", "f16", "bf16"]
_QTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
           "bf16": gguf.GGMLQuantizationType.BF16}
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "bf16": gguf.LlamaFileType.MOSTLY_BF16}
ARCH = "llama"


def export_gguf(model: str, out: str | os.PathLike, *, dtype: Dtype = "f16", tokenizer_pre: str = "auto") -> Path:
    """Write `model` (a folder or a built-in alias) to the GGUF file `out`, atomically; returns its path."""
    folder = Path(resolve_model_path(model))
    config = _causal_lm_config(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    out = Path(out)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=ARCH)
        _add_general(writer, folder, dtype)
        _add_hparams(writer, config)
        _add_tokenizer(writer, folder, tok, config, tokenizer_pre)
        for name, array, qtype in _tensors(folder, config, dtype):
            writer.add_tensor(name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def _causal_lm_config(folder: Path) -> PretrainedConfig:
    if (folder / "adapter_config.json").exists() and not (folder / "config.json").exists():
        raise ChatrlError(f"{folder} is a LoRA adapter folder; export a merged model (model.lora.merge_on_save=true)")
    config = AutoConfig.from_pretrained(folder)
    archs = config.architectures or []
    if config.model_type != ARCH or not any(a.endswith("ForCausalLM") for a in archs):
        raise ChatrlError(f"{folder}: GGUF export supports Llama-architecture chat models (LlamaForCausalLM, "
                          f"e.g. SmolLM2); this one is {', '.join(archs) or config.model_type}")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ChatrlError(f"{folder}: rope scaling {rope.get('rope_type')!r} is not exported (only default RoPE)")
    return config


def _add_general(writer: gguf.GGUFWriter, folder: Path, dtype: Dtype) -> None:
    writer.add_type("model")
    writer.add_name(folder.name if folder.name not in ("model", "actor") else f"{folder.parent.name}-{folder.name}")
    writer.add_file_type(_FILE_TYPES[dtype])
    card = folder / "README.md"
    license_id = front_matter(card.read_text()).get("license") if card.exists() else None
    if license_id:
        writer.add_license(str(license_id))


def _add_hparams(writer: gguf.GGUFWriter, config: PretrainedConfig) -> None:
    """`llama.*` keys: transformers' GGUF -> config table read backwards (gguf key <- config attribute)."""
    rope = getattr(config, "rope_parameters", None) or {}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for key, attr in GGUF_CONFIG_MAPPING[ARCH].items():
        value = head_dim if attr == "head_dim" else getattr(config, attr, None)
        value = rope.get(attr) if value is None else value
        if value is None:
            raise ChatrlError(f"the model config has no {attr} (needed for GGUF key {ARCH}.{key})")
        if isinstance(value, float):
            writer.add_float32(f"{ARCH}.{key}", value)
        else:
            writer.add_uint32(f"{ARCH}.{key}", int(value))
    if head_dim != config.hidden_size // config.num_attention_heads:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _add_tokenizer(writer: gguf.GGUFWriter, folder: Path, tok, config: PretrainedConfig, pre: str) -> None:
    """llama.cpp's "gpt2" BPE vocabulary, as convert_hf_to_gguf.py writes it (token types: added special tokens
    are CONTROL, other added tokens USER_DEFINED, ids past the tokenizer's vocabulary UNUSED padding)."""
    vocab = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(config.vocab_size):
        if i not in vocab:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(vocab[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(folder) if pre == "auto" else pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=config.vocab_size)  # merges, ids, chat template
    if not special.merges:
        raise ChatrlError(f"{folder}: the tokenizer has no BPE merges (GGUF export needs a byte-level BPE tokenizer)")
    probe = tok("a")["input_ids"]  # what the HF tokenizer adds by itself, so llama.cpp tokenizes the same
    special.add_special_token["bos"] = bool(probe) and probe[0] == tok.bos_token_id
    special.add_special_token["eos"] = bool(probe) and probe[-1] == tok.eos_token_id
    if special.chat_template is None and isinstance(tok.chat_template, str):
        special.chat_template = tok.chat_template  # kept in chat_template.jinja, which gguf-py may not read
    special.add_to_gguf(writer, quiet=True)


def _pre_tokenizer(folder: Path) -> str:
    """llama.cpp's name for the tokenizer's split rule, read from tokenizer.json: byte-level BPE with GPT-2's
    regex ("gpt-2"), or the same after splitting every digit ("smollm", as the original SmolLM2)."""
    pre = json.loads((folder / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex")) for s in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    raise ChatrlError(f"{folder}: cannot tell llama.cpp's pre-tokenizer for {json.dumps(pre)[:200]}; "
                      f"name it with --tokenizer-pre (llama.cpp's name, e.g. gpt-2, llama-bpe, qwen2)")


def _tensors(folder: Path, config: PretrainedConfig, dtype: Dtype):
    """(gguf name, array, type) for every weight, in the HF folder's order; tied output weights are left out
    (llama.cpp then uses token_embd, as for the original SmolLM2 GGUF)."""
    with torch.device("meta"):  # the module tree only: names for the map, no memory
        skeleton = AutoModelForCausalLM.from_config(config)
    hf_to_gguf = {hf: g for g, hf in get_gguf_hf_weights_map(skeleton, TensorProcessor()).items()}
    state = load_state_dict_safetensors(folder)
    for hf_name, weight in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = hf_to_gguf.get(hf_name)
        if name is None:
            raise ChatrlError(f"{folder}: no GGUF name for weight {hf_name}")
        array = weight.float().numpy()
        if name.endswith("attn_q.weight"):
            array = permute_qk(array, config.num_attention_heads, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            array = permute_qk(array, config.num_attention_heads, config.num_key_value_heads)
        qtype = _QTYPES[dtype] if array.ndim > 1 else gguf.GGMLQuantizationType.F32  # norms stay fp32
        yield name, gguf.quants.quantize(array, qtype), qtype


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's rotary layout of a Q/K projection (convert_hf_to_gguf.py's LlamaModel.permute): per head,
    HF's [first half, second half] rotary pairing becomes interleaved pairs."""
    heads = n_head_kv if n_head_kv != n_head else n_head
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
