"""Tool-call counts of a rollout for the step's metrics: tool/calls, tool/errors (every call answered with an error:
malformed, raised, unprintable or timed out), tool/timeouts, tool/malformed, tool/calls_per_episode and the mean
latency of each tool, tool/latency_s/NAME (over the calls that ran; malformed calls never run)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from chatrl.tools.runner import ToolResult

COUNTS = ("tool/calls", "tool/errors", "tool/timeouts", "tool/malformed")
Reduce = Callable[..., dict[str, float]]


def _local(results: Sequence[Sequence[ToolResult]], names: Sequence[str]) -> dict[str, float]:
    flat = [r for rs in results for r in rs]
    values = {"tool/calls": float(len(flat)), "tool/errors": float(sum(r.failed for r in flat)),
              "tool/timeouts": float(sum(r.status == "timeout" for r in flat)),
              "tool/malformed": float(sum(r.status == "malformed" for r in flat)),
              "tool/episodes": float(len(results))}
    for name in names:
        ran = [r for r in flat if r.name == name and r.status != "malformed"]
        values[f"tool/_latency_sum/{name}"] = sum(r.latency for r in ran)
        values[f"tool/_ran/{name}"] = float(len(ran))
    return values


def tool_metrics(results: Sequence[Sequence[ToolResult]], names: Sequence[str],
                 reduce: Reduce | None = None) -> dict[str, float]:
    """Metrics of the tool results of each episode. `reduce(values, sums=keys)` sums them over processes
    (`engine.collectives.global_means`); every process passes the same `names` (the declared tools), so every
    rank reduces the same keys."""
    values = _local(results, names)
    if reduce is not None:
        values = reduce(values, sums=frozenset(values))
    out = {k: values[k] for k in COUNTS}
    out["tool/calls_per_episode"] = values["tool/calls"] / max(values["tool/episodes"], 1.0)
    for name in names:
        ran = values[f"tool/_ran/{name}"]
        out[f"tool/latency_s/{name}"] = values[f"tool/_latency_sum/{name}"] / ran if ran else 0.0
    return out
