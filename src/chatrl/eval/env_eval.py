"""`chatrl eval --env SPEC`: success rate and pass@k of several models in an environment, on held-out tasks.

Tasks come from the environment's `eval` split (training plays `train`: the built-ins keep them disjoint), task
numbers 0..n-1, so every model meets the same problems. Per model:
- success rate: greedy episodes; standard error sqrt(p (1 - p) / n) over the n tasks (`metrics.proportion_se`);
- pass@k: k sampled episodes per task (temperature `temperature`), the share of tasks solved at least once
  (k samples drawn, so this is the plain estimator; s.e. over tasks as above);
- mean return (sum of the environment's per-turn rewards);
- against the first model: the per-task difference of greedy success (this model minus the first), its mean and
  paired standard error (`metrics.paired_difference`: the same tasks for every model, so the paired s.e. is the
  honest measure of "clearly better").
Episodes are played by the same code as training (`rollout.episodes`), with the model in a Hybrid Engine.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from chatrl.envs.registry import make_env
from chatrl.eval.metrics import mean_se, paired_difference, proportion_se
from chatrl.eval.responses import load_policy
from chatrl.models.loading import resolve_dtype
from chatrl.rollout.episodes import EpisodeBatch, Task, run_episodes
from chatrl.rollout.hybrid import HybridEngine
from chatrl.rollout.sampling import GenerationSettings
from chatrl.tools.toolbox import ToolOptions, ToolSettings


@dataclass
class EnvScore:
    """One model's result on n held-out tasks."""

    success: float
    success_se: float
    pass_k: float
    pass_k_se: float
    k: int
    mean_return: float
    n_tasks: int
    per_task: list[bool]  # greedy success per task
    examples: list[dict]  # a few greedy conversations, for the report
    vs_first: float | None = None     # mean per-task success difference to the first model
    vs_first_se: float | None = None  # its paired standard error
    return_se: float = float("nan")   # standard error of the mean return over the tasks
    called_tools: float = 0.0         # share of greedy episodes that called a tool at least once
    failed_calls: float = 0.0         # failed tool calls (malformed, raised, timed out) per greedy episode

    def line(self, name: str) -> str:
        diff = "" if self.vs_first is None else f"   vs first {self.vs_first:+.1%} (s.e. {self.vs_first_se:.1%})"
        return (f"{name:<12} success {self.success:6.1%} (s.e. {self.success_se:.1%})   "
                f"pass@{self.k} {self.pass_k:6.1%} (s.e. {self.pass_k_se:.1%})   "
                f"return {self.mean_return:.3f} (s.e. {self.return_se:.3f}){diff}")


def score_tasks(success: list[bool], returns: list[float], solved: list[bool], k: int,
                examples: list[dict]) -> EnvScore:
    """One model's EnvScore from its greedy episodes (success and return per task) and `solved` (per task: one of
    its k sampled episodes succeeded); whoever played them (a local model, an OpenAI-compatible endpoint)."""
    n = len(success)
    rate, pass_k = sum(success) / n, sum(solved) / n
    return EnvScore(rate, proportion_se(rate, n), pass_k, proportion_se(pass_k, n), k, sum(returns) / n, n,
                    list(success), examples, return_se=mean_se(returns))


def _play(engine: HybridEngine, tok, env_name: str, kwargs: dict, tasks: list[Task], settings: GenerationSettings,
          max_turns: int, max_context: int, batch_size: int, tool_settings: ToolSettings | None = None) -> EpisodeBatch:
    envs = [make_env(env_name, kwargs) for _ in range(min(batch_size, len(tasks)))]
    out = EpisodeBatch()
    for start in range(0, len(tasks), batch_size):
        out = out + run_episodes(engine, tok, envs, env_name, tasks[start:start + batch_size], settings,
                                 max_turns=max_turns, max_prompt_tokens=max_context // 2, max_context=max_context,
                                 tool_settings=tool_settings)
    return out


def evaluate_env(models: dict[str, str], env_name: str, kwargs: dict, *, n_tasks: int = 100, k: int = 4,
                 temperature: float = 1.0, max_new_tokens: int = 64, max_turns: int = 1, max_context: int = 1024,
                 batch_size: int = 32, seed: int = 0, dtype: str = "auto",
                 log: Callable[[str], None] = print, tool_settings: ToolSettings | None = None,
                 without_tools: Sequence[str] = ()) -> dict[str, EnvScore]:
    """`without_tools`: names of models that play with no tools offered (`no_tools`)."""
    results = {}
    for name, path in models.items():
        kw, ts = no_tools(kwargs, tool_settings) if name in without_tools else (kwargs, tool_settings)
        model, tok = load_policy(path, dtype=dtype)
        engine = HybridEngine(model, inference_dtype=resolve_dtype(dtype), release_after_rollout=False)
        greedy = GenerationSettings(max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False)
        tasks = [Task("eval", t, seed + t) for t in range(n_tasks)]
        played = _play(engine, tok, env_name, kw, tasks, greedy, max_turns, max_context, batch_size, ts)
        solved = [False] * n_tasks
        if k > 0:
            sampled = GenerationSettings(max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=True,
                                         temperature=temperature, seed=seed)
            many = _play(engine, tok, env_name, kw, [t for t in tasks for _ in range(k)], sampled, max_turns,
                         max_context, batch_size, ts)
            for i, ok in enumerate(many.success):
                solved[i // k] |= ok
        examples = [{"conversation": c, "success": s} for c, s in zip(played.conversations[:8], played.success[:8],
                                                                      strict=True)]
        score = score_tasks(list(played.success), [sum(r) for r in played.turn_rewards], solved, k, examples)
        score.called_tools = sum(bool(r) for r in played.tool_results) / n_tasks
        score.failed_calls = sum(c.failed for r in played.tool_results for c in r) / n_tasks
        if results:  # this model minus the first, task by task
            diff = paired_difference(score.per_task, next(iter(results.values())).per_task)
            score.vs_first, score.vs_first_se = diff.mean, diff.se
        results[name] = score
        log(score.line(name))
    return results


def no_tools(kwargs: dict, settings: ToolSettings | None) -> tuple[dict, ToolOptions]:
    """The environment's kwargs and tool options with no tools offered: env.tools and env.kwargs.tools dropped (tools
    an environment class declares itself stay: they are part of it)."""
    return {k: v for k, v in kwargs.items() if k != "tools"}, ToolOptions(
        tools=[], **{f: getattr(settings, f) for f in ("tool_parser", "max_tool_calls", "tool_timeout",
                                                        "tool_error_penalty")} if settings is not None else {})


def save_env_result(results: dict[str, EnvScore], out: Path, env_name: str) -> Path:
    """eval_env.json (every number) and eval_env.md (a table) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_env.json").write_text(json.dumps({"env": env_name, "models": {n: asdict(r) for n, r in
                                                                               results.items()}}, indent=1))
    k = next(iter(results.values())).k if results else 0
    lines = [f"| model | success (greedy) | s.e. | pass@{k} | s.e. | mean return | vs first (paired s.e.) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {r.success:.1%} | {r.success_se:.1%} | {r.pass_k:.1%} | {r.pass_k_se:.1%} | "
              f"{r.mean_return:.3f} | {'-' if r.vs_first is None else f'{r.vs_first:+.1%} ({r.vs_first_se:.1%})'} |"
              for n, r in results.items()]
    (out / "eval_env.md").write_text("\n".join(lines) + "\n")
    return out / "eval_env.json"
