"""TRL's GRPOTrainer on the benchmark's GRPO work (run inside the newest-TRL venv by `bench/vs_trl.py`).

    <venv>/bin/python bench/trl/grpo_trl.py SPEC.json     # writes spec["result"]

One iteration = one TRL optimizer step: `prompts_per_iteration` prompts x G = `samples_per_prompt` completions
generated together (generation_batch_size = per_device_train_batch_size x steps_per_generation), then
`gradient_accumulation_steps` micro-batches of `micro_batch` rows and one optimizer step; num_iterations=1 and
steps_per_generation = gradient_accumulation_steps, so TRL skips the separate old-log-prob forward (as chatrl
skips it for a single on-policy step). beta=0: no reference model (chatrl's grpo default kl_coef=0 too).
min_new_tokens = max_completion_length (generation_kwargs): every completion has exactly that many tokens.
The prompts are conversational ({"role": "user"} messages); TRL applies the chat template itself, and the
tokens it generated from are recorded per step and compared with chatrl's ids (`trl_common.tokenizer_for`).

Phases (wrapping the trainer's methods): generate = `_generate` (tokenize + HF generate + decode); score = the
rest of `_generate_and_score_completions` (reward function, group advantages); train = the rest of the step
(forward/backward of the micro-batches, optimizer step); seconds = from the previous step's end (or the first
step's begin) to this step's end.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
from datasets import Dataset
from rewards import length_mod
from transformers import AutoModelForCausalLM
from trl_common import Clock, StepClock, fail, load_spec, timed, tokenizer_for, train_kwargs, write_result

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:  # pragma: no cover
    fail(f"this TRL has no GRPOTrainer ({e})")


def main() -> None:
    spec = load_spec()
    torch.manual_seed(spec["seed"])
    tok = tokenizer_for(spec)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    g, micro, new = spec["samples_per_prompt"], spec["micro_batch"], spec["new_tokens"]
    rollout = spec["prompts_per_iteration"] * g
    if rollout % micro:
        fail(f"rollout {rollout} is not a multiple of the micro-batch {micro}")
    accum = rollout // micro
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in spec["prompt_texts"]]})
    with tempfile.TemporaryDirectory(prefix="vs-trl-grpo-") as out:
        cfg = GRPOConfig(**train_kwargs(spec, out), per_device_train_batch_size=micro,
                         gradient_accumulation_steps=accum, steps_per_generation=accum, num_generations=g,
                         max_completion_length=new, generation_kwargs={"min_new_tokens": new},
                         temperature=spec["temperature"], top_p=1.0, top_k=0, beta=0.0, num_iterations=1,
                         max_steps=spec["iterations"], learning_rate=spec["learning_rate"], use_vllm=False)
        clock = Clock()
        trainer = GRPOTrainer(model=model, reward_funcs=[length_mod], args=cfg, train_dataset=data,
                              processing_class=tok, callbacks=[StepClock(clock)])
        if trainer.ref_model is not None:
            fail("beta=0 but TRL loaded a reference model: the work would differ from chatrl's")

        def record(out: dict[str, Any]) -> None:
            pm, cm = out["prompt_mask"], out["completion_mask"]
            clock.counts.append({"sequences": int(pm.shape[0]), "prompt_tokens": int(pm.sum()),
                                 "prompt_width": int(pm.shape[1]), "new_tokens": int(cm.sum()),
                                 "response_width": int(cm.shape[1]),
                                 "old_logps_forward": "old_per_token_logps" in out})

        generate = timed(trainer._generate, clock, "generate")
        gen_and_score = trainer._generate_and_score_completions

        def scored(*args: Any, **kwargs: Any) -> Any:
            """score = this call's seconds minus the generate seconds spent inside it."""
            gen_before, t0 = clock.current.get("generate", 0.0), time.perf_counter()
            out = gen_and_score(*args, **kwargs)
            inner = clock.current.get("generate", 0.0) - gen_before
            clock.add("score", time.perf_counter() - t0 - inner)
            record(out)
            return out

        trainer._generate = generate
        trainer._generate_and_score_completions = scored
        trainer.train()
    for it in clock.iterations:  # train = the rest of the step
        it["train"] = it["seconds"] - it.get("generate", 0.0) - it.get("score", 0.0)
    write_result(spec, clock, {"kind": "grpo", "gradient_checkpointing": cfg.gradient_checkpointing,
                               "generation_batch_size": cfg.generation_batch_size, "grad_accum": accum,
                               "loss_type": cfg.loss_type, "scale_rewards": cfg.scale_rewards})


if __name__ == "__main__":
    main()
