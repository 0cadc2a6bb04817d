"""Tool-use demonstrations from an environment's reference solutions (`chatrl.envs.demos`, `chatrl env demos`), the
pipeline's `sft_demos` and `eval.without_tools`, and configs/demo-tools.yaml's pipeline on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatrl.config import DataConfig, PipelineConfig
from chatrl.configbase import load_config
from chatrl.data.prepare import load_records
from chatrl.data.templates import render, with_tool_fallback
from chatrl.data.tokenize import encode_conversation, encode_prompt
from chatrl.envs.arithmetic import ArithmeticEnv
from chatrl.envs.demos import demo_rows, play_solution
from chatrl.envs.registry import make_env
from chatrl.errors import ChatrlError
from chatrl.eval.env_eval import no_tools
from chatrl.models.loading import load_tokenizer
from chatrl.steps.pipeline import build_plan, default_steps
from chatrl.tools.parsers import parse_hermes
from chatrl.tools.toolbox import ToolOptions, toolbox_for
from helpers import run_cli

CONFIG = "configs/demo-tools.yaml"
MUL = {"digits": 2, "ops": ["*"]}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_demonstration_calls_the_calculator_and_answers_with_its_result() -> None:
    rows = demo_rows("arithmetic", MUL, 3, ToolOptions(tools=["calculator"]), progress=False)
    assert len(rows) == 3
    for task, row in enumerate(rows):
        a, _, b = ArithmeticEnv(**MUL).problem_for("train", task)
        question, call, result, answer = row["messages"]
        assert [t["function"]["name"] for t in row["tools"]] == ["calculator"]
        assert question == {"role": "user", "content": f"What is {a} * {b}? Reply with the final answer as a number."}
        (parsed,) = parse_hermes(call["content"])
        assert call["role"] == "assistant" and (parsed.name, parsed.arguments) == ("calculator",
                                                                                   {"expression": f"{a}*{b}"})
        assert result == {"role": "tool", "name": "calculator", "content": str(a * b)}  # the tool really ran
        assert answer == {"role": "assistant", "content": f"The answer is {a * b}."}


def test_without_tools_the_demonstration_is_the_answer_alone() -> None:
    (row,) = demo_rows("arithmetic", MUL, 1, None, progress=False)
    a, _, b = ArithmeticEnv(**MUL).problem_for("train", 0)
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"] and "tools" not in row
    assert row["messages"][1]["content"] == f"The answer is {a * b}."


class WrongOnOdd(ArithmeticEnv):
    """A reference solution that is wrong on odd tasks: those episodes must not become demonstrations."""

    def _start(self, split, task):
        self.task = task
        return super()._start(split, task)

    def solution(self, tools):
        steps = super().solution(tools)
        return steps if self.task % 2 == 0 else [*steps[:-1], "The answer is 1."]


class NoSolution(ArithmeticEnv):
    solution = None


def test_failed_or_missing_solutions_write_no_rows() -> None:
    env = WrongOnOdd(**MUL)
    box = toolbox_for(env, "wrong", ToolOptions(tools=["calculator"]))
    assert play_solution(env, "wrong", "train", 1, 0, box) is None
    assert play_solution(env, "wrong", "train", 2, 0, box)[-1]["content"].startswith("The answer is ")
    with pytest.raises(ChatrlError, match="no solution"):
        play_solution(NoSolution(**MUL), "nosol", "train", 0, 0, box)


def test_chat_rows_with_tool_results_are_read_and_trained_on_the_replies_only(tok, tmp_path: Path) -> None:
    rows = demo_rows("arithmetic", MUL, 4, ToolOptions(tools=["calculator"]), progress=False)
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = load_records(DataConfig(paths=[str(path)], split="1,0,0", eval_fraction=0.0), "sft", "train")
    assert len(records) == 4
    conv = next(r for r in records if r.messages == rows[0]["messages"])  # the tool message keeps its name
    assert conv.tools == rows[0]["tools"]
    enc = encode_conversation(tok, conv, max_length=1024)
    # the SFT row starts with exactly the prompt a GRPO episode with the calculator shows (the fallback system message
    # with the schema, as SmolLM2's template has no tool support) and is the rendered conversation, nothing else
    prompt = encode_prompt(tok, conv.messages[:1], 1024, tools=conv.tools)
    assert enc["input_ids"][:len(prompt)] == prompt and "<tools>" in tok.decode(prompt)
    assert tok.decode(enc["input_ids"]) == render(tok, with_tool_fallback(tok, conv.messages, conv.tools))
    path.write_text(json.dumps({**rows[0], "tools": "calculator"}) + "\n")
    with pytest.raises(ChatrlError, match="'tools'.*list of function schemas"):
        load_records(DataConfig(paths=[str(path)], split="1,0,0", eval_fraction=0.0), "sft", "train")
    trained = tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != -100])
    a, _, b = ArithmeticEnv(**MUL).problem_for("train", 0)
    assert "<tool_call>" in trained and f"The answer is {a * b}." in trained
    assert "What is" not in trained and f"\n{a * b}<|im_end|>" not in trained  # question and tool result: not trained


def test_no_tools_drops_config_and_kwargs_tools_but_keeps_the_options() -> None:
    settings = ToolOptions(tools=["calculator"], max_tool_calls=2, tool_error_penalty=0.5)
    kwargs, plain = no_tools({**MUL, "tools": ["python"]}, settings)
    assert kwargs == MUL and plain.tools == [] and plain.max_tool_calls == 2 and plain.tool_error_penalty == 0.5
    assert toolbox_for(make_env("arithmetic", kwargs), "arithmetic", plain) is None


def test_sft_demos_plan_trains_step_1_on_the_demonstrations_then_grpo_from_it(tmp_path: Path) -> None:
    cfg = load_config(PipelineConfig, path=CONFIG, overrides=[f"run_dir={tmp_path}"])
    plan = build_plan(cfg)
    assert default_steps(plan) == [1, 3] and plan.inputs()[3] == 1
    assert plan.sft.data.paths == [str(tmp_path / "demos.jsonl")] and plan.sft.data.split == "1,0,0"
    assert plan.rl.actor.name_or_path == str(tmp_path / "sft" / "model")
    assert plan.rl.env.tools == ["calculator"]
    bad = load_config(PipelineConfig, path="configs/tiny-pipeline.yaml", overrides=["sft_demos=10"])
    with pytest.raises(ChatrlError, match="sft_demos=10"):  # PPO on chat prompts: no environment to write them
        build_plan(bad)


def test_demo_tools_config_runs_on_the_tiny_model(tmp_path: Path, tiny_model_dir) -> None:
    run = tmp_path / "run"
    proc = run_cli("pipeline", "--config", CONFIG, f"run_dir={run}", "model.name_or_path=tiny-random",
                   "model.dtype=fp32", "sft_demos=8", "sft.model.trainable_layers=1", "grpo.actor.trainable_layers=1",
                   "sft.optim.max_steps=2", "sft.optim.micro_batch_size=4",
                   "sft.logging.progress=false", "grpo.grpo.iterations=1", "grpo.rollout.prompts_per_rollout=2",
                   "grpo.rollout.samples_per_prompt=2", "grpo.rollout.max_new_tokens=8", "grpo.grpo.micro_batch_size=4",
                   "grpo.rollout.inference_dtype=fp32", "grpo.logging.progress=false", "grpo.checkpoint.every=0",
                   "eval.env_tasks=4", "eval.max_new_tokens=8", "eval.batch_size=4", "eval.dtype=fp32")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len((run / "demos.jsonl").read_text().splitlines()) == 8
    assert (run / "sft" / "model" / "config.json").exists() and (run / "grpo" / "actor" / "config.json").exists()
    assert str(run / "sft" / "model") in (run / "grpo" / "config.yaml").read_text()
    models = json.loads((run / "eval" / "eval_env.json").read_text())["models"]
    assert list(models) == ["base_no_tools", "base", "sft", "grpo"]
    assert all(m["n_tasks"] == 4 and m["vs_first"] is not None for m in list(models.values())[1:])
    assert models["base_no_tools"]["called_tools"] == 0
    assert "base_no_tools" in (run / "report.html").read_text()


def test_env_demos_command_writes_rows_sft_reads_and_refuses_an_env_without_solutions(tmp_path: Path) -> None:
    out = tmp_path / "demos.jsonl"
    proc = run_cli("env", "demos", "arithmetic", "--kwargs", json.dumps(MUL), "--n", "2", "--tools", "calculator",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and [m["role"] for m in rows[1]["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert rows[1]["tools"][0]["function"]["name"] == "calculator"
    proc = run_cli("env", "demos", "guess_number", "--n", "2", "--out", str(out))
    assert proc.returncode == 2 and "no solution(tools) method" in proc.stderr and "Traceback" not in proc.stderr
