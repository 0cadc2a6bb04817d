"""Sub-commands `chatrl chat` (terminal) and `chatrl serve` (OpenAI-compatible server + web page)."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import sys

from transformers.utils import logging as hf_logging

from chatrl.errors import ChatrlError
from chatrl.serve.chat import ChatSession, run_chat
from chatrl.serve.generation import ChatModel, SamplingSettings
from chatrl.serve.server import create_app, run_server


def register(subparsers: argparse._SubParsersAction) -> None:
    chat = subparsers.add_parser("chat", help="chat with a model in the terminal (or through a pipe)",
                                 description="Multi-turn chat; commands: /clear, /system TEXT, /save FILE, /quit. "
                                             "With piped stdin, each line is one user turn.")
    _model_args(chat)
    chat.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    chat.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    chat.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    chat.add_argument("--seed", type=int, default=None, help="make the answers reproducible")
    chat.add_argument("--verbose", "-v", action="store_true", help="print token counts after each answer (stderr)")
    chat.set_defaults(func=_run_chat)

    serve = subparsers.add_parser("serve", help="serve an OpenAI-compatible API and a web chat page",
                                  description="POST /v1/chat/completions, GET /v1/models, GET /health, and a chat "
                                              "page at /.")
    _model_args(serve, repeat=True)
    serve.add_argument("--arena", action="store_true",
                       help="serve two or more models named with --model NAME=PATH (needs --db): the page shows two "
                            "anonymous replies side by side and stores which one the user prefers; POST /v1/arena "
                            "for scripts; `chatrl feedback leaderboard` ranks the models")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    serve.add_argument("--api-key", default=os.environ.get("CHATRL_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $CHATRL_API_KEY, else no key)")
    serve.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: folder name)")
    serve.add_argument("--max-active", type=int, default=8, help="sequences decoded at once (default 8)")
    serve.add_argument("--max-queue", type=int, default=256, help="requests allowed to wait (default 256)")
    serve.add_argument("--default-max-tokens", type=int, default=256,
                       help="answer length when a request gives no max_tokens (default 256)")
    serve.add_argument("--db", default=None,
                       help="store every conversation and take feedback (POST /v1/feedback) in this SQLite file, or "
                            "any SQLAlchemy URL for several server processes; its users (`chatrl users add`) "
                            "need their API keys (default: remember nothing)")
    serve.add_argument("--rate-limit", type=int, default=0,
                       help="requests per minute per API key, per server process (default 0: no limit)")
    serve.add_argument("--watch", default=None, metavar="RUN_DIR",
                       help="serve the newest model folder under RUN_DIR (e.g. runs/x: its sft/model, ppo/actor, "
                            "...) and switch to new weights as training writes them; in-flight answers finish on "
                            "the old model (POST /admin/reload does the same on demand)")
    serve.add_argument("--watch-interval", type=float, default=10.0,
                       help="seconds between looks at --watch RUN_DIR (default 10)")
    serve.set_defaults(func=_run_serve)


def _model_args(parser: argparse.ArgumentParser, repeat: bool = False) -> None:
    parser.add_argument("--model", required=True, action="append" if repeat else "store",
                        help="HF chat model folder, or a built-in alias (tiny-random, smollm2-135m-instruct)" +
                             ("; with --arena, NAME=PATH, once per model" if repeat else ""))
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="auto = bf16 if the CPU supports it natively, else fp32")
    parser.add_argument("--context-window", type=int, default=None,
                        help="token window (default and maximum: the model's max_position_embeddings)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a folder whose only weights are pickle files (pytorch_model.bin): they can run "
                             "code when loaded, so only for files you trust")
    parser.add_argument("--ilql-beta", type=float, default=None,
                        help="Q-guided decoding for a model trained with `chatrl ilql`: logits + beta * (Q - V); "
                             "0 = the plain LM (default: the beta saved with the model's ILQL heads)")


def _check_positive(**values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ChatrlError(f"--{name.replace('_', '-')} must be > 0 (got {value})")


def _quiet_loading() -> None:
    """No weight-loading progress bar in a terminal chat or a server log."""
    hf_logging.disable_progress_bar()


def _run_chat(args: argparse.Namespace) -> int:
    _check_positive(max_new_tokens=args.max_new_tokens, top_p=args.top_p, context_window=args.context_window)
    if args.temperature < 0 or args.top_p > 1:
        raise ChatrlError("--temperature must be >= 0 and --top-p in (0, 1]")
    _quiet_loading()
    chat = _load_chat_model(args)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
    return run_chat(ChatSession(chat, settings, system=args.system), verbose=args.verbose)


def _run_serve(args: argparse.Namespace) -> int:
    _check_positive(max_active=args.max_active, max_queue=args.max_queue, rate_limit=args.rate_limit or None,
                    watch_interval=args.watch_interval,
                    default_max_tokens=args.default_max_tokens, context_window=args.context_window)
    if not 0 <= args.port <= 65535:
        raise ChatrlError(f"--port must be in 0..65535 (got {args.port})")
    if not args.api_key and not _is_loopback(args.host):
        print(f"chatrl serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              f"address can use the model", file=sys.stderr)
    if args.watch is not None and not os.path.isdir(args.watch):
        raise ChatrlError(f"--watch {args.watch}: not a folder (give a run folder such as runs/demo)")
    models = _served_models(args)
    args.model, first = models.pop(0)
    args.model_name = args.model_name or first
    print(f"chatrl serve: loading {args.model} ...", file=sys.stderr, flush=True)
    _quiet_loading()
    arena = {name: _load_chat_model(args, path) for path, name in models} or None
    app = create_app(args.model, api_key=args.api_key, dtype=args.dtype, context_window=args.context_window,
                     max_active=args.max_active, max_queue=args.max_queue,
                     default_max_tokens=args.default_max_tokens, model_name=args.model_name,
                     chat=_load_chat_model(args), db=args.db, rate_limit=args.rate_limit,
                     load=lambda path: _load_chat_model(args, path), watch=args.watch,
                     watch_interval=args.watch_interval, arena=arena)
    if app.state.recorder is not None:
        _say_who(app.state.recorder.store)
    run_server(app, host=args.host, port=args.port)
    return 0


def _served_models(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(path, name) of each --model: one plain PATH, or with --arena two or more NAME=PATH with distinct names."""
    if not args.arena:
        if len(args.model) > 1:
            raise ChatrlError("--model given more than once: serving several models is the arena (--arena, with "
                              "--model NAME=PATH for each)")
        return [(args.model[0], None)]
    if len(args.model) < 2 or args.db is None or args.watch is not None:
        raise ChatrlError("--arena needs two or more --model NAME=PATH and --db FILE (and no --watch)")
    pairs = [spec.partition("=") for spec in args.model]
    names = [name for name, eq, path in pairs]
    if any(not eq or not name or not path for name, eq, path in pairs) or len(set(names)) != len(names):
        raise ChatrlError(f"--arena --model {args.model}: expected NAME=PATH for each model, with distinct names "
                          f"(e.g. --model old=runs/x/sft/model --model new=runs/x/kto/model)")
    return [(path, name) for name, _, path in pairs]


def _say_who(store) -> None:
    """Without users, anyone who reaches the server is the one local user: say so."""
    if store.has_users():
        print(f"chatrl serve: storing conversations in {store.db.url}; API keys of its users required",
              file=sys.stderr)
    else:
        print(f"chatrl serve: storing conversations in {store.db.url}; no users yet: every request is the one "
              f"local user (`chatrl users add NAME --db ...` to require keys)", file=sys.stderr)


def _load_chat_model(args: argparse.Namespace, path: str | None = None) -> ChatModel:
    """The model to chat with / serve (`path`: another folder with the same options: a reload); says on stderr
    when its ILQL heads guide decoding."""
    if args.ilql_beta is not None and not math.isfinite(args.ilql_beta):
        raise ChatrlError(f"--ilql-beta must be a finite number (got {args.ilql_beta})")
    chat = ChatModel(path or args.model, dtype=args.dtype, context_window=args.context_window, ilql_beta=args.ilql_beta,
                     allow_pickle=args.allow_pickle)
    if chat.guidance is not None:
        print(f"chatrl: ILQL heads found: Q-guided decoding with beta={chat.guidance.beta:g} "
              f"(--ilql-beta 0 for the plain LM)", file=sys.stderr)
    return chat


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
