"""`chatrl users add|list` and `chatrl feedback stats|export`: the people and the feedback in a `chatrl serve --db`
database.

The store modules are imported when a command runs: SQLAlchemy and Alembic are the optional `feedback` extra, and
`chatrl --help` should not wait for them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from chatrl.errors import ChatrlError


def register(subparsers: Any) -> None:
    users = subparsers.add_parser("users", help="people allowed to use `chatrl serve --db` (API keys)")
    sub = users.add_subparsers(dest="users_command", metavar="ACTION")
    add = sub.add_parser("add", help="add a user and print their new API key (stored only as a hash)")
    add.add_argument("name", help="user name: letters, digits, '.', '_', '@', '-'")
    _db_arg(add)
    add.add_argument("--admin", action="store_true", help="may read and export everyone's conversations")
    add.set_defaults(func=cmd_users_add)
    listing = sub.add_parser("list", help="list the users")
    _db_arg(listing)
    listing.set_defaults(func=cmd_users_list)
    users.set_defaults(func=lambda args: users.print_help() or 1)

    feedback = subparsers.add_parser("feedback", help="what users said about the served replies: stats, export")
    sub = feedback.add_subparsers(dest="feedback_command", metavar="ACTION")
    stats = sub.add_parser("stats", help="counts of replies and feedback per model version, rating and user")
    _db_arg(stats)
    stats.set_defaults(func=cmd_stats)
    export = sub.add_parser("export", help="write feedback as training data (JSONL)")
    _db_arg(export)
    export.add_argument("--format", required=True, choices=["pairs", "kto", "sft"],
                        help="pairs: preference rows for `chatrl dpo`/`chatrl reward` (regenerate choices and "
                             "edits); kto: rated replies with a true/false label; sft: liked replies as chats")
    export.add_argument("--out", required=True, help="the JSONL file to write")
    export.add_argument("--model-version", default=None, help="only replies written by this model version")
    export.add_argument("--since", default=None, help="only feedback given at or after this UTC date/time (ISO)")
    export.add_argument("--user", default=None, help="only feedback given by this user")
    export.set_defaults(func=cmd_export)
    board = sub.add_parser("leaderboard", help="rank the model versions by the users' choices between their replies "
                                               "(arena): Bradley-Terry and Elo with 95%% intervals")
    _db_arg(board)
    board.add_argument("--prior", type=float, default=0.1,
                       help="ridge prior lambda on the Bradley-Terry strengths, s ~ N(0, 1/lambda): keeps a model "
                            "that won every time finite (default 0.1; 0 = plain maximum likelihood)")
    board.add_argument("--elo-k", type=float, default=32.0, help="Elo update size K (default 32)")
    board.add_argument("--rounds", type=int, default=200, help="bootstrap resamples for the Elo interval (default 200)")
    board.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    board.add_argument("--since", default=None, help="only choices made at or after this UTC date/time (ISO)")
    board.add_argument("--user", default=None, help="only choices made by this user")
    board.set_defaults(func=cmd_leaderboard)
    feedback.set_defaults(func=lambda args: feedback.print_help() or 1)


def _db_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the database of `chatrl serve --db` (a file or SQLAlchemy URL)")


def _store(db: str):
    try:
        from chatrl.feedback.db import open_db
        from chatrl.feedback.store import FeedbackStore
    except ModuleNotFoundError as e:  # the optional extra is missing
        raise ChatrlError(f"the feedback commands need {e.name}: pip install 'chatrl[feedback]'") from None
    return FeedbackStore(open_db(db))


def cmd_users_add(args: argparse.Namespace) -> int:
    store = _store(args.db)
    key = store.add_user(args.name, admin=args.admin)
    print(f"chatrl users: added {'admin ' if args.admin else ''}{args.name!r}; their API key (shown only now):",
          file=sys.stderr)
    print(key)
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    table = Table("user", "admin", "API key", "created")
    for u in _store(args.db).users():
        table.add_row(u["name"], "yes" if u["admin"] else "", "yes" if u["has_key"] else "none (local)", u["created"])
    Console().print(table)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from chatrl.feedback.export import stats  # lazy: the optional extra (see the module docstring)

    tables = stats(_store(args.db).db)
    console = Console()
    for title, (columns, rows) in tables.items():
        table = Table(*columns, title=title)
        for row in rows:
            table.add_row(*(str(x) for x in row))
        console.print(table)
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from chatrl.feedback.export import Filters, parse_since  # lazy: the optional extra (see the module docstring)
    from chatrl.feedback.leaderboard import comparisons, leaderboard, model_names

    if args.prior < 0 or args.rounds < 1 or args.elo_k <= 0:
        raise ChatrlError("--prior must be >= 0, --rounds >= 1 and --elo-k > 0")
    db = _store(args.db).db
    found = comparisons(db, Filters(user=args.user, since=parse_since(args.since) if args.since else None))
    rows = leaderboard(found, prior=args.prior, k=args.elo_k, rounds=args.rounds, seed=args.seed)
    if not rows:
        raise ChatrlError(f"--db {args.db}: no choices between replies of two different model versions yet (serve "
                          f"two models with `chatrl serve --arena --model a=PATH --model b=PATH --db ...`)")
    names = model_names(db, [r["model_version"] for r in rows])
    table = Table("rank", "model", "version", "comparisons", "wins", "Bradley-Terry s ± 1.96 s.e.",
                  "BT as Elo", "Elo", "Elo 95% (bootstrap)",
                  title=f"{len(found)} comparisons; Bradley-Terry with ridge prior {args.prior:g} (s.e. from the "
                        f"Hessian); Elo K={args.elo_k:g}, interval from {args.rounds} resamples (seed {args.seed})")
    for rank, r in enumerate(rows, 1):
        table.add_row(str(rank), names[r["model_version"]], r["model_version"], str(r["comparisons"]), str(r["wins"]),
                      f"{r['bt']:+.3f} ± {1.96 * r['bt_se']:.3f}", f"{r['bt_elo']:.0f}", f"{r['elo']:.0f}",
                      f"{r['elo_low']:.0f} .. {r['elo_high']:.0f}")
    Console().print(table)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from chatrl.feedback.export import Filters, export_rows, parse_since, write_jsonl  # lazy: the optional extra

    filters = Filters(model_version=args.model_version, user=args.user,
                      since=parse_since(args.since) if args.since else None)
    result = export_rows(_store(args.db).db, args.format, filters, progress=True)
    out = write_jsonl(result.rows, args.out)
    print(f"chatrl feedback export: {len(result.rows)} {args.format} rows -> {out} (from {result.events} feedback "
          f"events: {result.superseded} replaced by the same user's later feedback, {result.duplicates} "
          f"duplicates, {result.other_version} of other model versions, {result.unusable} unusable)",
          file=sys.stderr)
    return 0
