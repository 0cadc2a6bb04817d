"""Sub-commands `chatrl eval`, `chatrl compare`, `chatrl score` and `chatrl report`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from chatrl.envs.commands import parse_kwargs
from chatrl.errors import ChatrlError
from chatrl.eval.compare import compare_models, print_comparison
from chatrl.eval.env_eval import evaluate_env, save_env_result
from chatrl.eval.evaluate import evaluate_models
from chatrl.eval.records import as_prompts, read_records
from chatrl.eval.report import write_report
from chatrl.eval.responses import load_reward
from chatrl.eval.results import rich_table, save_result
from chatrl.eval.score import print_scores, score_records, write_jsonl


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate models: reward, win rate, KL, length, diversity, BLEU/ROUGE; "
                                           "or success rate and pass@k in an environment (--env)",
                              description="Generate with each model on the same prompts and compare them "
                                          "(eval.json, eval.md), or play the environment's held-out tasks with "
                                          "each model (--env: eval_env.json, eval_env.md).")
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="a model to evaluate (repeatable); the first is the baseline for win rates")
    p.add_argument("--env", metavar="SPEC", help="an environment (built-in name or pkg.mod:Class / file.py:Class): "
                                                 "success rate (greedy) and pass@k on its held-out (eval) tasks")
    p.add_argument("--env-kwargs", default="{}", metavar="JSON", help="the environment's constructor kwargs")
    p.add_argument("--tasks", type=int, default=100, help="held-out tasks per model (--env)")
    p.add_argument("--k", type=int, default=4, help="samples per task for pass@k (--env; 0 = skip)")
    p.add_argument("--max-turns", type=int, default=1, help="most assistant turns per episode (--env)")
    _prompt_args(p, prompts_required=False)
    p.add_argument("--reward-model", metavar="PATH", help="reward model folder: reward mean/std and win rate")
    p.add_argument("--judge", metavar="PATH", help="a second reward model, trained on other pairs: judge_mean and "
                                                   "judge_gain beside the reward model's (over-optimisation shows)")
    p.add_argument("--reference", metavar="PATH", help="reference (SFT) model for the KL metric")
    p.add_argument("--out", default="runs/eval", metavar="DIR", help="output folder (default: runs/eval)")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("compare", help="side-by-side responses of a baseline and a trained model",
                              description="Print both models' responses to each prompt (greedy by default).")
    p.add_argument("--baseline", required=True, metavar="PATH", help="baseline model (e.g. the SFT model)")
    p.add_argument("--model", required=True, metavar="PATH", help="the model to compare (e.g. the PPO actor)")
    _prompt_args(p, default_limit=8)
    p.add_argument("--plain", action="store_true", help="plain two-column text instead of a table")
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser("score", help="score every row of a data file with a reward model",
                              description="Per-row reward scores; for chosen/rejected pairs also the accuracy.")
    p.add_argument("--model", required=True, metavar="RM_PATH", help="reward model folder")
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL: pairs, prompt+response, or messages")
    p.add_argument("--output", metavar="OUT.jsonl", help="write the per-row scores here")
    p.add_argument("--limit", type=int, help="score only the first N rows")
    _skip_arg(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_score)

    p = subparsers.add_parser("report", help="(re)build RUN_DIR/report.html from a run folder")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. runs/<name>")
    p.set_defaults(func=cmd_report)


def _prompt_args(p: argparse.ArgumentParser, default_limit: int | None = None, prompts_required: bool = True) -> None:
    p.add_argument("--prompts", required=prompts_required, metavar="FILE",
                   help="JSONL with 'prompt' (+ optional 'reference') or hh-rlhf 'chosen'/'rejected' rows")
    p.add_argument("--limit", type=int, default=default_limit, help="use only the first N prompts")
    _skip_arg(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)


def _skip_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed lines (counted, first reason printed) instead of stopping at the first one")


def _parse_models(specs: list[str]) -> dict[str, str]:
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ChatrlError(f"--model {spec!r}: expected NAME=PATH, e.g. --model sft=runs/demo/sft/final")
        if name in models:
            raise ChatrlError(f"--model: the name {name!r} is used twice; give each model its own name")
        models[name] = path
    return models


def _read_records(args, path: str):
    """The records of `path` under the command's --limit and --skip-bad-rows."""
    if args.limit is not None and args.limit < 1:
        raise ChatrlError("--limit must be at least 1")
    return read_records(path, args.limit, skip_bad=args.skip_bad_rows, log=_log)


def _load_prompts(args):

    return as_prompts(_read_records(args, args.prompts))


def _log(msg: str) -> None:
    print(f"[chatrl eval] {msg}", file=sys.stderr)


def cmd_eval(args) -> int:

    models = _parse_models(args.model)
    if args.env:
        return _eval_env(args, models)
    if not args.prompts:
        raise ChatrlError("chatrl eval needs --prompts FILE (or --env SPEC for an environment)")
    prompts = _load_prompts(args)
    result = evaluate_models(models, prompts, reward_model=args.reward_model, judge_model=args.judge,
                             reference_model=args.reference,
                             max_new_tokens=args.max_new_tokens, greedy=not args.sample,
                             temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                             seed=args.seed, log=_log)
    json_path, md_path = save_result(result, args.out)
    Console().print(rich_table(result))
    print(f"wrote {json_path} and {md_path}")
    return 0


def _eval_env(args, models: dict[str, str]) -> int:

    results = evaluate_env(models, args.env, parse_kwargs(args.env_kwargs, "--env-kwargs"), n_tasks=args.tasks, k=args.k,
                           temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                           max_turns=args.max_turns, batch_size=args.batch_size, seed=args.seed, log=_log)
    path = save_env_result(results, Path(args.out), args.env)
    print(f"wrote {path}")
    return 0


def cmd_compare(args) -> int:
    prompts = _load_prompts(args)
    rows = compare_models(args.baseline, args.model, prompts, max_new_tokens=args.max_new_tokens,
                          greedy=not args.sample, temperature=args.temperature, top_p=args.top_p,
                          batch_size=args.batch_size, seed=args.seed)
    print_comparison(rows, (args.baseline, args.model), "sample" if args.sample else "greedy", plain=args.plain)
    return 0


def cmd_score(args) -> int:
    records = _read_records(args, args.data)
    rm, tok = load_reward(args.model)
    rows = score_records(rm, tok, records, batch_size=args.batch_size)
    print_scores(rows)
    if args.output:
        print(f"wrote {write_jsonl(rows, args.output)}")
    return 0


def cmd_report(args) -> int:
    print(f"wrote {write_report(args.run_dir)}")
    return 0
