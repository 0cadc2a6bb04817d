"""The benchmark suite in one command: every part, its tables, JSON under bench/results/, and the headline table.

    make bench                                   # = .venv/bin/python bench/run.py --readme   (~1 h on 2 cores)
    .venv/bin/python bench/run.py ppo vs-trl     # some parts only (limits are always measured first)
    .venv/bin/python bench/run.py --quick        # smoke run of every part on the tiny model (CI: tests/test_bench_suite.py)

Parts (each is also a script of its own, run here as a subprocess so one part's memory and threads never touch the
next one's numbers):
  limits    matmul peak (fp32, bf16) and memory bandwidth                              bench/limits.py
  generate  Hybrid Engine (eager, compiled) vs generate(), batch 1/8/32/64 x 64/256     bench/generate.py
  ppo, grpo one iteration by phase: seconds, tokens/s, MFU, peak RSS                   bench/rl.py
  vs-trl    PPO vs TRL's PPOTrainer, GRPO vs TRL's GRPOTrainer, same work, alternated  bench/vs_trl.py
  score     reward-model scoring of hh-rlhf pairs                                      bench/score.py
  serve     `chatrl serve` with 1 and 8 concurrent streams                             bench/serve.py
Results go to bench/results/<part>.json (vs_trl.json) (`--quick`: bench/results/quick/), the headline table to summary.md there;
`--readme` also writes it into README.md between the `bench:start` / `bench:end` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, machine, pct, table, update_readme, write_json

PARTS: dict[str, list[str]] = {
    "limits": ["limits.py"], "generate": ["generate.py"], "ppo": ["rl.py", "ppo"], "grpo": ["rl.py", "grpo"],
    "vs-trl": ["vs_trl.py"], "score": ["score.py"], "serve": ["serve.py"],
}


def run_part(name: str, out_dir: Path, quick: bool) -> float:
    """Run one part as a subprocess (its output streams through); -> seconds. A failing part stops the suite."""
    script, *rest = PARTS[name]
    cmd = [sys.executable, str(ROOT / "bench" / script), *rest, "--out", str(result_path(out_dir, name))]
    cmd += ["--quick"] if quick else []
    env = os.environ | {"CHATRL_BENCH_LIMITS": str(out_dir / "limits.json")}
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    if subprocess.run(cmd, env=env, cwd=ROOT).returncode != 0:
        sys.exit(f"bench: part '{name}' failed (its error is above); results of earlier parts are in {out_dir}")
    return time.perf_counter() - t0


def result_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name.replace('-', '_')}.json"  # vs-trl -> vs_trl.json, as the script names it


def _load(out_dir: Path, name: str) -> dict | None:
    p = result_path(out_dir, name)
    return json.loads(p.read_text()) if p.exists() else None


def _case(gen: dict, path: str, batch: int, new: int) -> dict | None:
    return next((c for c in gen["cases"] if (c["path"], c["batch"], c["new"]) == (path, batch, new)), None)


def headline(out_dir: Path) -> list[dict]:
    """The issue's targets, each with what this run measured (None where the part was not run)."""
    rows: list[dict] = []

    def add(what: str, value: float | None, target: float, kind: str, higher: bool = True, note: str = "") -> None:
        met = None if value is None else (value >= target if higher else value <= target)
        rows.append(dict(what=what, value=value, target=target, kind=kind, higher=higher, met=met, note=note))

    vs = _load(out_dir, "vs-trl")
    for algo, target in (("ppo", 4.0), ("grpo", 3.0)):
        r = (vs or {}).get("results", {}).get(f"{algo}-real") or (vs or {}).get("results", {}).get(f"{algo}-tiny")
        add(f"{algo.upper()} step vs TRL {'PPOTrainer' if algo == 'ppo' else 'GRPOTrainer'} ({r['size'] if r else '-'})",
            r["ratio"] if r else None, target, "x")
    for algo in ("ppo", "grpo"):
        d = _load(out_dir, algo)
        add(f"{algo.upper()} train phase, MFU ({d['config']['dtype'] if d else '-'})",
            d["phases"]["train"]["of_limit"] if d else None, 0.5, "%")
    d = _load(out_dir, "ppo")
    add("PPO score phase, MFU", d["phases"]["score"]["of_limit"] if d else None, 0.5, "%")
    add("PPO peak RSS / what models + grads + Adam hold", d["rss_over_budget"] if d else None, 1.3, "x", higher=False)
    s = _load(out_dir, "score")
    add("reward-model scoring (chatrl score), MFU", s["cases"]["length-sorted"]["mfu"] if s else None, 0.5, "%")
    g = _load(out_dir, "generate")
    for batch, target, limit in ((8, 0.5, "bandwidth"), (64, 0.4, "compute")):
        c = _case(g, "hybrid", batch, 64) if g else None
        add(f"decode batch {batch} x 64 (eager, refresh incl.), of the {limit} floor",
            c["of_floor"] if c else None, target, "%")
    v = _load(out_dir, "serve")
    add("serve: 8 streams / 1 stream, aggregate tokens/s", v.get("ratio") if v else None, 4.0, "x")
    return rows


def render(rows: list[dict], out_dir: Path, quick: bool) -> str:
    def fmt(x: float | None, kind: str) -> str:
        return "not run" if x is None else (pct(x) if kind == "%" else f"{x:.2f}x")

    body = table(["measure", "this run", "target", "met"],
                 [[r["what"], fmt(r["value"], r["kind"]), ("≥ " if r["higher"] else "≤ ") + fmt(r["target"], r["kind"]),
                   {True: "yes", False: "**no**", None: "—"}[r["met"]]] for r in rows])
    m = machine()
    when = {}
    for name in PARTS:
        d = _load(out_dir, name)
        stamp = (d or {}).get("machine", {}).get("measured")
        if stamp:
            when[name] = stamp.replace("T", " ")[:16]
    kind = "--quick, tiny model: a smoke run, not a result" if quick else "bench/run.py"
    return (f"{body}\n\nMeasured by `{kind}` on {m['cores']} cores ({m['cpu']}), torch {m['torch']}; parts measured at "
            + ", ".join(f"{k} {v}" for k, v in when.items())
            + f". Per-part tables and JSON: `{os.path.relpath(out_dir, ROOT)}/`.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", metavar="PART", help=f"parts to run (default: all): {', '.join(PARTS)}")
    ap.add_argument("--quick", action="store_true", help="every part's smoke run (tiny model); results in quick/")
    ap.add_argument("--out-dir", default=None, help="default bench/results (bench/results/quick with --quick)")
    ap.add_argument("--readme", action="store_true", help="write the headline table into README.md")
    ap.add_argument("--table-only", action="store_true", help="run nothing: rebuild the table from the JSONs there")
    args = ap.parse_args()
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part {unknown[0]!r}: expected one of {', '.join(PARTS)}")
    out_dir = Path(args.out_dir or (RESULTS / "quick" if args.quick else RESULTS))
    parts = ["limits"] + [p for p in (args.parts or PARTS) if p != "limits"]
    seconds = {} if args.table_only else {p: round(run_part(p, out_dir, args.quick), 1) for p in parts}
    rows = headline(out_dir)
    text = render(rows, out_dir, args.quick)
    print("\n" + text)
    (out_dir / "summary.md").write_text(text + "\n")
    write_json(out_dir / "summary.json", dict(headline=rows, part_seconds=seconds, quick=args.quick, machine=machine()))
    if args.readme:
        update_readme(text, "bench")


if __name__ == "__main__":
    main()
