"""`EvalResult`: what `chatrl eval` produces, and its JSON / Markdown / terminal-table forms.

eval.json layout (read back by `chatrl report`):
    {"version": 1,
     "models": {name: path, ...},                 # in order; the first is the baseline for win rates
     "settings": {"max_new_tokens": ..., "greedy": ..., "num_prompts": ..., "reward_model": ..., ...},
     "metrics": {name: {metric: float | null}},   # keys in METRICS
     "samples": [{"prompt": [messages], "reference": str | null,
                  "responses": {name: str}, "rewards": {name: float}, "kl": {name: float}}]}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.table import Table
from rich.text import Text

from chatrl.errors import ChatrlError

# metric key -> (column title, format); the order is the table order
METRICS: dict[str, tuple[str, str]] = {
    "reward_mean": ("reward", "{:.3f}"),
    "reward_std": ("reward std", "{:.3f}"),
    "win_rate": ("win rate vs baseline", "{:.1%}"),
    "reward_gain": ("reward - baseline", "{:+.3f}"),
    "reward_gain_se": ("(s.e.)", "{:.3f}"),
    "reward_wins": ("wins", "{:.0f}"),      # prompts where the model's reward beat the baseline's
    "reward_losses": ("losses", "{:.0f}"),  # ... and fell below it (the rest tie)
    "judge_mean": ("judge", "{:.3f}"),      # a second reward model, trained on other pairs (eval.judge)
    "judge_gain": ("judge - baseline", "{:+.3f}"),
    "judge_gain_se": ("(s.e.)", "{:.3f}"),
    "kl": ("KL to ref", "{:.3f}"),
    "length_mean": ("length (tok)", "{:.1f}"),
    "eos_rate": ("EOS rate", "{:.0%}"),
    "distinct_1": ("distinct-1", "{:.3f}"),
    "distinct_2": ("distinct-2", "{:.3f}"),
    "bleu": ("BLEU", "{:.2f}"),
    "rouge1": ("ROUGE-1", "{:.3f}"),
    "rouge2": ("ROUGE-2", "{:.3f}"),
    "rougeL": ("ROUGE-L", "{:.3f}"),
}


@dataclass
class EvalResult:
    models: dict[str, str]
    settings: dict = field(default_factory=dict)
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)

    @property
    def baseline(self) -> str:
        return next(iter(self.models))

    def to_json(self) -> dict:
        clean = {m: {k: _finite(v) for k, v in vals.items()} for m, vals in self.metrics.items()}
        return {"version": 1, **asdict(self), "metrics": clean}

    @classmethod
    def from_json(cls, data: dict, where: str = "eval.json") -> EvalResult:
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict) or not data["models"]:
            raise ChatrlError(f"{where}: not an eval result (needs a non-empty 'models' object); "
                              "regenerate it with `chatrl eval`")
        return cls(models=data["models"], settings=data.get("settings", {}), metrics=data.get("metrics", {}),
                   samples=data.get("samples", []))


def _finite(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def columns(result: EvalResult) -> list[str]:
    """Metric keys that at least one model has a value for, in table order."""
    return [k for k in METRICS if any(_finite(m.get(k)) is not None for m in result.metrics.values())]


def table_rows(result: EvalResult) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows (one per model), shared by the terminal, Markdown and HTML tables."""
    keys = columns(result)
    header = ["model"] + [METRICS[k][0] for k in keys]
    rows = []
    for name in result.models:
        vals = result.metrics.get(name, {})
        cells = []
        for k in keys:
            v = _finite(vals.get(k))
            cells.append("-" if v is None else METRICS[k][1].format(v))
        rows.append([name] + cells)
    return header, rows


def prompt_text(messages: list[dict]) -> str:
    """The last user message (what a reader needs to judge a reply)."""
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else (messages[-1]["content"] if messages else "")


def to_markdown(result: EvalResult, max_samples: int = 10) -> str:
    header, rows = table_rows(result)
    lines = ["# Evaluation", "", f"Baseline for win rates: `{result.baseline}`", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in result.settings.items()), ""]
    if result.samples:
        lines += [f"## Sample responses (first {min(max_samples, len(result.samples))})", ""]
        for i, s in enumerate(result.samples[:max_samples], 1):
            lines += [f"### Prompt {i}", "", _quote(prompt_text(s["prompt"])), ""]
            for name, text in s["responses"].items():
                reward = s.get("rewards", {}).get(name)
                tag = f" (reward {reward:.3f})" if reward is not None else ""
                lines += [f"**{name}**{tag}:", "", _quote(text or "(empty)"), ""]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in text.splitlines()) or "> "


def rich_table(result: EvalResult):
    """Terminal table with one row per metric and one column per model (fits 80 columns for a few models)."""
    header, rows = table_rows(result)
    table = Table(title=Text(f"Evaluation on {result.settings.get('num_prompts', '?')} prompts "
                             f"(win rate vs {result.baseline})"))
    table.add_column("metric")
    for r in rows:
        table.add_column(Text(r[0]), justify="right")
    for i, title in enumerate(header[1:], 1):
        table.add_row(Text(title), *(Text(r[i]) for r in rows))
    return table


def save_result(result: EvalResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write eval.json and eval.md into `out_dir`; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "eval.json", out / "eval.md"
    json_path.write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(to_markdown(result), encoding="utf-8")
    return json_path, md_path


def load_result(path: str | Path) -> EvalResult:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ChatrlError(f"cannot read eval results {path}: {e}") from e
    return EvalResult.from_json(data, str(path))
