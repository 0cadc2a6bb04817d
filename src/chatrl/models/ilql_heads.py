"""ILQL heads on a causal LM's last hidden states, and how they are saved beside its HF folder.

Heads (H = hidden size, V = vocabulary): two Q heads Linear(H, V) (twin Q: the min of the two is the target,
against over-estimation), their slowly following Polyak copies (targets, never trained by the optimizer), and
one V head, a small MLP H -> 2H -> 1 (as trlx's heads: V must tell every state of a reply apart with one output,
while each Q row only sees the states where its token was taken; a linear V learned that far more slowly). Decoding uses the TARGET heads (min of the two) and V, as trlx does: they move slowly,
so guidance does not chase the last update.

On disk, next to a plain HF model folder (which `transformers` keeps loading as it is; it ignores other files):
  ilql_heads.safetensors   q1.*, q2.*, q1_target.*, q2_target.*, v.0.*, v.2.* (fp32)
  ilql_heads.json          {"format": "chatrl-ilql-heads", "version": 1, "hidden_size", "vocab_size", "two_q",
                            "beta"}   (beta: the decoding default the training run chose)
Weights load only from safetensors (never a pickle).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from chatrl.algorithms.ilql import polyak_update
from chatrl.errors import ChatrlError
from chatrl.models.lora import plain_model
from chatrl.paths import atomic_path, atomic_write

WEIGHTS_FILE = "ilql_heads.safetensors"
META_FILE = "ilql_heads.json"
FORMAT = "chatrl-ilql-heads"
VERSION = 1
STEP_BUFFER = "polyak_step"  # training-run state (kept in resumable checkpoints), not saved with the model


class HeadOutputs(NamedTuple):
    """What the heads give for a training batch. q: one [B, T, V] per online Q head; target_q: [B, T] min of the
    target heads at the taken actions (None without actions); v: [B, T]."""

    q: tuple[torch.Tensor, ...]
    target_q: torch.Tensor | None
    v: torch.Tensor


@dataclass
class HeadsMeta:
    """The json beside the weights: shapes and the decoding beta."""

    hidden_size: int
    vocab_size: int
    two_q: bool = True
    beta: float = 1.0

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "hidden_size": self.hidden_size,
                           "vocab_size": self.vocab_size, "two_q": self.two_q, "beta": self.beta}, indent=1)


def _init_linear(layer: nn.Linear, std: float, seed: int) -> None:
    """Normal(0, std) weights from a private generator (the global RNG is untouched), zero bias."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * std)
        layer.bias.zero_()


class ILQLHeads(nn.Module):
    """Q1, Q2 (optional), their targets and V on hidden states [B, T, H]. Always fp32 (hidden states are cast)."""

    def __init__(self, hidden_size: int, vocab_size: int, *, two_q: bool = True, init_std: float = 0.02,
                 seed: int = 0):
        super().__init__()
        self.meta_shape = (hidden_size, vocab_size, two_q)
        self.q1 = nn.Linear(hidden_size, vocab_size)
        self.q2 = nn.Linear(hidden_size, vocab_size) if two_q else None
        self.v = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.ReLU(), nn.Linear(2 * hidden_size, 1))
        # different seeds: twin heads that start equal get equal gradients and would stay equal forever
        for i, layer in enumerate(self.online_q()):
            _init_linear(layer, init_std, seed + i)
        _init_linear(self.v[0], 1.0 / math.sqrt(hidden_size), seed + 7)  # unit-scale features for the ReLU
        _init_linear(self.v[2], init_std, seed + 8)
        self.q1_target = copy.deepcopy(self.q1).requires_grad_(False)
        self.q2_target = copy.deepcopy(self.q2).requires_grad_(False) if self.q2 is not None else None
        self.register_buffer(STEP_BUFFER, torch.zeros((), dtype=torch.long))

    @property
    def hidden_size(self) -> int:
        return self.q1.in_features

    @property
    def vocab_size(self) -> int:
        return self.q1.out_features

    def online_q(self) -> list[nn.Linear]:
        return [h for h in (self.q1, self.q2) if h is not None]

    def target_q(self) -> list[nn.Linear]:
        return [h for h in (self.q1_target, self.q2_target) if h is not None]

    def _cast(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(self.q1.weight.dtype)

    def forward(self, hidden: torch.Tensor, actions: torch.Tensor | None = None) -> HeadOutputs:
        """hidden [B, T, H], actions [B, T] (valid ids) -> HeadOutputs. The target Q is computed only at the
        actions (a gather of weight rows), so no [B, T, V] tensor is built for the target heads."""
        h = self._cast(hidden)
        q = tuple(head(h) for head in self.online_q())
        v = self.v(h).squeeze(-1)
        target = None
        if actions is not None:
            with torch.no_grad():
                picked = [(h * head.weight[actions]).sum(-1) + head.bias[actions] for head in self.target_q()]
                target = torch.stack(picked).amin(0)
        return HeadOutputs(q, target, v)

    @torch.no_grad()
    def guidance(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q [.., V] = min of the target heads, V [..]) for decoding, from hidden [.., H]; fp32."""
        h = self._cast(hidden)
        q = torch.stack([head(h) for head in self.target_q()]).amin(0)
        return q.float(), self.v(h).squeeze(-1).float()

    @torch.no_grad()
    def sync_targets(self, optimizer_steps: int, alpha: float) -> bool:
        """Polyak-update the targets once per optimizer step: call with the optimizer's step count before each
        forward (and before saving). Returns whether an update happened. The count is a buffer, so a resumed run
        (it is in the checkpoint) applies exactly the updates an uninterrupted one would."""
        step = getattr(self, STEP_BUFFER)
        if int(step) == optimizer_steps:
            return False
        for target, online in zip(self.target_q(), self.online_q(), strict=True):
            polyak_update(target.parameters(), online.parameters(), alpha)
        step.fill_(optimizer_steps)
        return True


def heads_for(lm: nn.Module, *, two_q: bool = True, seed: int = 0) -> ILQLHeads:
    """New heads sized for a causal LM (its output embedding: hidden -> vocabulary, tokens added included)."""
    out = lm.get_output_embeddings()
    std = float(getattr(getattr(lm, "config", None), "initializer_range", 0.02))
    return ILQLHeads(out.in_features, out.out_features, two_q=two_q, init_std=std, seed=seed)


# ----------------------------------------------------------------------------- saving / loading


def save_heads(heads: ILQLHeads, folder: str | os.PathLike, *, beta: float) -> None:
    """Write ilql_heads.safetensors + ilql_heads.json into `folder` (each file written then renamed into place)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in heads.state_dict().items() if k != STEP_BUFFER}
    with atomic_path(out / WEIGHTS_FILE) as tmp_weights:
        save_file(state, str(tmp_weights), metadata={"format": FORMAT})
    hidden, vocab, two_q = heads.meta_shape
    atomic_write(out / META_FILE, HeadsMeta(hidden, vocab, two_q, float(beta)).to_json())


def has_heads(folder: str | os.PathLike) -> bool:
    return (Path(folder) / WEIGHTS_FILE).is_file()


def read_meta(folder: str | os.PathLike) -> HeadsMeta:
    """The json beside the heads, checked; a one-line ChatrlError names the file and the field."""
    path = Path(folder) / META_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChatrlError(f"{path}: missing ({WEIGHTS_FILE} needs it: shapes and beta)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatrlError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ChatrlError(f"{path}: field 'format' must be {FORMAT!r}")
    for key in ("hidden_size", "vocab_size"):
        if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool) or raw[key] < 1:
            raise ChatrlError(f"{path}: field '{key}' must be a positive integer, got {raw.get(key)!r}")
    beta = raw.get("beta", 1.0)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise ChatrlError(f"{path}: field 'beta' must be a finite number, got {beta!r}")
    two_q = raw.get("two_q", True)
    if not isinstance(two_q, bool):
        raise ChatrlError(f"{path}: field 'two_q' must be true or false, got {two_q!r}")
    return HeadsMeta(raw["hidden_size"], raw["vocab_size"], two_q, float(beta))


def load_heads(folder: str | os.PathLike) -> tuple[ILQLHeads, HeadsMeta]:
    """Heads saved by `save_heads` (fp32, eval mode). Shapes come from the json and must match the weights."""
    meta = read_meta(folder)
    path = Path(folder) / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ChatrlError(f"{path}: not a readable safetensors file ({e})") from None
    heads = ILQLHeads(meta.hidden_size, meta.vocab_size, two_q=meta.two_q)
    want = {k: v.shape for k, v in heads.state_dict().items() if k != STEP_BUFFER}
    got = {k: v.shape for k, v in state.items()}
    if want != got:
        wrong = sorted(set(want.items()) ^ set(got.items()))[0][0]
        raise ChatrlError(f"{path}: tensor '{wrong}' does not match {META_FILE} (hidden_size {meta.hidden_size}, "
                          f"vocab_size {meta.vocab_size}, two_q {meta.two_q})")
    heads.load_state_dict(state, strict=False)  # strict would ask for the run-state buffer, not saved
    return heads.eval(), meta


def check_fits(heads: ILQLHeads, lm: nn.Module, where: str) -> None:
    """The heads' hidden size and vocabulary must be the LM's (else Q and the logits index different tokens)."""
    out = lm.get_output_embeddings()
    if (heads.hidden_size, heads.vocab_size) != (out.in_features, out.out_features):
        raise ChatrlError(f"{where}: ILQL heads are {heads.hidden_size} -> {heads.vocab_size} but the model's "
                          f"output layer is {out.in_features} -> {out.out_features}; retrain them with chatrl ilql")


# ----------------------------------------------------------------------------- training module


class ILQLForward(NamedTuple):
    """logits [B, T, V] of the LM; q, target_q, v as in `HeadOutputs`."""

    logits: torch.Tensor
    q: tuple[torch.Tensor, ...]
    target_q: torch.Tensor | None
    v: torch.Tensor


class ILQLModel(nn.Module):
    """Causal LM + ILQL heads as ONE module: hand this to deepspeed.initialize, so the engine's forward returns the
    tensors the loss uses. `hf_model` is the attribute `save_hf_folder` / `unwrap` look through, so the saved folder
    holds only the LM (the heads are written beside it by `save_heads`)."""

    def __init__(self, hf_model: nn.Module, heads: ILQLHeads):
        super().__init__()
        self.hf_model = hf_model
        self.heads = heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor | None = None,
                actions: torch.Tensor | None = None) -> ILQLForward:
        """One backbone pass over input_ids/attention_mask [B, T]; the LM head and the ILQL heads read the same last
        hidden states, at `positions` [B, R] only (None = all T): outputs are [B, R(, V)], actions [B, R]."""
        hf = plain_model(self.hf_model)
        backbone = getattr(hf, hf.base_model_prefix)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        if positions is not None:
            hidden = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        logits = hf.get_output_embeddings()(hidden)
        heads = self.heads(hidden, actions)
        return ILQLForward(logits, heads.q, heads.target_q, heads.v)
