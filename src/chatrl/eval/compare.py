"""`chatrl compare`: the responses of a baseline and a trained model to the same prompts, side by side
(what DeepSpeed-Chat's prompt_eval.py prints), greedy by default."""

from __future__ import annotations

import gc
import itertools
import shutil
import textwrap
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from chatrl.data.types import Prompt
from chatrl.eval import responses as R
from chatrl.eval.results import prompt_text


def compare_models(baseline: str, model: str, prompts: Sequence[Prompt], *, max_new_tokens: int = 128,
                   greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8,
                   seed: int = 0) -> list[dict]:
    """One row per prompt: {"prompt": str, "baseline": str, "model": str}. Models load one at a time."""
    msgs = [p.messages for p in prompts]
    texts = []
    for path in (baseline, model):
        m, tok = R.load_policy(path)
        texts.append(R.generate(m, tok, msgs, max_new_tokens=max_new_tokens, greedy=greedy,
                                temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed).texts)
        del m
        gc.collect()
    return [{"prompt": prompt_text(p.messages), "baseline": a, "model": b}
            for p, a, b in zip(prompts, texts[0], texts[1], strict=True)]


def side_by_side(left: str, right: str, width: int, gap: str = " | ") -> str:
    """Two texts as wrapped columns of `width` characters each, joined line by line."""
    def wrap(text: str) -> list[str]:
        lines = []
        for para in (text or "(empty)").splitlines() or [""]:
            lines.extend(textwrap.wrap(para, width) or [""])
        return lines

    rows = itertools.zip_longest(wrap(left), wrap(right), fillvalue="")
    return "\n".join(f"{a:<{width}}{gap}{b}".rstrip() for a, b in rows)


def format_plain(rows: Sequence[dict], names: tuple[str, str], mode: str, width: int | None = None) -> str:
    """Plain two-column text: for each prompt, the prompt and then both responses side by side."""
    total = width or shutil.get_terminal_size((120, 20)).columns
    col = max(20, (total - 3) // 2)
    out = []
    for i, r in enumerate(rows, 1):
        out.append(f"{'=' * 10} Prompt {i} {'=' * 10}")
        out.append(textwrap.fill(r["prompt"], col * 2 + 3) or "(empty)")
        out.append(side_by_side(f"[{names[0]}: {mode}]", f"[{names[1]}: {mode}]", col))
        out.append(side_by_side(r["baseline"], r["model"], col))
        out.append("")
    return "\n".join(out)


def print_comparison(rows: Sequence[dict], names: tuple[str, str], mode: str, plain: bool = False) -> None:
    if plain:
        print(format_plain(rows, names, mode))
        return

    table = Table(title=Text(f"{names[0]} vs {names[1]} ({mode})"), show_lines=True)
    table.add_column("#", justify="right")
    table.add_column("prompt", ratio=1)
    table.add_column(Text(f"baseline: {names[0]}"), ratio=2)
    table.add_column(Text(f"model: {names[1]}"), ratio=2)
    for i, r in enumerate(rows, 1):
        table.add_row(str(i), Text(r["prompt"]), Text(r["baseline"] or "(empty)"), Text(r["model"] or "(empty)"))
    Console().print(table)
