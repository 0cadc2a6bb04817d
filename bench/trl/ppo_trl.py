"""TRL's PPOTrainer on the benchmark's PPO work (run inside the trl-1.12.0 venv by `bench/vs_trl.py`).

    <venv>/bin/python bench/trl/ppo_trl.py SPEC.json      # writes spec["result"]

Models as TRL's PPO examples build them, all from the spec's folder in fp32: policy and frozen reference
(AutoModelForCausalLM), value and reward model (AutoModelForSequenceClassification, num_labels=1). The dataset is
the prompt token ids chatrl's pipeline produced (checked equal to TRL's own chat-template tokenization).
`stop_token=None`: TRL does not stop at EOS, so every response has exactly `response_length` tokens (as chatrl's
min_new_tokens = max_new_tokens). One PPO epoch, one mini-batch, per-device batch = the rollout.

Phases, timed by wrapping the module functions `PPOTrainer.train()` calls (its loop has no phase hooks):
generate = `batch_generation` (HF generate with output_scores: TRL takes the rollout log-probs from these
logits); score = from generate's end to the first forward of the policy+value wrapper (reference, value and
reward forwards, KL, GAE, whitening); train = from there to `on_step_end` (forward/backward/step, metrics);
seconds = from the previous iteration's end (or train begin) to this one's end.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from trl_common import Clock, StepClock, fail, load_spec, timed, tokenizer_for, train_kwargs, write_result

try:  # TRL moved PPO to trl.experimental (1.x) and removed it after 1.12
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module
except ImportError:  # pragma: no cover - older layouts
    try:
        from trl import PPOConfig, PPOTrainer
        from trl.trainer import ppo_trainer as ppo_module
    except ImportError as e:
        fail(f"this TRL has no PPOTrainer ({e}); use trl==1.12.0")


def main() -> None:
    spec = load_spec()
    torch.manual_seed(spec["seed"])
    tok = tokenizer_for(spec)
    path, f32 = spec["model"], torch.float32
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=f32)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=f32)
    value = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=f32)
    reward = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=f32)
    batch, iters, new = spec["prompts_per_iteration"], spec["iterations"], spec["new_tokens"]
    data = Dataset.from_dict({"input_ids": spec["prompt_ids"]})
    with tempfile.TemporaryDirectory(prefix="vs-trl-ppo-") as out:
        cfg = PPOConfig(**train_kwargs(spec, out), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                        num_mini_batches=1, num_ppo_epochs=1, total_episodes=batch * iters, response_length=new,
                        temperature=spec["temperature"], stop_token=None, missing_eos_penalty=None,
                        local_rollout_forward_batch_size=spec["micro_batch"], num_sample_generations=0,
                        learning_rate=spec["learning_rate"], kl_coef=spec["kl_coef"])
        if spec["micro_batch"] != batch:
            fail("TRL PPO trains on per_device_train_batch_size rows at once: micro-batch must equal the batch")
        clock = Clock()
        trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             value_model=value, train_dataset=data, callbacks=[StepClock(clock)])
        gen_end: list[float] = []  # when this iteration's generation ended (empty once training started)

        def after_generation(out: Any, args: Any, kwargs: Any) -> None:
            query_responses, _ = out
            queries = args[1]
            responses = query_responses[:, queries.shape[1]:]
            gen_end[:] = [time.perf_counter()]
            clock.counts.append({"sequences": int(queries.shape[0]), "prompt_tokens": int(queries.numel()),
                                 "new_tokens": int(responses.numel()), "response_width": int(responses.shape[1]),
                                 "eos_in_responses": int((responses == tok.eos_token_id).sum())})

        forward = ppo_module.forward

        def timed_forward(model: Any, *args: Any, **kwargs: Any) -> Any:
            if gen_end and model is trainer.model:  # the iteration's first training forward: score ends here
                clock.add("score", time.perf_counter() - gen_end.pop())
                clock.open("train")
            return forward(model, *args, **kwargs)

        ppo_module.batch_generation = timed(ppo_module.batch_generation, clock, "generate", after_generation)
        ppo_module.forward = timed_forward
        trainer.train()
    write_result(spec, clock, {"kind": "ppo", "gradient_checkpointing": cfg.gradient_checkpointing,
                               "stop_token": cfg.stop_token, "kl_coef": cfg.kl_coef})


if __name__ == "__main__":
    main()
