"""Token-by-token generation for chat: sampling, incremental detokenisation, stop strings.

One `Decoding` is one sequence being generated with its own KV cache; `step()` runs one forward
pass and returns the text it added. The terminal chat loops over `step()` directly; the server's
worker thread interleaves the `step()`s of many requests (see `worker.py`), so neither needs
`model.generate` and both get stop strings, seeds and cancellation in the same way.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chatrl.errors import ChatrlError

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass
class SamplingSettings:
    """What one generation may do. `temperature == 0` means greedy; `seed=None` draws a fresh one."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


def pick_dtype(name: str = "auto") -> torch.dtype:
    """bf16 where the CPU has native bf16 (avx512_bf16 / amx_bf16), else fp32; or the dtype named."""
    if name in ("fp32", "float32"):
        return torch.float32
    if name in ("bf16", "bfloat16"):
        return torch.bfloat16
    if name != "auto":
        raise ChatrlError(f"unknown dtype {name!r}: use auto, bf16 or fp32")
    if torch.cuda.is_available():
        return torch.bfloat16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


class ChatModel:
    """A HF causal LM + tokenizer loaded for chat: renders conversations, knows its window and EOS ids."""

    def __init__(self, model_path: str, dtype: str = "auto", context_window: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from chatrl.models.builtin import resolve_model_path

        path = resolve_model_path(model_path)
        if not Path(path, "config.json").exists():
            raise ChatrlError(f"{path!r} is not a model folder (no config.json): pass a Hugging Face model folder "
                              f"or a built-in alias (tiny-random, smollm2-135m-instruct)")
        self.path = path
        # The Rust tokenizer can refuse concurrent use ("Already borrowed"): the server renders prompts on
        # the event loop while the worker decodes tokens, so every tokenizer call takes this lock.
        self.tokenizer_lock = threading.Lock()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if not self.tokenizer.chat_template:
            raise ChatrlError(f"the tokenizer in {path} has no chat template: use a chat (instruct) model")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype)).eval()
        cfg_window = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.context_window = int(min(context_window or cfg_window, cfg_window))
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        """Every id that ends an answer: the tokenizer's EOS and the generation config's (int or list)."""
        ids: set[int] = set()
        for value in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return ids

    def render(self, messages: list[Message]) -> list[int]:
        """Token ids of the conversation through the chat template, ending with the assistant prompt."""
        with self.tokenizer_lock:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
        return list(ids)

    def start(self, prompt_ids: list[int], settings: SamplingSettings, seed_offset: int = 0) -> Decoding:
        """A new `Decoding` of at most `settings.max_new_tokens`, clamped to what fits in the window."""
        room = self.context_window - len(prompt_ids)
        if room <= 0:
            raise ChatrlError(f"the prompt has {len(prompt_ids)} tokens; the model's window is "
                              f"{self.context_window}: shorten the conversation")
        return Decoding(self, prompt_ids, settings, min(settings.max_new_tokens, room), seed_offset)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches `top_p`; renormalise.

    probs: V (sums to 1). A token is kept if the mass of strictly more likely tokens is < top_p,
    so the most likely token always survives.
    """
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = torch.where(mass_before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum()


def sample_token(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | None = None) -> int:
    """Next token id from logits (V): argmax at temperature 0, else nucleus sampling."""
    logits = logits.float()
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = top_p_filter(torch.softmax(logits / temperature, dim=-1), top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting multi-byte characters.

    Decoding tokens one at a time breaks on byte-level BPE (a character can span tokens, and
    spaces depend on the neighbour), so it decodes a short window and emits only what is new
    and complete (no trailing U+FFFD).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True, lock: threading.Lock | None = None):
        self.tokenizer = tokenizer
        self.lock = lock or threading.Lock()
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: context so spacing decodes the same as in the full text
        self.read_offset = 0  # tokens before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        self.read_offset = len(self.ids)
        self.prefix_offset = self.read_offset
        return after[len(before):] if after.startswith(before) else ""


class StopMatcher:
    """Cuts the output at the first stop string, holding back text that might be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Feed new text; return (text safe to emit, whether a stop string was hit)."""
        buf = self.held + text
        hits = [buf.find(s) for s in self.stops if s in buf]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class Decoding:
    """One sequence being generated: its KV cache, RNG, detokeniser and stop matcher.

    Call `step()` until `finish_reason` is set ("stop": EOS or a stop string; "length": token budget).
    Not thread-safe: only the thread that owns the model may call `step()`.
    """

    def __init__(self, chat: ChatModel, prompt_ids: list[int], settings: SamplingSettings, max_new_tokens: int,
                 seed_offset: int = 0):
        from transformers import DynamicCache

        self.chat = chat
        self.settings = settings
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.cache = DynamicCache(config=chat.model.config)
        seed = settings.seed if settings.seed is not None else random.getrandbits(62)
        self.generator = torch.Generator().manual_seed(seed + seed_offset)
        self.detok = IncrementalDetokenizer(chat.tokenizer, lock=chat.tokenizer_lock)
        self.stopper = StopMatcher(settings.stop)
        self.completion_ids: list[int] = []
        self.finish_reason: str | None = None
        self._next_input = torch.tensor([prompt_ids], dtype=torch.long)  # 1 x T (prefill), then 1 x 1

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.completion_ids)

    @torch.inference_mode()
    def step(self) -> str:
        """One forward pass + one sampled token; returns the text to show (may be empty)."""
        if self.finish_reason is not None:
            return ""
        if self.max_new_tokens <= 0:
            return self._finish("length")
        out = self.chat.model(input_ids=self._next_input, past_key_values=self.cache, use_cache=True)
        token = sample_token(out.logits[0, -1], self.settings.temperature, self.settings.top_p, self.generator)
        self._next_input = torch.tensor([[token]], dtype=torch.long)
        if token in self.chat.eos_ids:
            return self._finish("stop")
        self.completion_ids.append(token)
        text, hit = self.stopper.push(self.detok.add(token))
        if hit:
            self.finish_reason = "stop"
            return text
        if len(self.completion_ids) >= self.max_new_tokens:
            return text + self._finish("length")
        return text

    def _finish(self, reason: str) -> str:
        """Set the finish reason and release held-back text (cut at a stop string if one completes)."""
        self.finish_reason = reason
        text, hit = self.stopper.push(self.detok.flush())
        return text if hit else text + self.stopper.flush()

    def run(self) -> str:
        """Generate to the end; the whole answer text."""
        parts = []
        while self.finish_reason is None:
            parts.append(self.step())
        return "".join(parts)
