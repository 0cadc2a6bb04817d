"""Load tokenizers and causal LMs offline: built-in alias, local HF folder, or (if cached) a hub id.

The pad-token rule (see `ensure_pad_token`) matters for every step: the pad token must exist and
differ from EOS, so that "last non-pad token" (HF's sequence-classification pooling) and "last
position where attention_mask == 1" (our reward rule) always point at the same real token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from chatrl.config import LoraConfig, ModelConfig
from chatrl.errors import ChatrlError
from chatrl.models.builtin import ALIASES, resolve_model_path
from chatrl.models.lora import apply_lora

NEW_PAD_TOKEN = "<|pad|>"

# Used when a tokenizer has no chat template (base models); the data pipeline renders with it too
# (data/templates.py). Renders DeepSpeed-Chat's
# "Human: ... Assistant: ..." format. The generation prompt is "Assistant:" and an assistant turn
# renders as "Assistant: <content><eos>", so a rendered prompt is always a text prefix of the
# rendered conversation and the reply naturally starts with a space-prefixed word token.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


# ============================================================================ dtype


def _cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 arithmetic instructions (x86 AVX512-BF16 / AMX-BF16, ARM BF16)."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if caps:
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16") or caps.get("bf16") or caps.get("sve_bf16"))
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map "bf16" / "fp32" / "auto" to a torch dtype.

    auto = bf16 when the accelerator (CUDA) or, without one, the CPU has native bf16 support;
    otherwise fp32 (emulated bf16 on an old CPU is slower than fp32 and no more accurate).
    The environment variable CHATRL_AUTO_DTYPE=fp32|bf16 decides what auto means for a whole run (every step,
    model and eval), e.g. to run on a bf16 machine what an AVX2 machine runs (`bench/demos.py --dtype fp32`).
    """
    if isinstance(name, torch.dtype):
        return name
    key = name.lower()
    if key == "auto" and os.environ.get("CHATRL_AUTO_DTYPE"):
        key = os.environ["CHATRL_AUTO_DTYPE"].lower()
        if key not in ("bf16", "fp32"):
            raise ChatrlError(f"CHATRL_AUTO_DTYPE={key!r}: use bf16 or fp32 (or unset it: auto)")
    if key in ("bf16", "bfloat16"):
        return torch.bfloat16
    if key in ("fp32", "float32"):
        return torch.float32
    if key == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    raise ChatrlError(f"model.dtype={name!r}: use one of auto, bf16, fp32")


# ============================================================================ paths


def resolve_model_source(name_or_path: str) -> str:
    """Resolve an alias / local folder / hub id to what `from_pretrained` takes; fail early on a missing folder."""
    resolved = resolve_model_path(name_or_path)
    expanded = os.path.expanduser(resolved)
    if os.path.isdir(expanded):
        if not (Path(expanded) / "config.json").exists() and not (Path(expanded) / "tokenizer_config.json").exists():
            raise ChatrlError(f"{expanded} is a folder but not a Hugging Face model folder (no config.json). "
                              f"{_HOW_TO_POINT}")
        return expanded
    if os.path.isabs(expanded) or resolved.startswith((".", "~")) or os.path.exists(expanded):
        raise ChatrlError(f"model folder {resolved!r} does not exist. {_HOW_TO_POINT}")
    return resolved  # a hub id: only works if it is already in the local HF cache (we run offline)


_HOW_TO_POINT = (f"Set model.name_or_path to a local Hugging Face folder (with config.json, *.safetensors and the "
                 f"tokenizer files), or to a built-in alias ({', '.join(ALIASES)}).")


def _hub_error(source: str, err: Exception, weights: dict[str, Any] | None = None) -> ChatrlError:
    """`weights`: the `weights_kwargs` of a model load, so a hub repo with only pickle weights is explained."""
    pickle_hint = (" chatrl loads only safetensors weights: for a hub repo with only pytorch_model.bin, opt in with "
                   "model.allow_pickle=true if you trust it."
                   if (weights or {}).get("use_safetensors") and not os.path.isdir(source) else "")
    return ChatrlError(f"could not load {source!r}: it is not a local folder and the Hugging Face hub is not "
                       f"reachable or does not have it cached ({type(err).__name__}: {str(err)[:300]}). "
                       f"{_HOW_TO_POINT}{pickle_hint}")


# ============================================================================ weights: safetensors, or pickle by opt-in

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".bin.index.json")


def weights_kwargs(source: str, allow_pickle: bool = False,
                   auto_class: str = "AutoModelForCausalLM") -> dict[str, Any]:
    """The one check every model load goes through: `from_pretrained` kwargs that keep pickle weights out.

    Unpickling a `pytorch_model.bin` can run arbitrary code, and transformers falls back to it silently when a
    folder or hub repo has no safetensors. Without `allow_pickle`: a local folder whose weights are only pickle
    files is refused (ChatrlError naming the file, the opt-in and the conversion), and every load passes
    `use_safetensors=True` so transformers never reaches a .bin (hub ids included). With it: transformers'
    default order (safetensors first), or `use_safetensors=False` when a local folder has only pickles.
    """
    if not os.path.isdir(source):  # a hub id
        return {} if allow_pickle else {"use_safetensors": True}
    folder = Path(source)
    pickles = _pickle_weights(folder)
    if any((folder / name).is_file() for name in SAFE_WEIGHTS) and not _explicit_pickle(folder):
        return {} if allow_pickle else {"use_safetensors": True}
    if not pickles:
        return {"use_safetensors": True}  # no weights at all: transformers says which file it looked for
    if allow_pickle:
        return {"use_safetensors": False}
    raise ChatrlError(
        f"{folder / pickles[0]}: this model folder has only pickle weights ({', '.join(pickles[:3])}), and loading "
        f"a pickle can run arbitrary code, so chatrl loads only safetensors. If you trust the file, opt in with "
        f"model.allow_pickle=true (chatrl chat/serve: --allow-pickle); or convert the folder once: python -c \"from transformers import {auto_class} "
        f"as M; M.from_pretrained('{folder}', use_safetensors=False).save_pretrained('{folder}', "
        f"safe_serialization=True)\"")


def _pickle_weights(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))


def _explicit_pickle(folder: Path) -> bool:
    """config.json's `transformers_weights` names the weights file outright (it wins over model.safetensors)."""
    try:
        named = json.loads((folder / "config.json").read_text()).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(named, str) and not named.endswith((".safetensors", ".safetensors.index.json"))


# ============================================================================ tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Make the pad token exist and differ from EOS; return True when a new token was added.

    Rule: keep an existing pad token that is not EOS; else use the unk token if it exists and is not
    EOS (SmolLM2: `<|endoftext|>`); else add the special token `<|pad|>` (the model's embeddings
    must then grow to `len(tokenizer)`, which `load_causal_lm` / `load_reward_model` do).
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is not None and pad != eos:
        return False
    unk = tokenizer.unk_token_id
    if tokenizer.unk_token is not None and unk is not None and unk != eos:
        tokenizer.pad_token = tokenizer.unk_token
        return False
    tokenizer.add_special_tokens({"pad_token": NEW_PAD_TOKEN})
    return True


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer (right padding, pad token != EOS, a chat template always present)."""
    source = resolve_model_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, padding_side="right")
    except (OSError, ValueError) as err:
        raise _hub_error(source, err) from err
    if tokenizer.eos_token is None:
        raise ChatrlError(f"the tokenizer of {source!r} has no EOS token; chatrl needs one to end replies. "
                          f"Add \"eos_token\" to its tokenizer_config.json.")
    tokenizer.padding_side = "right"
    ensure_pad_token(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def check_same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, field: str,
                         path: str) -> None:
    """Distillation compares the two models' log-probs of the same token ids: a teacher whose tokenizer maps any
    string to other ids (vocabulary, special tokens) would score different tokens. One-line ChatrlError if so."""
    if len(student) != len(teacher):
        raise ChatrlError(f"{field}={path}: its tokenizer has {len(teacher)} tokens, the actor's {len(student)}; "
                          "the teacher must use the actor's tokenizer")
    vocab, other = student.get_vocab(), teacher.get_vocab()
    differ = sorted(t for t in vocab.keys() | other.keys() if vocab.get(t) != other.get(t))
    specials = [k for k in ("eos_token_id", "bos_token_id", "pad_token_id")
                if getattr(student, k) != getattr(teacher, k)]
    if differ or specials:
        what = f"{len(differ)} token ids (e.g. {differ[0]!r})" if differ else ", ".join(specials)
        raise ChatrlError(f"{field}={path}: its tokenizer differs from the actor's in {what}; the teacher must use "
                          "the actor's tokenizer")


# ============================================================================ models


def load_model_config(source: str, tokenizer: PreTrainedTokenizerBase, **overrides) -> PretrainedConfig:
    """The model config with pad_token_id set to the tokenizer's (so embeddings get the right padding_idx)."""
    try:
        config = AutoConfig.from_pretrained(source, **overrides)
    except (OSError, ValueError) as err:
        raise _hub_error(source, err) from err
    # a freshly added <|pad|> is beyond the checkpoint's vocab: set it after `fit_embeddings` grew it.
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    pad = tokenizer.pad_token_id
    config.pad_token_id = pad if vocab is None or pad < vocab else None
    return config


def fit_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings when the tokenizer has more tokens than the model (e.g. a new `<|pad|>`).

    New rows are set to the mean of the old rows (deterministic, no RNG), tied output heads follow.
    """
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:
        return
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}.values():
            emb.weight[old:] = emb.weight[:old].mean(dim=0, keepdim=True)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id >= old:
        model.get_input_embeddings().padding_idx = tokenizer.pad_token_id  # no gradient into the pad row


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in backward; non-reentrant so frozen inputs (LoRA) still get gradients."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:  # transformers < 5 name
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients: for reference / frozen reward models."""
    model.eval()
    model.requires_grad_(False)
    return model


def freeze_lower_layers(model: PreTrainedModel, top: int) -> None:
    """Train only the top `top` decoder blocks, the final norm and the head(s): the input embeddings and the
    lower blocks get requires_grad=False, so backward stops at the lowest trainable block. With tied embeddings
    (e.g. SmolLM2) a causal LM's output head is the embedding matrix and stays frozen too."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ChatrlError(f"model.trainable_layers: {type(model).__name__} has no `model.layers` block list")
    if top > len(layers):
        raise ChatrlError(f"model.trainable_layers={top}: the model has only {len(layers)} blocks")
    model.get_input_embeddings().requires_grad_(False)
    for block in layers[: len(layers) - top]:
        block.requires_grad_(False)


def prepare_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, gradient_checkpointing: bool,
                  lora: Optional[LoraConfig], trainable: bool, keep_trainable: tuple[str, ...] = (),
                  trainable_layers: Optional[int] = None):
    """Shared tail of causal-LM / reward-model loading: embeddings, checkpointing, LoRA or frozen lower blocks,
    train/eval mode."""
    fit_embeddings(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if not trainable:
        return freeze(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if trainable_layers is not None:
        freeze_lower_layers(model, trainable_layers)
    if lora is not None and lora.r > 0:

        model = apply_lora(model, lora, keep_trainable=keep_trainable)
    model.train()
    return model


def load_causal_lm(cfg: ModelConfig, *, dtype: torch.dtype | None = None, tokenizer=None,
                   trainable: bool = True) -> PreTrainedModel:
    """Load the causal LM of `cfg.name_or_path` ready to train (or frozen when trainable=False).

    dtype defaults to `resolve_dtype(cfg.dtype)`; pass the tokenizer you will use (from
    `load_tokenizer`) so the pad id and vocabulary size agree. LoRA is applied when cfg.lora.r > 0
    (the result is then a peft model); never when trainable=False.
    """
    source = resolve_model_source(cfg.name_or_path)
    weights = weights_kwargs(source, cfg.allow_pickle)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.name_or_path)
    dtype = dtype if dtype is not None else resolve_dtype(cfg.dtype)
    config = load_model_config(source, tokenizer)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, **weights)
    except (OSError, ValueError) as err:
        raise _hub_error(source, err, weights) from err
    return prepare_model(model, tokenizer, gradient_checkpointing=cfg.gradient_checkpointing,
                         lora=cfg.lora, trainable=trainable, trainable_layers=cfg.trainable_layers)


def last_positions(seq_len: int, keep: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`logits_to_keep` for transformers models as an index tensor of the last `keep` positions.
    Why not the int: transformers then slices the hidden states into a NON-contiguous view, and torch's CPU linear
    runs that through a bmm that copies the whole LM-head weight once per row (measured: 1.4 s instead of 0.1 s
    for 32 x 33 rows of SmolLM2's 49k-vocabulary head; 3.9 s for the last token of 64 prompts). An index tensor
    gathers a contiguous copy; the logits are bit-identical."""
    return torch.arange(max(seq_len - keep, 0), seq_len, device=device)


def load_frozen_causal_lm(name_or_path: str, dtype: torch.dtype | str = "auto", tokenizer=None,
                          allow_pickle: bool = False) -> PreTrainedModel:
    """A frozen (eval, requires_grad False) causal LM, e.g. the PPO reference model (pickle weights refused unless
    `allow_pickle`, see `weights_kwargs`)."""
    cfg = ModelConfig(name_or_path=name_or_path, allow_pickle=allow_pickle)
    return load_causal_lm(cfg, dtype=resolve_dtype(dtype), tokenizer=tokenizer, trainable=False)
