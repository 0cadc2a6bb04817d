"""Tool calls inside episodes, with a scripted "model" (hand-written replies, log-prob -0.5 per token) and the tiny
model's tokenizer: the calling reply is an action (mask 1), the tool result is environment tokens (mask 0, sampler
log-prob 0), the model replies again in the same turn and env.step() gets only the reply that calls no tool; the
per-turn call budget, the error penalty and concurrency across episodes."""

from __future__ import annotations

import contextlib
import time

import torch

from chatrl.batches import pad_rows
from chatrl.models.loading import load_tokenizer
from chatrl.rollout.episodes import Task, run_episodes
from chatrl.rollout.sampling import GenerationSettings
from chatrl.tools.toolbox import ToolOptions
from tool_fixtures import AddEnv, slow_add

CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
LOGP = -0.5


class ScriptedEngine:
    """Stands in for the HybridEngine: call k of generate() answers row i with script[k][i] (+ EOS)."""

    device = torch.device("cpu")
    zero3 = False

    def __init__(self, tok, script: list[list[str]]) -> None:
        self.tok, self.script, self.calls = tok, script, 0

    @contextlib.contextmanager
    def inference_mode(self):
        yield

    def generate(self, ids, mask, settings, *, eos_token_id, pad_token_id, synced, return_logprobs):
        replies = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        rows = [self.tok(replies[i % len(replies)], add_special_tokens=False)["input_ids"] + [eos_token_id]
                for i in range(ids.shape[0])]
        out, out_mask = pad_rows(rows, pad_token_id, "right")
        return out, out_mask, torch.full(out.shape, LOGP) * out_mask


def play(script, envs, max_context=4096, **options):
    tok = load_tokenizer("tiny-random")
    engine = ScriptedEngine(tok, script)
    settings = GenerationSettings(max_new_tokens=48, do_sample=False)
    batch = run_episodes(engine, tok, envs, "adder", [Task("train", i, i) for i in range(len(envs))], settings,
                         max_turns=1, max_prompt_tokens=1024, max_context=max_context,
                         tool_settings=ToolOptions(**options))
    return tok, engine, batch


def spans(mask):
    """[(value, length)] runs of a 0/1 mask."""
    out = []
    for m in mask:
        if out and out[-1][0] == m:
            out[-1][1] += 1
        else:
            out.append([m, 1])
    return [tuple(s) for s in out]


def test_tool_result_is_environment_tokens_and_step_gets_the_final_reply():
    env = AddEnv()
    tok, engine, batch = play([[CALL], ["The answer is 5."]], [env])
    assert engine.calls == 2 and env.stepped == ["The answer is 5."]
    assert batch.turn_rewards == [[1.0]] and batch.success == [True]
    roles = [m["role"] for m in batch.conversations[0]]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert batch.conversations[0][2] == {"role": "tool", "name": "add", "content": "5"}
    ids, mask, lps = batch.response_ids[0], batch.action_mask[0], batch.sampler_logprobs[0]
    call_ids = tok(CALL, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    final_ids = tok("The answer is 5.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # the calling reply (mask 1), the tool message up to the next generation prompt (mask 0), the final reply
    runs = spans(mask)
    assert runs[0] == (1, len(call_ids)) and runs[1][0] == 0 and runs[2] == (1, len(final_ids)) and len(runs) == 3
    assert ids[:len(call_ids)] == call_ids and ids[-len(final_ids):] == final_ids
    env_part = tok.decode([t for t, m in zip(ids, mask, strict=True) if m == 0])
    assert env_part == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
    assert lps == [LOGP if m else 0.0 for m in mask]
    assert batch.turn_ends == [[len(ids) - 1]]  # the turn's reward sits on the final reply's last token
    assert [(r.name, r.content, r.status) for r in batch.tool_results[0]] == [("add", "5", "ok")]
    # the prompt offers the tool (SmolLM2's template has no tools variable: the fallback system message)
    prompt = tok.decode(batch.prompt_ids[0])
    assert prompt.startswith("<|im_start|>system\nYou can call tools.") and '"name": "add"' in prompt


def test_max_tool_calls_per_turn_then_the_reply_goes_to_step():
    env = AddEnv()
    tok, engine, batch = play([[CALL]], [env], max_tool_calls=2)  # the model never stops calling
    assert engine.calls == 3 and len(batch.tool_results[0]) == 2
    assert env.stepped == [CALL]  # the third call was not run: that reply is the turn's answer
    call_ids = tok(CALL, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert sum(batch.action_mask[0]) == 3 * len(call_ids) and batch.turn_rewards == [[0.0]]
    assert [m["role"] for m in batch.conversations[0]] == ["user", "assistant", "tool", "assistant", "tool",
                                                            "assistant"]


def test_no_calls_allowed_with_max_tool_calls_0():
    env = AddEnv()
    _, engine, batch = play([[CALL]], [env], max_tool_calls=0)
    assert engine.calls == 1 and env.stepped == [CALL] and batch.tool_results == [[]]


def test_failed_calls_are_counted_and_penalised():
    env = AddEnv()
    bad = '<tool_call>{"name": "mul", "arguments": {}}</tool_call> <tool_call>{"name": "add"</tool_call>'
    _, _, batch = play([[bad], ["It is 5."]], [env], tool_error_penalty=0.25)
    assert [r.status for r in batch.tool_results[0]] == ["malformed", "malformed"]
    assert batch.turn_rewards == [[1.0 - 2 * 0.25]]
    assert "unknown tool 'mul'" in batch.conversations[0][2]["content"]


def test_an_episode_cut_off_after_a_failed_call_still_pays_the_penalty():
    bad = '<tool_call>{"name": "mul", "arguments": {}}</tool_call>'
    _, _, full = play([[bad], ["5"]], [AddEnv()])
    prompt = len(full.prompt_ids[0])
    env = AddEnv()  # room for the first reply only: after the call's result the context is full
    _, engine, batch = play([[bad], ["5"]], [env], max_context=prompt + 48 + 1, tool_error_penalty=0.5)
    assert engine.calls == 1 and env.stepped == [] and batch.context_truncated == [True]
    last_action = max(i for i, a in enumerate(batch.action_mask[0]) if a)
    assert batch.turn_rewards == [[-0.5]] and batch.turn_ends == [[last_action]]


def test_calls_of_all_episodes_run_together():
    envs = [AddEnv(tools=(slow_add,)) for _ in range(4)]
    slow = CALL.replace('"add"', '"slow_add"')
    t0 = time.perf_counter()
    _, engine, batch = play([[slow], ["5"]], envs)
    assert time.perf_counter() - t0 < 1.4  # one after the other: 4 x 0.4 s
    assert engine.calls == 2 and all(r[0].content == "5" for r in batch.tool_results)
    assert all(e.stepped == ["5"] for e in envs)


def test_a_hanging_tool_times_out_and_the_episode_goes_on():
    from tool_fixtures import RELEASE, hang

    RELEASE.clear()
    env = AddEnv(tools=(hang,))
    try:
        _, _, batch = play([['<tool_call>{"name": "hang", "arguments": {"a": 1}}</tool_call>'], ["5"]], [env],
                           tool_timeout=0.2)
    finally:
        RELEASE.set()
    assert batch.tool_results[0][0].status == "timeout" and env.stepped == ["5"]
    assert batch.conversations[0][2]["content"] == "Error: hang timed out after 0.2 s"


class CounterEnv(AddEnv):
    """Its tool is a method bound to the instance: each episode's calls must reach its own environment."""

    def __init__(self) -> None:
        super().__init__(tools=())
        self.count = 0
        self.tools = (self.bump,)

    def bump(self, by: int) -> int:
        """Add to this episode's counter.

        Args:
            by: How much.
        """
        self.count += by
        return self.count


def test_each_episode_calls_its_own_environments_tools():
    envs = [CounterEnv() for _ in range(3)]
    call = '<tool_call>{"name": "bump", "arguments": {"by": 2}}</tool_call>'
    _, _, batch = play([[call], [call], ["done"]], envs)
    assert [e.count for e in envs] == [4, 4, 4]  # two calls each, none on another episode's environment
    assert [[r.content for r in rs] for rs in batch.tool_results] == [["2", "4"]] * 3
