"""Episodes in text environments: the actor (served by the Hybrid Engine) plays every episode of a rollout
turn by turn, all unfinished episodes of a turn decoded together in one batch.

One episode, as tokens: the first observation rendered with the chat template (the PROMPT, not trained on),
then for each turn the model's reply tokens exactly as sampled (ACTIONS: mask 1) followed by the tokens that
close the turn and carry the environment's messages up to the next generation prompt (mask 0: the environment
wrote them). So the sequence the update scores is exactly the one the model generated from. Per-turn rewards are
kept with the column of the token that ended the turn (the advantage code places them there).

Tools (`chatrl.tools`; the environment's `tools`, or the config's env.tools): a reply that calls tools is kept
(mask 1), the calls of all episodes run together (`rollout.tool_turns`), their results are appended as tool
messages (environment tokens: mask 0, sampler log-prob 0) and the model replies again within the same turn, up to
`max_tool_calls` calls per turn; only the reply that calls no tool reaches env.step(). Without tools nothing changes.

An episode ends when the environment says terminated or truncated, after `max_turns` replies, or when the
conversation would exceed `max_context` tokens (truncated, counted as `context_truncated`).
Bad environment output (wrong types, NaN rewards, exceptions) stops the run with a one-line `ChatrlError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import gymnasium
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from chatrl.batches import pad_rows
from chatrl.data.templates import render
from chatrl.data.tokenize import encode_prompt
from chatrl.data.types import Message
from chatrl.engine.collectives import any_rank
from chatrl.envs.base import call_env, validate_reset, validate_step
from chatrl.errors import ChatrlError
from chatrl.rollout.hybrid import HybridEngine
from chatrl.rollout.sampling import GenerationSettings
from chatrl.rollout.tool_turns import ToolRound, run_round, tool_calls_of
from chatrl.tools.audit import audit_template
from chatrl.tools.parsers import ToolCall
from chatrl.tools.runner import ToolResult
from chatrl.tools.schema import Tool
from chatrl.tools.toolbox import ToolBox, ToolSettings, declared_tools, toolbox_for


@dataclass(frozen=True)
class Task:
    """Which problem an episode plays: `task` picks it within `split`; `seed` seeds the env's other randomness."""

    split: str
    task: int
    seed: int


@dataclass
class EpisodeBatch:
    """Finished episodes as per-row lists (rows of several rounds can be concatenated before tensors are built).
    Columns index the response region: everything after the first observation's prompt."""

    prompt_ids: list[list[int]] = field(default_factory=list)      # first observation + generation prompt
    response_ids: list[list[int]] = field(default_factory=list)    # model turns and environment messages
    action_mask: list[list[int]] = field(default_factory=list)     # 1 on tokens the model generated
    sampler_logprobs: list[list[float]] = field(default_factory=list)  # log-prob of each generated token under the
    #   inference copy's full softmax(logits / T), before top-k/top-p/EOS/pad blocking; 0 on environment tokens
    turn_ends: list[list[int]] = field(default_factory=list)       # column of each turn's last generated token
    turn_rewards: list[list[float]] = field(default_factory=list)  # the environment's reward per turn
    last_reply_ids: list[list[int]] = field(default_factory=list)  # the final turn's generated tokens
    last_reply_eos: list[bool] = field(default_factory=list)       # the final turn ended with EOS
    prompts: list[list[Message]] = field(default_factory=list)     # the first observation
    conversations: list[list[Message]] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)                # the environment's last info
    success: list[bool] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)            # ended by truncation (env, turns or context)
    context_truncated: list[bool] = field(default_factory=list)
    tool_results: list[list[ToolResult]] = field(default_factory=list)  # every tool call's result, in order

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __add__(self, other: EpisodeBatch) -> EpisodeBatch:
        return EpisodeBatch(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def select(self, rows: Sequence[int]) -> EpisodeBatch:
        # a column nobody filled (tool_results of a hand-built batch) stays empty
        return EpisodeBatch(**{f.name: [v[i] for i in rows] if (v := getattr(self, f.name)) else []
                               for f in fields(self)})

    @property
    def replies(self) -> list[str]:
        """The final assistant reply of each episode (what single-turn reward functions score)."""
        return [next((m["content"] for m in reversed(c) if m["role"] == "assistant"), "") for c in self.conversations]


@dataclass
class _Episode:
    env: gymnasium.Env
    prompt: list[Message]
    prompt_ids: list[int]
    conversation: list[Message]
    response: list[int] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    sampler_logprobs: list[float] = field(default_factory=list)
    turn_ends: list[int] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    last_reply: list[int] = field(default_factory=list)
    last_eos: bool = False
    info: dict = field(default_factory=dict)
    done: bool = False
    truncated: bool = False
    context_truncated: bool = False
    tools: dict[str, Tool] = field(default_factory=dict)  # what its calls run: its own environment's tools
    tool_results: list[ToolResult] = field(default_factory=list)
    turn_calls: int = 0           # tool calls answered in the current turn
    turn_penalty: float = 0.0     # tool_error_penalty owed by the current turn's failed calls

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response)


def continuation_ids(tokenizer: PreTrainedTokenizerBase, conversation: list[Message], reply: str, ended_with_eos: bool,
                     new_messages: list[Message], tools: list[dict] | None = None) -> list[int]:
    """Tokens between a reply (as generated) and the next generation prompt: the end of the assistant turn (unless
    the reply's own EOS token already closed it), the environment's messages, the next generation prompt.

    Found by rendering the conversation with and without the new messages: the template must render a
    conversation as an extension of its earlier turns (true of ChatML, Llama and the fallback template)."""
    before = render(tokenizer, conversation, add_generation_prompt=True, tools=tools) + reply
    after = render(tokenizer, [*conversation, {"role": "assistant", "content": reply}, *new_messages],
                   add_generation_prompt=True, tools=tools)
    if not after.startswith(before):
        raise ChatrlError("multi-turn episodes need a chat template that renders a conversation as an extension of "
                          "its earlier turns; this tokenizer's template re-renders them (e.g. drops earlier "
                          "reasoning): use env.max_turns=1 or another template")
    glue = after[len(before):]
    eos = tokenizer.eos_token or ""
    if ended_with_eos and eos and glue.startswith(eos):
        glue = glue[len(eos):]
    return tokenizer(glue, add_special_tokens=False)["input_ids"]


def run_episodes(hybrid: HybridEngine, tokenizer: PreTrainedTokenizerBase, envs: Sequence[gymnasium.Env],
                 env_name: str, tasks: Sequence[Task], settings: GenerationSettings, *, max_turns: int,
                 max_prompt_tokens: int, max_context: int, tool_settings: ToolSettings | None = None) -> EpisodeBatch:
    """Play one episode per (env, task) pair, decoding each turn's replies for all unfinished episodes in one
    batch inside one inference layout of the Hybrid Engine (the weights are copied once for all turns).
    `tool_settings`: the env section's tool options (defaults when None); tools come from the environment's
    `tools` and `tool_settings.tools`, and a template that cannot render tool turns stops the run first."""
    if len(envs) < len(tasks):
        raise ValueError(f"{len(tasks)} tasks but only {len(envs)} environment instances")
    box = toolbox_for(envs[0], env_name, tool_settings) if envs else None
    if box is not None:
        audit_template(tokenizer, box)
    schemas = box.schemas if box is not None else None
    first_tools = declared_tools(envs[0], env_name) if box is not None else []
    episodes = []
    for env, task in zip(envs, tasks, strict=False):
        first, info = validate_reset(env_name, call_env(env_name, "reset()", env.reset, seed=task.seed,
                                                        options={"split": task.split, "task": task.task}))
        ids = encode_prompt(tokenizer, first, max_prompt_tokens, tools=schemas) or []
        episodes.append(_Episode(env=env, prompt=list(first), prompt_ids=ids, conversation=list(first), info=info,
                                 tools=_tools_of(env, env_name, box, first_tools)))
    synced = hybrid.zero3 and dist.is_initialized() and dist.get_world_size() > 1
    base_seed = settings.seed
    with hybrid.inference_mode():
        for turn in range(max_turns):
            _truncate_full(episodes, settings.max_new_tokens, max_context)
            active = [ep for ep in episodes if not ep.done]
            # synced decoding (ZeRO-3): every rank runs the same number of decode calls while any rank is active
            if synced and not any_rank(bool(active)):
                break
            if not synced and not active:
                break
            for ep in active:
                ep.turn_calls = 0
            # each round that calls tools uses at least one of the turn's max_calls: the last round steps the env
            for sub in range(1 + (box.max_calls if box is not None else 0)):
                if base_seed is not None:
                    settings.seed = base_seed + turn * 1_000_003 + sub * 7919
                calling = []
                for ep, reply, lps in _decode(hybrid, active, settings, tokenizer, synced):
                    may_call = box is not None and ep.turn_calls < box.max_calls
                    calls = tool_calls_of(box, tokenizer, reply) if may_call else None
                    if calls:
                        calling.append((ep, reply, lps, calls))
                    else:
                        _take_turn(ep, reply, lps, tokenizer, env_name, last_turn=turn == max_turns - 1,
                                   tools=schemas)
                if box is None:
                    break
                _answer_calls(calling, box, tokenizer)
                active = [ep for ep, *_ in calling]
                _truncate_full(active, settings.max_new_tokens, max_context)
                active = [ep for ep in active if not ep.done]
                if (synced and not any_rank(bool(active))) or (not synced and not active):
                    break
    settings.seed = base_seed
    return _collect(episodes)


def _tools_of(env: gymnasium.Env, env_name: str, box: ToolBox | None, first: list[Tool]) -> dict[str, Tool]:
    """The tools an episode's calls run: its own environment instance's (a tool may be a method bound to it) plus
    the config's. Every instance must declare the tools the first one does (`first`): the model is shown one set."""
    if box is None:
        return {}
    own = declared_tools(env, env_name)
    if [t.schema for t in own] != [t.schema for t in first]:
        raise ChatrlError(f"environment '{env_name}': its instances declare different tools ("
                          f"{', '.join(t.name for t in own) or 'none'} vs {', '.join(t.name for t in first)}); "
                          "every instance must offer the same tools")
    return {**box.tools, **{t.name: t for t in own}}


def _truncate_full(episodes: list[_Episode], max_new_tokens: int, max_context: int) -> None:
    """A reply that cannot fit any more ends the episode before decoding."""
    for ep in episodes:
        if not ep.done and ep.length + max_new_tokens > max_context:
            ep.done = ep.truncated = ep.context_truncated = True


def _decode(hybrid: HybridEngine, active: list[_Episode], settings: GenerationSettings,
            tokenizer: PreTrainedTokenizerBase, synced: bool) -> list[tuple[_Episode, list[int], list[float]]]:
    """One batched generation for the episodes in `active`: (episode, reply ids, sampler log-probs) each."""
    pad_id = tokenizer.pad_token_id
    rows = [ep.prompt_ids + ep.response for ep in active] or [[pad_id]]  # a dummy row keeps ranks in step
    ids, mask = (t.to(hybrid.device) for t in pad_rows(rows, pad_id, "left"))
    out_ids, out_mask, out_logps = hybrid.generate(ids, mask, settings, eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=pad_id, synced=synced, return_logprobs=True)
    return [(ep, gen[:n], lps[:n]) for ep, gen, lps, n in zip(active, out_ids.tolist(), out_logps.tolist(),
                                                              out_mask.sum(-1).tolist(), strict=False)]


def _append_reply(ep: _Episode, reply_ids: list[int], reply_logprobs: list[float], ended: bool) -> None:
    """The generated reply's tokens (actions) and the sampler's log-probs of them."""
    ep.response += reply_ids
    ep.actions += [1] * len(reply_ids)
    ep.sampler_logprobs += reply_logprobs
    ep.last_reply, ep.last_eos = reply_ids, ended


def _answer_calls(calling: list[tuple[_Episode, list[int], list[float], list[ToolCall]]], box: ToolBox,
                  tokenizer: PreTrainedTokenizerBase) -> None:
    """Run the calls of all calling replies together, append each reply and its results to its episode."""
    answers = run_round([(reply, calls, box.max_calls - ep.turn_calls, ep.tools) for ep, reply, _, calls in calling],
                        box, tokenizer)
    for (ep, reply, lps, _), answered in zip(calling, answers, strict=True):
        _append_tool_round(ep, reply, lps, answered, tokenizer, box.schemas, box.error_penalty)


def _append_tool_round(ep: _Episode, reply_ids: list[int], reply_logprobs: list[float], answered: ToolRound,
                       tokenizer: PreTrainedTokenizerBase, tools: list[dict] | None, penalty: float) -> None:
    """A reply that called tools (actions), then the tool results up to the next generation prompt (environment
    tokens: mask 0, log-prob 0); the calls count against the turn's budget, failed ones owe the penalty."""
    _append_reply(ep, reply_ids, reply_logprobs, answered.ended_with_eos)
    glue = continuation_ids(tokenizer, ep.conversation, answered.reply, answered.ended_with_eos, answered.messages,
                            tools=tools)
    ep.conversation += [{"role": "assistant", "content": answered.reply}, *answered.messages]
    ep.response += glue
    ep.actions += [0] * len(glue)
    ep.sampler_logprobs += [0.0] * len(glue)
    ep.tool_results += answered.results
    ep.turn_calls += len(answered.results)
    ep.turn_penalty += penalty * sum(r.failed for r in answered.results)


def _take_turn(ep: _Episode, reply_ids: list[int], reply_logprobs: list[float], tokenizer: PreTrainedTokenizerBase,
               env_name: str, last_turn: bool, tools: list[dict] | None = None) -> None:
    """Append one generated reply (and its sampler log-probs), step the environment with its text, append the
    environment's answer (log-prob 0: the model did not sample it). The turn's reward is the environment's minus
    the penalty of the turn's failed tool calls."""
    ended = bool(reply_ids) and reply_ids[-1] == tokenizer.eos_token_id
    reply = tokenizer.decode(reply_ids, skip_special_tokens=True)
    _append_reply(ep, reply_ids, reply_logprobs, ended)
    ep.turn_ends.append(max(len(ep.response) - 1, 0))
    result = validate_step(env_name, call_env(env_name, "step()", ep.env.step, reply))
    ep.turn_rewards.append(result.reward - ep.turn_penalty)
    ep.turn_penalty = 0.0
    ep.info = result.info
    before = list(ep.conversation)
    ep.conversation += [{"role": "assistant", "content": reply}, *result.messages]
    if result.terminated or result.truncated or last_turn:
        ep.done = True
        ep.truncated = not result.terminated
        return
    glue = continuation_ids(tokenizer, before, reply, ended, result.messages, tools=tools)
    ep.response += glue
    ep.actions += [0] * len(glue)
    ep.sampler_logprobs += [0.0] * len(glue)


def _settle_penalty(ep: _Episode) -> None:
    """An episode cut off inside a turn (after tool calls, before env.step) still pays for that turn's failed
    calls: on its last turn's reward, or, if it never finished a turn, as a turn ending at its last action."""
    if not ep.turn_penalty:
        return
    if ep.turn_rewards:
        ep.turn_rewards[-1] -= ep.turn_penalty
    else:
        ep.turn_ends.append(max((i for i, a in enumerate(ep.actions) if a), default=0))
        ep.turn_rewards.append(-ep.turn_penalty)
    ep.turn_penalty = 0.0


def _collect(episodes: list[_Episode]) -> EpisodeBatch:
    for ep in episodes:
        _settle_penalty(ep)
    return EpisodeBatch(
        prompt_ids=[ep.prompt_ids for ep in episodes], response_ids=[ep.response for ep in episodes],
        action_mask=[ep.actions for ep in episodes], sampler_logprobs=[ep.sampler_logprobs for ep in episodes],
        turn_ends=[ep.turn_ends for ep in episodes],
        turn_rewards=[ep.turn_rewards for ep in episodes], last_reply_ids=[ep.last_reply for ep in episodes],
        last_reply_eos=[ep.last_eos for ep in episodes], prompts=[ep.prompt for ep in episodes],
        conversations=[ep.conversation for ep in episodes], infos=[ep.info for ep in episodes],
        success=[bool(ep.info.get("success", sum(ep.turn_rewards) > 0)) for ep in episodes],
        truncated=[ep.truncated for ep in episodes], context_truncated=[ep.context_truncated for ep in episodes],
        tool_results=[ep.tool_results for ep in episodes])
