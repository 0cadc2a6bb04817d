"""The sections of an RL step that say where episodes and their scores come from: the environment (and its tools),
the rollout's sampling, the reward sources (reward model, functions, an LLM judge) and the frozen models scored
against (reference, teacher). `chatrl.config_rl` composes them into the PPO / GRPO / distill configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from chatrl.algorithms.correction import IS_CORRECTIONS
from chatrl.configbase import opt, sub
from chatrl.errors import ChatrlError


@dataclass
class JudgeConfig:
    """An LLM judge as a reward source: any OpenAI-compatible chat endpoint scores each reply (chatrl.judge)."""

    base_url: Optional[str] = opt(None, "the endpoint, e.g. http://localhost:8000/v1 (`chatrl serve`, vLLM, "
                                        "OpenAI); None = no judge")
    model: str = opt("", "model name sent with each request (required with base_url)")
    api_key_env: Optional[str] = opt(None, "name of the environment variable holding the API key (None = no key)")
    rubric: Optional[str] = opt(None, "prompt template: a file path or inline text with the placeholders {prompt} "
                                      "and {reply} (mode=score) or {prompt}, {reply_a}, {reply_b} (mode=pairwise); "
                                      "None = the built-in rubric (a 1-10 score / 'Winner: A|B|tie')")
    mode: Literal["score", "pairwise"] = opt(
        "score", "score: parse 'Score: N' (or an answer that is only a number) in [score_min, score_max], scaled to "
                 "[0, 1]; pairwise: within each group compare every two replies, a reply's score = its share of "
                 "wins in [0, 1] (a tie counts 1/2)")
    score_min: float = opt(1.0, "lowest score the rubric asks for (scaled to 0); an answer outside the range fails")
    score_max: float = opt(10.0, "highest score the rubric asks for (scaled to 1)")
    swap: bool = opt(True, "pairwise: also ask each pair in the other order and average (cancels the judge's "
                           "position bias; twice the requests)")
    weight: float = opt(1.0, "weight of the judge's scaled score in the sum")
    temperature: float = opt(0.0, "sampling temperature of the judge")
    max_tokens: int = opt(256, "most tokens of one judge answer")
    concurrency: int = opt(8, "most requests in flight at once (per process)")
    timeout_s: float = opt(60.0, "seconds to wait for one answer before the attempt counts as failed (then retried)")
    retries: int = opt(3, "retries of a request that timed out, could not connect or got HTTP 408/409/429/5xx; "
                          "retry k waits backoff_s * 2^k first (other HTTP errors stop the run at once)")
    backoff_s: float = opt(1.0, "wait before the first retry, doubled for each further one")
    cache: str = opt("auto", "on-disk cache of answers (SQLite), keyed by a hash of (rubric, model, prompt, "
                             "reply): auto = <output_dir>/judge_cache.sqlite, off = none, or a file path (share it "
                             "between runs); a rerun asks nothing it has an answer for")
    on_error: Literal["error", "skip"] = opt(
        "error", "an answer without a valid score, or a request that failed after its retries: error = stop with "
                 "one line naming the endpoint and what it answered; skip = leave the episode's group (the "
                 "episode, with samples_per_prompt=1) out of the update and reward_mean, counted as judge/skipped")

    def check(self, group_size: int) -> None:
        """Cross-field rules of an enabled judge (the rubric file and the key are checked when it starts)."""
        if self.base_url is None:
            return
        if not self.model:
            raise ChatrlError("reward.judge.base_url is set but reward.judge.model is empty: name the judge's model")
        if self.mode == "pairwise" and group_size < 2:
            raise ChatrlError("reward.judge.mode=pairwise compares replies of a group: it needs "
                              f"rollout.samples_per_prompt >= 2 (got {group_size})")
        if not self.score_max > self.score_min:
            raise ChatrlError(f"reward.judge.score_max={self.score_max} must be > score_min={self.score_min}")
        if self.concurrency < 1 or self.retries < 0 or self.max_tokens < 1:
            raise ChatrlError("reward.judge.concurrency and max_tokens must be >= 1 and retries >= 0")
        if not (self.timeout_s > 0 and self.backoff_s >= 0):
            raise ChatrlError("reward.judge.timeout_s must be > 0 and backoff_s >= 0")


@dataclass
class RewardSourceConfig:
    """Where the sequence reward comes from: a reward model, Python functions, an LLM judge, the environment, or
    a sum."""

    model: Optional[str] = opt(None, "reward-model folder (from `chatrl reward`); None = no reward model")
    model_weight: float = opt(1.0, "weight of the reward-model score in the sum")
    functions: list[str] = opt([], "reward functions: built-in names (answer_match, format_check, length_penalty) or "
                                 "'pkg.module:fn' / 'file.py:fn': fn(prompts, responses, **columns) -> floats; "
                                 "columns it names are passed: reference, response_ids, conversation, and the "
                                 "dataset's / environment's extras")
    function_weights: list[float] = opt([], "weight per function (empty = all 1.0)")
    clip: Optional[float] = opt(5.0, "clip the summed score to [-clip, clip] (None = no clip): the episode outcome "
                                     "everywhere (advantages, dynamic sampling's ties, logged reward, RFT's choice)")
    eos_penalty: float = opt(0.0, "subtracted from the score of responses that hit max_new_tokens without EOS")
    dtype: Literal["auto", "bf16", "fp32"] = opt("auto", "dtype of the frozen reward model")
    offload: bool = opt(False, "keep the reward model in CPU memory, moved to the accelerator only to score")
    judge: JudgeConfig = sub(JudgeConfig)

    def any_source(self) -> bool:
        """A reward model, a reward function or a judge is configured."""
        return self.model is not None or bool(self.functions) or self.judge.base_url is not None


@dataclass
class ReferenceConfig:
    """The frozen reference policy (a copy of the initial actor) for the KL penalty."""

    dtype: Literal["auto", "bf16", "fp32"] = opt("auto", "dtype of the frozen reference model")
    offload: bool = opt(False, "keep the reference in CPU memory, moved to the accelerator only to score")


@dataclass
class TeacherConfig:
    """The frozen teacher of on-policy distillation (grpo.teacher), held like the reference model."""

    dtype: Literal["auto", "bf16", "fp32"] = opt("auto", "dtype of the frozen teacher model")
    offload: bool = opt(False, "keep the teacher in CPU memory, moved to the accelerator only to score")
    allow_pickle: bool = opt(False, "load the teacher's pickle weights (.bin) if it has no safetensors (runs code "
                                    "from the file: only for a folder you trust)")


@dataclass
class RolloutConfig:
    """Generation with the Hybrid Engine (the actor switched to its inference layout)."""

    prompts_per_rollout: int = opt(16, "prompts (episodes' tasks) per iteration, over all processes")
    samples_per_prompt: int = opt(1, "responses (episodes) sampled per prompt: the group size G")
    max_new_tokens: int = opt(64, "max tokens of one assistant turn")
    min_new_tokens: int = opt(1, "EOS is blocked before this many tokens (sampling only: the update scores the "
                                 "full softmax, EOS included)")
    temperature: float = opt(1.0, "sampling temperature; the update scores log-probs of softmax(logits / T) too")
    top_p: float = opt(1.0, "nucleus sampling mass. Like top_k and min_new_tokens it truncates the distribution "
                            "only at sampling: the update scores the full tempered softmax, so the sampled and the "
                            "scored policies differ there (the pad token is never sampled, unless pad = eos)")
    top_k: int = opt(0, "top-k sampling (0 = off); sampling only, as top_p")
    is_correction: Literal[tuple(IS_CORRECTIONS)] = opt(
        "none", "correction of the rollout/training mismatch (the inference copy's log-probs vs the actor's, logged "
                "as agreement/*): tis = truncated importance sampling, each token's policy-gradient term times "
                "min(exp(old_logprob - sampler_logprob), is_cap), detached (Yao et al. 2025; veRL rollout_is); "
                "mis = masked importance sampling, tokens whose exp(old_logprob - sampler_logprob) leaves "
                "[is_low, is_cap] are dropped from the loss (weight 0; veRL rollout_is mask mode)")
    is_cap: float = opt(2.0, "the cap of the truncated importance weight (tis); the top of the kept band (mis)")
    is_low: Optional[float] = opt(None, "the bottom of the kept band of rollout.is_correction=mis (None = 1 / is_cap)")
    inference_dtype: Literal["auto", "bf16", "fp32"] = opt("auto", "dtype of the actor's inference copy")
    release_memory: bool = opt(True, "free the inference copy after each rollout (bounded peak memory)")
    compile: bool = opt(False, "torch.compile the decode step (Llama-architecture actors): ~1.3-1.5x faster "
                               "rollouts on CPU after a one-time ~45 s compilation per process (bench/NOTES.md)")


@dataclass
class EnvConfig:
    """The environment the actor plays episodes in (Gymnasium API; README: Environments)."""

    name: str = opt("chat", "built-in (chat = prompts of the data section, arithmetic, math, guess_number), "
                            "'reasoning_gym:TASK', 'openenv:URL', 'verifiers:MODULE' (README: Environments people "
                            "already have) or 'pkg.module:Class' / 'path/to/file.py:Class' (a gymnasium.Env)")
    kwargs: dict = opt({}, "keyword arguments of the environment's constructor")
    max_turns: int = opt(1, "most assistant turns per episode (the environment may end it sooner)")
    gamma: float = opt(1.0, "discount per turn: the episode return is sum_k gamma^k r_k (the final score counts "
                            "with the last turn's gamma^k); turn j's advantage then carries gamma^j")
    max_context: int = opt(1024, "most tokens of a whole conversation; an episode that would exceed it is "
                                 "truncated (and counted)")
    tools: list[str] = opt([], "tools the model may call inside its turns, added to the environment's own `tools`: "
                               "built-in names (calculator, python) or 'pkg.module:fn' (type hints + Google-style "
                               "docstring; README: Tools)")
    tool_parser: str = opt("auto", "how tool calls are found in a reply: auto, hermes (<tool_call>{...}</tool_call>, "
                                   "Qwen), llama3 (JSON), mistral ([TOOL_CALLS]) or 'pkg.module:fn' "
                                   "(text -> [{'name', 'arguments'}])")
    max_tool_calls: int = opt(4, "most tool calls per turn; the reply after the last one goes to env.step() as is")
    tool_timeout: float = opt(10.0, "seconds one tool call may take; then the model reads a timeout error")
    tool_error_penalty: float = opt(0.0, "subtracted from the episode's reward per failed tool call (malformed, "
                                         "raised, timed out)")
