"""`chatrl data inspect FILE...` and `chatrl data prepare --config YAML --out DIR`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from chatrl.config import DataConfig, SFTConfig
from chatrl.configbase import load_config
from chatrl.data.clean import DataReport
from chatrl.data.prepare import Dataset, load_all_records, read_examples
from chatrl.data.schemas import SCHEMAS
from chatrl.data.templates import render
from chatrl.models.loading import load_tokenizer
from chatrl.paths import atomic_write, atomic_write_json

HIST_BINS = 10
BAR_WIDTH = 40


def register(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="inspect and prepare training data")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    inspect = sub.add_parser("inspect", help="show schema, row counts, drops and token lengths of data files")
    inspect.add_argument("files", nargs="+", metavar="FILE", help="data files/folders/hub names or builtin:NAME")
    inspect.add_argument("--tokenizer", default="tiny-random",
                         help="tokenizer for the length histogram (model alias or folder; 'none' to skip)")
    inspect.add_argument("--schema", default="auto", help=f"force a schema: auto, {', '.join(SCHEMAS)}")
    inspect.add_argument("--skip-bad-rows", action="store_true", help="count bad rows instead of failing")
    inspect.set_defaults(func=cmd_inspect)
    prepare = sub.add_parser("prepare", help="write the split shards as JSONL plus report.json")
    prepare.add_argument("--config", default=None, help="step config YAML (its data section is used)")
    prepare.add_argument("--out", required=True, help="output folder")
    prepare.add_argument("overrides", nargs="*", help="config overrides like data.split=1,0,0")
    prepare.set_defaults(func=cmd_prepare)
    data.set_defaults(func=lambda args: data.print_help() or 1)


# ----------------------------------------------------------------------------- inspect


def inspect_tokenizer(name: str) -> Any:
    """The tokenizer `--tokenizer` names, loaded as every step loads it (`models.loading.load_tokenizer`); None for
    'none'."""
    return None if name.lower() == "none" else load_tokenizer(name)


def token_lengths(tokenizer: Any, ds: Dataset) -> list[int]:
    """Token count of every example rendered as a whole conversation (prompt + chosen/final reply)."""
    texts = []
    for ex in ds.examples:
        msgs = list(ex.messages) + ([{"role": "assistant", "content": ex.response}] if ex.response else [])
        texts.append(render(tokenizer, msgs))
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def histogram(values: list[int], bins: int = HIST_BINS) -> list[tuple[int, int, int]]:
    """Equal-width bins over [min, max]: (low, high, count) with low inclusive, high inclusive."""
    lo, hi = min(values), max(values)
    width = max(1, -(-(hi - lo + 1) // bins))  # ceil division so every value falls in a bin
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, (v - lo) // width)] += 1
    return [(lo + i * width, lo + (i + 1) * width - 1, c) for i, c in enumerate(counts) if lo + i * width <= hi]


def _print_dataset(console: Any, ds: Dataset, report: DataReport, lengths: list[int] | None) -> None:
    pairs = sum(e.is_pair for e in ds.examples)
    replies = sum(e.response is not None for e in ds.examples)
    columns = {"schema": ds.schema, "rows read": report.read[ds.spec], "rows kept": len(ds.examples), "pairs": pairs,
               "with reply": replies, "prompt only": len(ds.examples) - replies}
    labels = [e.label for e in ds.examples if e.label is not None]
    if labels:  # KTO rows: the class balance kto.desirable_weight / undesirable_weight are chosen by
        columns.update({"desirable": sum(labels), "undesirable": len(labels) - sum(labels)})
    table = Table(title=f"{ds.spec}", show_header=True)
    for col in columns:
        table.add_column(col)
    table.add_row(*(str(v) for v in columns.values()))
    console.print(table)
    if report.dropped:
        drops = Table(title="dropped rows", show_header=True)
        drops.add_column("reason")
        drops.add_column("count")
        drops.add_column("first rows", overflow="fold")
        for reason, n in sorted(report.dropped.items()):
            drops.add_row(reason, str(n), ", ".join(report.examples.get(reason, [])))
        console.print(drops)
    else:
        console.print("dropped rows: none")
    if lengths:
        mean = sum(lengths) / len(lengths)
        console.print(f"tokens per conversation: min {min(lengths)}  mean {mean:.0f}  max {max(lengths)}")
        peak = max(c for _, _, c in histogram(lengths))
        for low, high, count in histogram(lengths):
            bar = "#" * round(BAR_WIDTH * count / peak) if peak else ""
            console.print(f"  {low:>6}-{high:<6} {count:>6} {bar}", highlight=False)


def cmd_inspect(args: argparse.Namespace) -> int:
    console = Console()
    tokenizer = inspect_tokenizer(args.tokenizer)
    for spec in args.files:
        cfg = DataConfig(paths=[spec], schema=args.schema, skip_bad_rows=args.skip_bad_rows)
        report = DataReport()
        ds = read_examples(spec, cfg, report)
        lengths = token_lengths(tokenizer, ds) if tokenizer is not None else None
        _print_dataset(console, ds, report, lengths)
        for note in report.notes:
            console.print(f"note: {note}", highlight=False)
    return 0


# ----------------------------------------------------------------------------- prepare


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg = load_config(SFTConfig, args.config, args.overrides).data
    shards, report = load_all_records(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in shards.items():
        lines = "".join(json.dumps(dataclasses.asdict(r), ensure_ascii=False, default=str) + "\n" for r in records)
        atomic_write(out / f"{name}.jsonl", lines)
    atomic_write_json(out / "report.json", {"config": dataclasses.asdict(cfg), **report.to_dict()}, ensure_ascii=False)
    print(report.summary())
    print(f"wrote {', '.join(f'{k}.jsonl ({len(v)})' for k, v in shards.items())} and report.json to {out}")
    return 0
