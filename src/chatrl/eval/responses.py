"""Model adapters for evaluation: load, format prompts, generate, token log-probs, reward scores.

Everything that touches a model lives here, so evaluation can later switch to the shared helpers
(`chatrl.models.loading`, `chatrl.models.reward.sequence_scores`, the fast engine) by editing this one file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from chatrl.data.types import Message
from chatrl.errors import ChatrlError


@dataclass
class Generation:
    """Responses to a list of prompts; `response_ids` end with the EOS token when the model emitted one."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    ended_with_eos: list[bool]

    @property
    def lengths(self) -> list[int]:
        """Response length in tokens, not counting the closing EOS."""
        return [len(r) - int(e) for r, e in zip(self.response_ids, self.ended_with_eos, strict=True)]


def _resolve(path: str) -> str:
    from chatrl.models.builtin import resolve_model_path

    return resolve_model_path(path)


def load_policy(path: str, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer (aliases like `tiny-random` allowed); returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _resolve(path)
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ChatrlError(f"could not load model {path!r}: {e}\nPass a Hugging Face model folder (with config.json "
                          "and tokenizer files) or a built-in alias such as 'tiny-random'.") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # generation pads on the left and masks padding, so eos is a safe pad
    return model.eval(), tok


def load_reward(path: str, dtype: torch.dtype = torch.float32):
    """Load a reward model (sequence classifier, one label) and its tokenizer; returns (model, tokenizer)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = _resolve(path)
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ChatrlError(f"could not load reward model {path!r}: {e}\nPass the folder written by `chatrl reward`.") \
            from e
    # The score is read at the last token that is not padding, so the pad token must differ from eos.
    pad = model.config.pad_token_id
    if pad is None or pad == tok.eos_token_id:
        if tok.unk_token_id is None or tok.unk_token_id == tok.eos_token_id:
            raise ChatrlError(f"reward model {path!r}: config.pad_token_id must be set to a token other than eos")
        model.config.pad_token_id = tok.unk_token_id
    return model.eval(), tok


def render(tok, messages: Sequence[Message], reply: str | None = None) -> str:
    """Prompt text (ending where the assistant starts) or, with `reply`, the full conversation text.

    Uses the tokenizer's chat template; tokenizers without one get the hh-rlhf "Human:/Assistant:" format.
    """
    msgs = list(messages) + ([{"role": "assistant", "content": reply}] if reply is not None else [])
    if tok.chat_template:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=reply is None)
    text = "".join(f"\n\n{'Human' if m['role'] != 'assistant' else 'Assistant'}: {m['content']}" for m in msgs)
    return text if reply is not None else text + "\n\nAssistant:"


def encode_prompts(tok, prompts: Sequence[Sequence[Message]], max_tokens: int) -> list[list[int]]:
    """Token ids of each rendered prompt, keeping the last `max_tokens` (the end carries the question)."""
    return [tok(render(tok, m), add_special_tokens=False)["input_ids"][-max_tokens:] for m in prompts]


def _eos_ids(model, tok) -> list[int]:
    ids = {tok.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


@torch.inference_mode()
def generate(model, tok, prompts: Sequence[Sequence[Message]], *, max_new_tokens: int, greedy: bool = True,
             temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8, seed: int = 0) -> Generation:
    """Generate one response per prompt with `model.generate` (left-padded batches; B x (P + N) outputs)."""
    from transformers import GenerationConfig

    max_pos = getattr(model.config, "max_position_embeddings", 2048)
    prompt_ids = encode_prompts(tok, prompts, max(1, max_pos - max_new_tokens))
    eos = _eos_ids(model, tok)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, eos_token_id=eos,
                              pad_token_id=tok.pad_token_id,
                              **({} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}))
    torch.manual_seed(seed)
    responses: list[list[int]] = []
    ended: list[bool] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), None)
            responses.append(row if cut is None else row[:cut + 1])
            ended.append(cut is not None)
    texts = [tok.decode(r[:len(r) - int(e)], skip_special_tokens=True).strip() for r, e in zip(responses, ended, strict=True)]
    return Generation(prompt_ids, responses, texts, ended)


@torch.inference_mode()
def response_logprobs(model, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]],
                      pad_id: int, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each response token given its prompt.

    Returns (logp, mask), both B x R (R = longest response), mask 1 on real response tokens.
    Rows are right-padded, so positions need no correction.
    """
    width_r = max((len(r) for r in response_ids), default=0)
    logp = torch.zeros(len(response_ids), max(width_r, 1))
    mask = torch.zeros_like(logp)
    for start in range(0, len(prompt_ids), batch_size):
        rows = [list(p) + list(r) for p, r in zip(prompt_ids[start:start + batch_size],
                                                  response_ids[start:start + batch_size], strict=True)]
        width = max(len(x) for x in rows)
        ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in rows])
        attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in rows])
        logits = model(input_ids=ids, attention_mask=attn).logits.float()  # B x T x V
        for j in range(len(rows)):
            b = start + j
            p_len, r_len = len(prompt_ids[b]), len(response_ids[b])
            if r_len == 0:
                continue
            # logits at position t predict token t + 1
            step_logits = logits[j, p_len - 1:p_len - 1 + r_len]
            targets = ids[j, p_len:p_len + r_len]
            logp[b, :r_len] = torch.log_softmax(step_logits, -1).gather(-1, targets[:, None])[:, 0]
            mask[b, :r_len] = 1
    return logp, mask


@torch.inference_mode()
def reward_scores(model, tok, prompts: Sequence[Sequence[Message]], replies: Sequence[str],
                  batch_size: int = 8) -> list[float]:
    """Reward-model score of each (prompt, reply), read at the last real token of the right-padded text."""
    max_len = min(getattr(model.config, "max_position_embeddings", 2048), tok.model_max_length)
    pad = model.config.pad_token_id
    scores: list[float] = []
    for start in range(0, len(replies), batch_size):
        texts = [render(tok, m, r) for m, r in zip(prompts[start:start + batch_size],
                                                   replies[start:start + batch_size], strict=True)]
        # keep the end of long texts: the reply is what is being scored
        encoded = [tok(t, add_special_tokens=False)["input_ids"][-max_len:] for t in texts]
        width = max(len(e) for e in encoded)
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in encoded])
        attn = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
        scores.extend(sequence_scores(model, ids, attn).tolist())
    return scores


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """B scores of a one-label sequence classifier (transformers pools at the last non-pad token)."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
