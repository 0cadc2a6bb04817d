"""`chatrl score`: a reward model's score for every row of a data file.

Pair rows (chosen/rejected) get both scores, their margin and whether chosen won (accuracy = mean of that);
single rows (prompt + response, or a conversation ending with an assistant turn) get one score; bare prompts
are scored with their reference reply.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from chatrl.data.types import Conversation, PreferencePair
from chatrl.errors import ChatrlError
from chatrl.eval import responses as R
from chatrl.eval.records import Record
from chatrl.eval.results import prompt_text
from chatrl.log import progress_bar


def score_records(rm, tok, records: Sequence[Record], batch_size: int = 8, progress: bool = True) -> list[dict]:
    """One output row per record: pairs -> chosen/rejected scores, margin, correct; others -> score. `progress`:
    a bar over the replies scored (a pair is two), with rate and ETA."""
    prompts, replies, where = [], [], []  # flat list of (prompt, reply) to score, with (record, slot)
    for i, r in enumerate(records):
        if isinstance(r, PreferencePair):
            prompts += [r.prompt_messages, r.prompt_messages]
            replies += [r.chosen, r.rejected]
            where += [(i, "chosen_score"), (i, "rejected_score")]
        elif isinstance(r, Conversation):
            prompts.append(r.messages[:-1])
            replies.append(r.messages[-1]["content"])
            where.append((i, "score"))
        elif r.reference is not None:
            prompts.append(r.messages)
            replies.append(r.reference)
            where.append((i, "score"))
        else:
            raise ChatrlError(f"{r.source}: nothing to score; give a 'response', a 'reference', or "
                              "'chosen' and 'rejected'")
    with progress_bar(len(replies), "scoring", unit="reply", enabled=progress) as bar:
        scores = R.reward_scores(rm, tok, prompts, replies, batch_size=batch_size, advance=bar.update)
    rows: list[dict] = [{"source": r.source} for r in records]
    for (i, slot), s in zip(where, scores, strict=True):
        rows[i][slot] = s
    for r, row in zip(records, rows, strict=True):
        if isinstance(r, PreferencePair):
            row["prompt"] = prompt_text(r.prompt_messages)
            row["margin"] = row["chosen_score"] - row["rejected_score"]
            row["correct"] = row["margin"] > 0
        else:
            msgs = r.messages[:-1] if isinstance(r, Conversation) else r.messages
            row["prompt"] = prompt_text(msgs)
            row["response"] = r.messages[-1]["content"] if isinstance(r, Conversation) else r.reference
    return rows


def pair_accuracy(rows: Sequence[dict]) -> float | None:
    """Fraction of pair rows where the chosen reply scored higher (None when there are no pairs)."""
    flags = [row["correct"] for row in rows if "correct" in row]
    return sum(flags) / len(flags) if flags else None


def write_jsonl(rows: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def print_scores(rows: Sequence[dict], max_rows: int = 50) -> None:
    pairs = any("correct" in r for r in rows)
    table = Table(title=f"Reward scores ({len(rows)} rows)")
    table.add_column("source")
    table.add_column("prompt", ratio=1)
    cols = ["chosen_score", "rejected_score", "margin"] if pairs else ["score"]
    for c in cols:
        table.add_column(c.replace("_", " "), justify="right")
    if pairs:
        table.add_column("ok")
    for r in rows[:max_rows]:
        cells = [f"{r[c]:.3f}" if c in r else "-" for c in cols]
        ok = ["yes" if r.get("correct") else "no" if "correct" in r else "-"] if pairs else []
        table.add_row(Text(r["source"].rsplit("/", 1)[-1]), Text(r["prompt"][:200]), *cells, *ok)
    console = Console()
    console.print(table)
    if len(rows) > max_rows:
        console.print(f"... {len(rows) - max_rows} more rows (all are in the JSONL output)")
    acc = pair_accuracy(rows)
    if acc is not None:
        console.print(f"pair accuracy (chosen scored above rejected): {acc:.1%} "
                      f"over {sum('correct' in r for r in rows)} pairs")
