"""Token-by-token generation for chat: incremental detokenisation, stop strings, one KV cache per sequence.

One `Decoding` is one sequence being generated: its sampler settings, RNG, detokeniser, stop matcher and budget.
`step()` runs one forward pass on the sequence's own KV cache and returns the text it added; `accept(logits)` is the
same without the forward. The terminal chat loops over `step()` directly; the server's worker thread decodes many
requests with continuous batching (`batching.py`: one forward for all active sequences, then `accept` on each row's
logits), so neither needs `model.generate` and both get stop strings, seeds and cancellation in the same way.

Nothing here is chat-only that the rest of chatrl already has: the next token is chosen by the rollout
sampler (`chatrl.rollout.sampling.pick_tokens`), the model and tokenizer are loaded by `chatrl.models.loading`
(its `auto` dtype rule, pad-token rule and fallback chat template), and the cache is passed under the keyword
`rollout.decode.cache_kwarg` finds. A model folder with ILQL heads (`chatrl ilql`) decodes Q-guided: the model
called is `rollout.guided.QGuidedLM`, whose logits are shifted by beta * (Q - V) before the same sampler.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from chatrl.errors import ChatrlError
from chatrl.models.loading import load_frozen_causal_lm, load_tokenizer, resolve_dtype, resolve_model_source
from chatrl.rollout.decode import cache_kwarg
from chatrl.rollout.guided import QGuidance, load_guidance
from chatrl.rollout.sampling import GenerationSettings, pick_tokens

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass
class SamplingSettings:
    """What one generation may do. `temperature == 0` means greedy; `seed=None` draws a fresh one."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def token_settings(self) -> GenerationSettings:
        """The rollout sampler's settings for choosing one token (temperature 0 -> greedy)."""
        greedy = self.temperature <= 0
        return GenerationSettings(max_new_tokens=max(1, self.max_new_tokens), do_sample=not greedy,
                                  temperature=1.0 if greedy else float(self.temperature), top_p=float(self.top_p))


class ChatModel:
    """A HF causal LM + tokenizer loaded for chat: renders conversations, knows its window and EOS ids.

    Loaded as every other chatrl step loads a model (`chatrl.models.loading`): `dtype="auto"` is `resolve_dtype`'s
    rule, built-in aliases and local folders resolve the same way, and a tokenizer without a chat template gets
    chatrl's fallback template (the one chatrl trains base models with, so a served SFT model sees its format).

    ILQL: when the folder has heads (`ilql_heads.safetensors`), decoding is Q-guided with `ilql_beta` (None = the
    beta saved with the heads; 0 = the plain LM). A non-zero `ilql_beta` for a folder without heads is an error.
    Pickle-only weights (`pytorch_model.bin`) load only with `allow_pickle` (`--allow-pickle`)."""

    def __init__(self, model_path: str, dtype: str = "auto", context_window: int | None = None,
                 ilql_beta: float | None = None, allow_pickle: bool = False):
        torch_dtype = resolve_dtype(dtype)
        tokenizer = load_tokenizer(model_path)
        model = load_frozen_causal_lm(model_path, torch_dtype, tokenizer=tokenizer, allow_pickle=allow_pickle)
        source = resolve_model_source(model_path)
        self.guidance = load_guidance(source, model, ilql_beta)
        self._attach(self.guidance.wrap(model) if self.guidance else model, tokenizer, source, context_window)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer, context_window: int | None = None,
                   path: str = "(in memory)", guidance: QGuidance | None = None) -> ChatModel:
        """Wrap an already loaded model and tokenizer (no loading; tests drive stub models through this)."""
        chat = cls.__new__(cls)
        chat.guidance = guidance
        chat._attach(guidance.wrap(model) if guidance else model, tokenizer, path, context_window)
        return chat

    def _attach(self, model: torch.nn.Module, tokenizer, path: str, context_window: int | None) -> None:
        self.path = path
        # The Rust tokenizer can refuse concurrent use ("Already borrowed"): the server renders prompts on
        # the event loop while the worker decodes tokens, so every tokenizer call takes this lock.
        self.tokenizer_lock = threading.Lock()
        self.tokenizer = tokenizer
        self.model = model.eval()
        cfg_window = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.context_window = int(min(context_window or cfg_window, cfg_window))
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        """Every id that ends an answer: the tokenizer's EOS and the generation config's (int or list)."""
        ids: set[int] = set()
        generation_config = getattr(self.model, "generation_config", None)
        for value in (self.tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
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

        self.chat = chat
        self.settings = settings
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.cache: DynamicCache | None = None  # made by the first `step()`; rows of a batch use the batch's cache
        self._cache_key = cache_kwarg(chat.model)
        self.token_settings = settings.token_settings()
        seed = settings.seed if settings.seed is not None else random.getrandbits(62)
        self.generator = torch.Generator().manual_seed(seed + seed_offset)
        self.detok = IncrementalDetokenizer(chat.tokenizer, lock=chat.tokenizer_lock)
        self.stopper = StopMatcher(settings.stop)
        self.completion_ids: list[int] = []
        self.finish_reason: str | None = None
        self.last_token: int | None = None  # the token fed to the next forward (not kept when it is EOS)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.completion_ids)

    @torch.inference_mode()
    def step(self) -> str:
        """One forward pass on this sequence's own KV cache + one sampled token; returns the text to show (may be
        empty). The server batches many sequences into one forward instead (`serve.batching`) and calls `accept`."""
        if self.finish_reason is not None:
            return ""
        if self.max_new_tokens <= 0:
            return self._finish("length")
        if self.cache is None:  # prefill: the whole prompt [1, T]
            self.cache = DynamicCache(config=self.chat.model.config)
            inputs = torch.tensor([self.prompt_ids], dtype=torch.long)
        else:  # [1, 1]
            inputs = torch.tensor([[self.last_token]], dtype=torch.long)
        out = self.chat.model(input_ids=inputs, use_cache=True, **{self._cache_key: self.cache})
        return self.accept(out.logits[:, -1].float())

    def accept(self, logits: torch.Tensor) -> str:
        """Choose the next token from this sequence's next-token logits [1, V] float32 (its own sampler settings
        and generator), account for it, and return the text to show (may be empty)."""
        token = int(pick_tokens(logits, self.token_settings, self.generator)[0])
        self.last_token = token
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
