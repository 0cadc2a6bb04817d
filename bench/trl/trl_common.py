"""What the TRL-side scripts (`ppo_trl.py`, `grpo_trl.py`) share. They run inside a TRL venv made by
`bench/vs_trl.py` (torch, transformers, datasets come from chatrl's venv through a .pth file unless that TRL
release needed other versions), so this module imports nothing from chatrl.

The work is described by a JSON spec written by `vs_trl.py`: model folder, the prompts (text AND the token ids
chatrl's data pipeline produced from them), new tokens, batch sizes, iterations, seed. The result JSON holds one
record per iteration (seconds and phases), the token counts TRL actually processed, and the peak RSS.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoTokenizer, TrainerCallback


def load_spec() -> dict[str, Any]:
    """The spec path is the only argument (argv[1])."""
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} SPEC.json")
    with open(sys.argv[1], encoding="utf-8") as f:
        return json.load(f)


def fail(message: str) -> None:
    """One clear line on stderr and exit 3 (the orchestrator prints it)."""
    print(f"vs-trl (TRL side): {message}", file=sys.stderr)
    sys.exit(3)


def tokenizer_for(spec: dict[str, Any]) -> Any:
    """The model's tokenizer, checked to turn every prompt into exactly the ids chatrl used; pad = an id that occurs
    in no prompt. SmolLM2's pad token is its EOS <|im_end|>, which also ends every chat turn INSIDE the prompt:
    TRL builds attention masks as `ids != pad`, which would mask those prompt tokens, so TRL gets a pad id of its
    own (the ids and shapes, hence the work, are the same either way)."""
    tok = AutoTokenizer.from_pretrained(spec["model"])
    for i, (text, ids) in enumerate(zip(spec["prompt_texts"], spec["prompt_ids"], strict=True)):
        got = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
        if list(got) != list(ids):
            fail(f"prompt {i}: TRL's tokenizer gives {len(got)} tokens, chatrl's pipeline {len(ids)} "
                 f"(or different ids): the two sides would not do the same work")
    used = {t for ids in spec["prompt_ids"] for t in ids}
    pad = next(t for t in (tok.convert_tokens_to_ids("<|endoftext|>"), 0, 1, 3) if t is not None and t not in used)
    tok.pad_token_id = pad
    return tok


def train_kwargs(spec: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """TrainingArguments fields both TRL configs take: CPU, fp32, no eval / save / logging / trackers. TRL's
    default gradient_checkpointing=True is set to the spec's value (chatrl's default: off) unless asked for."""
    return dict(output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
                eval_strategy="no", logging_strategy="no", disable_tqdm=True, seed=spec["seed"],
                gradient_checkpointing=spec["gradient_checkpointing"], dataloader_num_workers=0)


@dataclass
class Clock:
    """Per-iteration stamps. `add(phase, s)` accumulates seconds into the current iteration's phase; `open(phase)`
    starts a phase that lasts until the iteration ends. Iteration k lasts from the end of iteration k-1 (or the
    first step's start) to its own end."""

    iterations: list[dict[str, float]] = field(default_factory=list)
    current: dict[str, float] = field(default_factory=dict)
    last_end: float | None = None
    counts: list[dict[str, Any]] = field(default_factory=list)
    opened: tuple[str, float] | None = None

    def start(self) -> None:
        if self.last_end is None:
            self.last_end = time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        self.current[phase] = self.current.get(phase, 0.0) + seconds

    def open(self, phase: str) -> None:
        self.opened = (phase, time.perf_counter())

    def end(self) -> None:
        now = time.perf_counter()
        assert self.last_end is not None, "step ended before it started"
        if self.opened is not None:
            self.add(self.opened[0], now - self.opened[1])
            self.opened = None
        self.iterations.append({"seconds": now - self.last_end, **self.current})
        self.current, self.last_end = {}, now


class StepClock(TrainerCallback):
    """Trainer callback: on_train_begin / on_step_begin open the first iteration, on_step_end closes each."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.clock.start()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.clock.iterations:  # the first iteration starts at its step, not at the trainer's set-up
            self.clock.last_end = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.clock.end()


def timed(fn: Any, clock: Clock, phase: str, after: Any = None) -> Any:
    """`fn` wrapped to add its seconds to `phase`; `after(result, args, kwargs)` can record what it produced."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        clock.add(phase, time.perf_counter() - t0)
        if after is not None:
            after(out, args, kwargs)
        return out
    return wrapper


def write_result(spec: dict[str, Any], clock: Clock, extra: dict[str, Any]) -> None:
    import transformers
    import trl
    payload = {"system": "trl", "trl_version": trl.__version__, "transformers_version": transformers.__version__,
               "torch_version": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
               "iterations": clock.iterations, "counts": clock.counts,
               "peak_rss_self_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, **extra}
    tmp = spec["result"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, spec["result"])
