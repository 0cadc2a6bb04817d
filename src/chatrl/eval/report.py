"""`write_report(run_dir)`: one self-contained HTML page (PNG charts inlined as base64) about a run.

Reads what exists under the run folder and notes what does not:
    <run>/<step>/config.yaml     the config each step used (step = sft, reward, ppo, or any other folder)
    <run>/<step>/metrics.jsonl   one JSON object per line: "step", numeric metrics, optional "split": train|eval
    <run>/eval/eval.json         `chatrl eval` results: the metrics table and per-prompt responses
    <run>/eval/eval_env.json     `chatrl eval --env` results: success rate and pass@k per model, sample episodes
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from pathlib import Path

from chatrl.errors import ChatrlError
from chatrl.eval.results import EvalResult, load_result, prompt_text, table_rows

STEP_TITLES = {"sft": "Step 1: supervised fine-tuning", "reward": "Step 2: reward model", "ppo": "Step 3: PPO",
               "grpo": "GRPO (critic-free RL in an environment)", "dpo": "DPO (offline, on preference pairs)",
               "kto": "KTO (offline, on replies labelled desirable or undesirable)", "ilql": "ILQL (offline Q-learning)", "rft": "RFT (best-of-n, then SFT)",
               "judge": "The eval's judge (a second reward model, on pairs step 2 never saw)"}
ONLY_IF_PRESENT = {"grpo", "dpo", "kto", "ilql", "rft", "judge"}  # the classic three steps get a note when missing; these are listed only when run
# metric groups, first match wins: (title, substrings of the lower-cased key)
GROUPS = [
    ("Success rate", ("success",)),
    # the RL update's health (issue 19): is anything moving, and do the sampler and the trainer agree?
    ("Update diagnostics", ("grad_norm", "clipfrac", "approx_kl", "entropy", "agreement/", "zero_variance",
                            "is_weight", "is_capped", "is_masked", "gate")),
    ("Losses", ("loss", "perplexity", "ppl")),
    ("KL", ("kl",)),
    ("Accuracy", ("acc",)),
    ("Rewards, scores and margins", ("reward", "score", "margin", "chosen", "rejected", "return", "advantage",
                                     "value")),
    ("Response length", ("len", "eos")),
    ("Throughput and time", ("tok", "throughput", "per_s", "/s", "sec", "time", "samples", "it_s")),
    ("Learning rate", ("lr", "learning_rate")),
]
NOT_PLOTTED = {"step", "split", "epoch", "time", "timestamp", "wall_time", "global_step"}  # not curves
SMOOTHING, SMOOTH_FROM = 0.6, 10  # EMA weight (TensorBoard's default) for train curves of at least SMOOTH_FROM points
MAX_SAMPLES = 20
# System fonts first, then families that cover emoji and CJK on Linux / macOS / Windows, so a reply in Chinese or
# with emoji renders as glyphs wherever such a font is installed (the page embeds no font files).
_FONTS = ("system-ui,-apple-system,'Segoe UI','Noto Sans','DejaVu Sans','Noto Sans CJK SC','Noto Sans CJK JP',"
          "'Source Han Sans SC','WenQuanYi Micro Hei','PingFang SC','Hiragino Sans','Microsoft YaHei','Malgun Gothic',"
          "'Apple Color Emoji','Segoe UI Emoji','Noto Color Emoji','Noto Emoji',sans-serif")
_CSS = """body{font-family:FONTS;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right}.note{color:#8a5a00;font-style:italic}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;white-space:pre-wrap}img{max-width:100%}
td.resp{white-space:pre-wrap;max-width:420px}.charts{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #e3e3e3;padding:6px}figcaption{font-weight:600;margin-bottom:4px}
p.headline{font-size:1.15em;background:#eef6ee;border-left:4px solid #3a7d3a;padding:8px 12px}
div.alarm{background:#fdecea;border-left:4px solid #c62828;padding:8px 12px;margin:1em 0;color:#7f1d1d}""".replace(
    "FONTS", _FONTS)


def write_report(run_dir: str | Path) -> Path:
    """Build `<run_dir>/report.html` from whatever the run folder holds; returns its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ChatrlError(f"run folder not found: {run} (expected e.g. runs/<name> written by `chatrl pipeline`)")
    body = [f"<h1>Run report: {html.escape(run.resolve().name)}</h1>",
            f"<p>Folder <code>{html.escape(str(run.resolve()))}</code>, generated "
            f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}.</p>"]
    body.append(_eval_section(run / "eval"))  # the answer first; how the steps got there follows
    if (run / "config.yaml").is_file():
        body.append(_config_block(run / "config.yaml", "Run config"))
    for step in _step_dirs(run):
        body.append(_step_section(run / step, step))
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>chatrl report: "
            f"{html.escape(run.resolve().name)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    out = run / "report.html"
    out.write_text(page, encoding="utf-8")
    return out


def _step_dirs(run: Path) -> list[str]:
    """sft, reward, ppo (always, so a missing one gets a note), then any other folder with metrics or config."""
    extra = sorted(p.name for p in run.iterdir() if p.is_dir() and p.name not in STEP_TITLES and p.name != "eval"
                   and ((p / "metrics.jsonl").is_file() or (p / "config.yaml").is_file()))
    return [s for s in STEP_TITLES if s not in ONLY_IF_PRESENT or (run / s).is_dir()] + extra


def _note(text: str) -> str:
    return f"<p class='note'>{html.escape(text)}</p>"


def _config_block(path: Path, title: str) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    return (f"<details><summary>{html.escape(title)} ({html.escape(path.name)})</summary>"
            f"<pre>{html.escape(text)}</pre></details>")


def _step_section(folder: Path, step: str) -> str:
    parts = [f"<h2 id='{html.escape(step)}'>{html.escape(STEP_TITLES.get(step, step))} "
             f"(<code>{html.escape(step)}/</code>)</h2>"]
    if not folder.is_dir():
        return parts[0] + _note(f"No {step}/ folder in this run: skipped.")
    parts.append(alarms_html(folder / "alarms.jsonl"))
    if (folder / "config.yaml").is_file():
        parts.append(_config_block(folder / "config.yaml", f"{step} config"))
    else:
        parts.append(_note(f"No {step}/config.yaml."))
    metrics_file = folder / "metrics.jsonl"
    if not metrics_file.is_file():
        parts.append(_note(f"No {step}/metrics.jsonl: no curves."))
        return "\n".join(parts)
    rows, bad = read_metrics(metrics_file)
    if bad:
        parts.append(_note(f"{bad} line(s) of {step}/metrics.jsonl were not JSON objects and were skipped."))
    series = collect_series(rows)
    if not series:
        parts.append(_note(f"{step}/metrics.jsonl has no numeric metrics."))
    once = {k: v for k, v in series.items() if all(len(xs) == 1 for xs, _ in v.values())}
    series = {k: v for k, v in series.items() if k not in once}
    if once:
        parts.append(_once_table(once))
    charts = []
    for title, keys in group_keys(list(series)).items():
        png = plot_group({k: series[k] for k in keys})
        charts.append(f"<figure><figcaption>{html.escape(title)}</figcaption>{img_tag(png, f'{step}: {title}')}"
                      "</figure>")
    if charts:
        parts.append("<div class='charts'>" + "".join(charts) + "</div>")
    return "\n".join(parts)


def _once_table(once: dict[str, dict[str, tuple[list[float], list[float]]]]) -> str:
    """Metrics logged once (a final perplexity, score percentiles): a table, not a lone dot on an empty axis."""
    rows = "".join(f"<tr><td>{html.escape(key)}</td><td>{html.escape(split)}</td><td class='num'>{xs[0]:g}</td>"
                   f"<td class='num'>{ys[0]:.4g}</td></tr>"
                   for key, splits in once.items() for split, (xs, ys) in sorted(splits.items()))
    return ("<table class='once'><tr><th>metric (logged once)</th><th>split</th><th>step</th><th>value</th></tr>"
            f"{rows}</table>")


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's debiased exponential moving average: s_t = w s_{t-1} + (1 - w) x_t from s_0 = 0, divided by
    1 - w^t, so the first point is x_1 itself rather than pulled toward 0."""
    out, last = [], 0.0
    for t, x in enumerate(values, start=1):
        last = weight * last + (1 - weight) * x
        out.append(last / (1 - weight ** t))
    return out


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """Rows of a metrics.jsonl and how many lines were unreadable (a crashed run may leave a torn last line)."""
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def collect_series(rows: list[dict]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """key -> split -> (steps, values), sorted by step, for every finite numeric value (bools are not metrics).

    A resumed run appends to metrics.jsonl and may log a step twice: the later line wins.
    """
    points: dict[str, dict[str, dict[float, float]]] = {}
    for i, row in enumerate(rows):
        step = row.get("step", i)
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            step = i
        split = str(row.get("split", "train"))
        for key, value in row.items():
            if key in NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                points.setdefault(key, {}).setdefault(split, {})[step] = value
    return {key: {split: (sorted(pts), [pts[x] for x in sorted(pts)]) for split, pts in splits.items()}
            for key, splits in points.items()}


def group_keys(keys: list[str]) -> dict[str, list[str]]:
    """Group metric keys into charts by name (see GROUPS); unmatched keys go to "Other"."""
    groups: dict[str, list[str]] = {title: [] for title, _ in GROUPS}
    groups["Other"] = []
    for key in keys:
        low = key.lower()
        title = next((t for t, subs in GROUPS if any(s in low for s in subs)), "Other")
        groups[title].append(key)
    return {t: ks for t, ks in groups.items() if ks}


def plot_group(series: dict[str, dict[str, tuple[list[float], list[float]]]]) -> bytes:
    """PNG bytes: one subplot per metric (up to 3 per row), one line per split (train first, same colours)."""
    import matplotlib  # lazy: plotting only when a report is written

    matplotlib.use("Agg")  # no display; safe to call repeatedly
    import matplotlib.pyplot as plt

    n = len(series)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.0 * rows), squeeze=False)
    for ax, (key, splits) in zip(axes.flat, series.items(), strict=False):
        for split, (xs, ys) in sorted(splits.items(), key=lambda kv: (kv[0] != "train", kv[0])):
            style = {"marker": "o", "markersize": 3} if split != "train" or len(xs) == 1 else {}
            if split == "train" and len(xs) >= SMOOTH_FROM:  # noisy per-step curve: faint raw, smoothed on top
                (raw,) = ax.plot(xs, ys, alpha=0.3, linewidth=1)
                ax.plot(xs, smooth(ys), color=raw.get_color(), label=f"{split} (smoothed {SMOOTHING})")
                continue
            ax.plot(xs, ys, label=split, **style)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(splits) > 1 or any(len(xs) >= SMOOTH_FROM for xs, _ in splits.values()):
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def img_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img class='chart' alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _env_eval_html(path: Path) -> str:
    """The `chatrl eval --env` table and a few greedy episodes per model."""
    data = json.loads(path.read_text(encoding="utf-8"))
    models = data.get("models", {})
    k = next(iter(models.values()), {}).get("k", 0)
    last = models[list(models)[-1]] if len(models) > 1 else {}
    lost = (last.get("vs_first") is not None and last.get("vs_first_se") is not None
            and last["vs_first"] <= -2 * last["vs_first_se"])
    out = [_alarm(f"{list(models)[-1]} lost to the starting model on held-out success: {last['vs_first']:+.1%}"
                  if lost else None), _headline(env_headline(models)),
           f"<p>Environment <code>{html.escape(str(data.get('env')))}</code>, held-out (eval split) tasks.</p>",
           "<table id='env-eval-table'><tr><th>model</th><th>tasks</th><th>success (greedy)</th><th>s.e.</th>"
           f"<th>pass@{k}</th><th>s.e.</th><th>mean return</th><th>vs first model (paired s.e.)</th></tr>"]
    for name, r in models.items():
        cells = [str(r["n_tasks"]), f"{r['success']:.1%}", f"{r['success_se']:.1%}", f"{r['pass_k']:.1%}",
                 f"{r['pass_k_se']:.1%}", f"{r['mean_return']:.3f}",
                 "-" if r.get("vs_first") is None else f"{r['vs_first']:+.1%} ({r['vs_first_se']:.1%})"]
        out.append(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td class='num'>{c}</td>" for c in cells)
                   + "</tr>")
    out.append("</table>")
    for name, r in models.items():
        rows = "".join(f"<tr><td>{'yes' if ex['success'] else 'no'}</td><td class='resp'>"
                       + html.escape("\n".join(f"{m['role']}: {m['content']}" for m in ex["conversation"]))
                       + "</td></tr>" for ex in r.get("examples", []))
        out.append(f"<details><summary>{html.escape(name)}: sample episodes (greedy)</summary><table>"
                   f"<tr><th>solved</th><th>conversation</th></tr>{rows}</table></details>")
    return "\n".join(out)


def _verdict(name: str, base: str, diff: float, se: float | None, unit: str) -> str:
    """One sentence comparing `name` with `base`: beat / below / level (level = under 2 paired s.e.)."""
    sig = f", {abs(diff) / se:.1f} s.e." if se else ""
    if se and abs(diff) < 2 * se:
        return f"{name} and {base} are level: {diff:+.3g} {unit}{sig} (under 2 s.e.)"
    return f"{name} {'beat' if diff > 0 else 'scored below'} {base} by {diff:+.3g} {unit}{sig}"


def eval_headline(result: EvalResult) -> str | None:
    """What changed, in one sentence: the last model against the first (e.g. "ppo beat base by +0.22 reward,
    2.7 s.e., at KL 2.6 to the reference; win rate 62%."). None without a reward to compare."""
    names = list(result.models)
    last = result.metrics.get(names[-1], {})
    gain = last.get("reward_gain")
    if len(names) < 2 or gain is None:
        return None
    text = _verdict(names[-1], names[0], gain, last.get("reward_gain_se"), "reward")
    if last.get("kl") is not None:
        text += f", at KL {last['kl']:.2f} to the reference"
    if last.get("win_rate") is not None:
        text += f"; win rate {last['win_rate']:.0%}"
    if last.get("judge_gain") is not None:  # the independent judge beside the proxy: over-optimisation shows here
        text += "; by the judge, " + _verdict(names[-1], names[0], last["judge_gain"], last.get("judge_gain_se"),
                                              "judge score")
    return text + "."


def env_headline(models: dict[str, dict]) -> str | None:
    """The last model's held-out success against the first's, with the paired s.e. of the difference."""
    names = list(models)
    if len(names) < 2 or models[names[-1]].get("vs_first") is None:
        return None
    first, last = models[names[0]], models[names[-1]]
    diff, se = last["vs_first"], last.get("vs_first_se")
    sig = f", {abs(diff) / se:.1f} s.e. (paired)" if se else ""
    return (f"{names[-1]}: held-out success {last['success']:.1%} against {first['success']:.1%} for {names[0]} "
            f"({diff * 100:+.1f} points{sig}).")


def alarms_html(path: Path) -> str:
    """A red box listing a step's alarms: the lines of its alarms.jsonl ({"step", "kind", "message"}, written by
    the RL steps' `steps.rl_alarms`); "" when it has none."""
    rows, _ = read_metrics(path) if path.is_file() else ([], 0)
    if not rows:
        return ""
    items = "".join(f"<li>iteration {r.get('step')}: <b>{html.escape(str(r.get('kind')))}</b> "
                    f"{html.escape(str(r.get('message')))}</li>" for r in rows)
    return f"<div class='alarm'><b>Alarms ({len(rows)})</b><ul>{items}</ul></div>"


def lost_to_start(result: EvalResult) -> str | None:
    """The alarm text when the last model scored below the first by 2 paired s.e. or more (reward or judge)."""
    names = list(result.models)
    last = result.metrics.get(names[-1], {}) if len(names) > 1 else {}
    for key, what in (("reward_gain", "reward model"), ("judge_gain", "judge")):
        gain, se = last.get(key), last.get(f"{key}_se")
        if gain is not None and se is not None and gain <= -2 * se:
            return f"{names[-1]} lost to the starting model {names[0]} by the {what}: {gain:+.3g} ({abs(gain) / max(se, 1e-12):.1f} s.e.)"
    return None


def _alarm(text: str | None) -> str:
    return "" if text is None else f"<div class='alarm' id='eval-alarm'><b>Alarm:</b> {html.escape(text)}</div>"


def _headline(text: str | None) -> str:
    return "" if text is None else f"<p class='headline' id='headline'>{html.escape(text)}</p>"


def _eval_section(folder: Path) -> str:
    head = "<h2 id='eval'>Evaluation (<code>eval/</code>)</h2>"
    path = folder / "eval.json"
    if not path.is_file() and (folder / "eval_env.json").is_file():
        return head + _env_eval_html(folder / "eval_env.json")
    if not path.is_file():
        return head + _note("No eval/eval.json: run `chatrl eval --model NAME=PATH ... --out RUN/eval` to add "
                            "the evaluation table and sample responses.")
    try:
        result = load_result(path)
    except ChatrlError as e:
        return head + _note(f"eval/eval.json could not be read: {e}")
    return (head + _alarm(lost_to_start(result)) + _headline(eval_headline(result)) + eval_table_html(result)
            + samples_html(result))


def eval_table_html(result: EvalResult) -> str:
    header, rows = table_rows(result)
    out = ["<table id='eval-table'><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        out.append("<tr><td>" + html.escape(r[0]) + "</td>"
                   + "".join(f"<td class='num'>{html.escape(c)}</td>" for c in r[1:]) + "</tr>")
    out.append("</table>")
    models = ", ".join(f"<code>{html.escape(n)}</code> = {html.escape(str(p))}" for n, p in result.models.items())
    settings = ", ".join(f"{html.escape(str(k))}={html.escape(str(v))}" for k, v in result.settings.items())
    out.append(f"<p>Models: {models}. Win rates are against <code>{html.escape(result.baseline)}</code>."
               f"<br>Settings: {settings}</p>")
    return "\n".join(out)


def samples_html(result: EvalResult) -> str:
    """Before/after table: each held-out prompt with every model's reply (and its reward)."""
    if not result.samples:
        return _note("eval.json has no per-prompt responses.")
    names = list(result.models)
    shown = result.samples[:MAX_SAMPLES]
    has_ref = any(s.get("reference") for s in shown)
    head = ["prompt"] + (["reference"] if has_ref else []) + names
    out = [f"<h3>Responses to held-out prompts ({len(shown)} of {len(result.samples)})</h3>",
           "<table id='samples'><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for s in shown:
        cells = [html.escape(prompt_text(s.get("prompt", [])))]
        if has_ref:
            cells.append(html.escape(s.get("reference") or ""))
        for n in names:
            text = html.escape(s.get("responses", {}).get(n, "") or "(empty)")
            reward = s.get("rewards", {}).get(n)
            cells.append(text + (f"<br><small>reward {reward:.3f}</small>" if reward is not None else ""))
        out.append("<tr>" + "".join(f"<td class='resp'>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)
