"""Write models as plain Hugging Face folders (safetensors only), atomically; read weights back safely.

A saved folder never needs chatrl: `AutoModelForCausalLM.from_pretrained(out)` (or
`AutoModelForSequenceClassification` for reward models) and `AutoTokenizer.from_pretrained(out)`
load it, with the chat template and pad/eos ids in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from chatrl.errors import ChatrlError
from chatrl.models.lora import (
    is_peft_model,
    lora_scaling,
    merge_lora_for_save,
    merge_lora_state_dict,
    plain_model,
    unwrap,
)

if TYPE_CHECKING:
    from peft import PeftModel

_WRAPPER_PREFIXES = ("module.", "hf_model.")


def save_hf_folder(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike, *, merge_lora: bool = True,
                   state_dict: Optional[Mapping[str, torch.Tensor]] = None, card: str | None = None) -> Path:
    """Save `model` + `tokenizer` to `out_dir` as a plain HF folder, replacing any old folder atomically.

    - DeepSpeed engines / DDP / chatrl wrappers are unwrapped; peft models are merged into a copy
      (merge_lora=False instead writes peft's adapter folder: adapter_config.json +
      adapter_model.safetensors, which needs the base model to load).
    - `state_dict`: a full state dict gathered by the caller (ZeRO-3); keys may carry wrapper
      ("module.") or peft ("base_model.model.", lora_A/B) names, which are merged/normalised.
    - Tied weights (lm_head == embed_tokens) are written once, as transformers expects.
    - `card`: the folder's model card, written as README.md (`chatrl.models.model_card`).
    The folder is built in a temp sibling and renamed into place, so a crash never leaves a half folder.
    """
    out = Path(out_dir)
    inner = unwrap(model)
    peft = is_peft_model(inner)
    if state_dict is not None:
        state_dict = _normalise_state_dict(state_dict, inner if peft else None)
        plain = plain_model(inner)
    elif peft and merge_lora:
        plain = merge_lora_for_save(inner)
    else:
        plain = inner
    _set_special_ids(plain, tokenizer)

    def build(tmp: Path) -> None:
        if peft and not merge_lora and state_dict is None:
            inner.save_pretrained(tmp, safe_serialization=True)
        else:
            sd = _drop_tied(plain, dict(state_dict)) if state_dict is not None else None
            plain.save_pretrained(tmp, state_dict=sd)
        tokenizer.save_pretrained(tmp)
        _ensure_chat_template_file(tmp, tokenizer)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        leftovers = list(tmp.glob("*.bin")) + list(tmp.glob("*.pt"))
        for path in leftovers:  # never ship pickles
            path.unlink()

    replace_dir_atomically(out, build)
    return out


def replace_dir_atomically(out: Path, build) -> None:
    """Run `build(tmp)` in a temp dir next to `out`, then swap it in; on failure `out` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old: Optional[Path] = None
    try:
        build(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "dir")  # move aside first: a crash between the two renames keeps a copy
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old / "dir", out)
            raise
    except (OSError, SafetensorError) as e:  # disk full, permissions: one line, not a traceback
        kept = f"the previous {out} is unchanged" if out.exists() else f"{out} was not created"
        raise ChatrlError(f"could not write {out} ({' '.join(str(e).split())}); {kept}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _set_special_ids(model: torch.nn.Module, tokenizer) -> None:
    """config.pad_token_id and generation_config pad/eos from the tokenizer (eos kept as a list if different)."""
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is None or not model.can_generate():
        return
    gen.pad_token_id = tokenizer.pad_token_id
    eos = gen.eos_token_id
    current = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
    if tokenizer.eos_token_id not in current:
        current = [tokenizer.eos_token_id, *current]
    gen.eos_token_id = current[0] if len(current) == 1 else current


def _normalise_state_dict(state_dict: Mapping[str, torch.Tensor], peft_model: Optional[PeftModel]) -> dict:
    """Strip wrapper prefixes; merge LoRA tensors when the keys are peft's."""
    sd = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        sd[key] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
    if any(".lora_" in k for k in sd):
        if peft_model is None:
            raise ChatrlError("save_hf_folder: the state dict has LoRA tensors but the model is not a peft model")
        sd = merge_lora_state_dict(sd, lora_scaling(peft_model))
    return sd


def _drop_tied(model: torch.nn.Module, sd: dict) -> dict:
    """Remove tied copies (e.g. lm_head.weight tied to embed_tokens) that a gathered state dict holds separately."""
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in sd and source in sd:
            del sd[target]
    return sd


def _ensure_chat_template_file(folder: Path, tokenizer) -> None:
    """Some tokenizer classes keep the template only in memory: write chat_template.jinja if it is missing."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return
    in_config = False
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.exists():
        in_config = bool(json.loads(cfg_path.read_text()).get("chat_template"))
    if not in_config and not (folder / "chat_template.jinja").exists():
        (folder / "chat_template.jinja").write_text(template)


def load_state_dict_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load weights from a .safetensors file, a sharded index, or a folder; never unpickles anything."""
    p = Path(path)
    if p.is_dir():
        index = p / "model.safetensors.index.json"
        if index.exists():
            p = index
        elif (p / "model.safetensors").exists():
            p = p / "model.safetensors"
        else:
            files = sorted(p.glob("*.safetensors"))
            if len(files) != 1:
                raise ChatrlError(f"{path}: expected model.safetensors (or one *.safetensors file) in the folder; "
                                  f"chatrl never loads .bin/.pt pickles")
            p = files[0]
    if p.name.endswith(".index.json"):
        shards = sorted(set(json.loads(p.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(load_file(p.parent / shard))
        return out
    if p.suffix != ".safetensors":
        raise ChatrlError(f"{path}: only .safetensors weights are loaded (pickled .bin/.pt files can run code)")
    if not p.exists():
        raise ChatrlError(f"{path}: no such file")
    return load_file(p)
