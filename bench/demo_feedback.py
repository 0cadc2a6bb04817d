"""The feedback demo (issue 21): the dialog system learns from the people who use it, with simulated people.

    make demo-feedback                                       # SmolLM2-135M-Instruct, README block demo-feedback-auto
    .venv/bin/python bench/demo_feedback.py --model tiny-random --prompts 8 --arena-prompts 8 ...  # a smoke run

1. The users' taste: a reward model (the rater) trained on the shipped hh-rlhf harmless sample's sft + rlhf shards
   (as `chatrl pipeline`'s judge). Nothing the trainer sees comes from it but the users' feedback.
2. `chatrl serve --db RUN/chat.db` on the model; each simulated user has an API key (`FeedbackStore.add_user`) and
   chats through the real HTTP API with the official `openai` client, on prompts of the reward shard (which the
   rater never saw): two sampled replies per prompt (n=2), the one the rater scores higher rated up, the other down,
   and chosen over it.
3. `chatrl feedback export --format kto`, then `chatrl kto` on the export alone; `POST /admin/reload` swaps the
   served model to the trained one (the version the server reports must change).
4. The arena: `chatrl serve --arena --model old=MODEL --model new=RUN/kto/model` on the same database; the same users
   send other held-out prompts (the rlhf shard's eval part, held out of the rater too) to `POST /v1/arena`, choose by
   the rater, and post the pair (`POST /v1/feedback`), whose answer names the model that won.

Result: the share of arena choices won by the new model (ties, i.e. two identical replies, left out) with its
standard error sqrt(p (1 - p) / n), whether it is beyond 2 s.e. of 50%, and `chatrl feedback leaderboard`'s
Bradley-Terry strengths (Hessian s.e.); printed, written as JSON, and with --readme into README's block.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
from common import RESULTS, ROOT, table, update_readme, write_json
from tqdm import tqdm

from chatrl.config import DataConfig
from chatrl.data.prepare import load_records
from chatrl.eval.metrics import proportion_se
from chatrl.eval.responses import load_reward, reward_scores
from chatrl.feedback.db import open_db
from chatrl.feedback.leaderboard import comparisons, leaderboard
from chatrl.feedback.store import FeedbackStore
from chatrl.serve.reload import model_version

DATA = "builtin:hh-rlhf-harmless"
SPLIT, EVAL_FRACTION = "2,5,3", 0.15  # the demo pipeline's shares: sft / reward / rlhf
MARKER = "demo-feedback-auto"
URL = re.compile(r"chat page at (http://\S+)/ ")
CHATRL = str(Path(sys.executable).with_name("chatrl"))


def chatrl(*args: str) -> None:
    print(f"\n=== chatrl {' '.join(args)}", flush=True)
    if subprocess.run([CHATRL, *args], cwd=ROOT).returncode != 0:
        sys.exit(f"demo-feedback: chatrl {args[0]} failed (its error is above)")


def prompts(step: str, part: str, n: int) -> list[list[dict]]:
    """The first `n` prompts of a shard of the shipped sample, as message lists."""
    cfg = DataConfig(paths=[DATA], split=SPLIT, eval_fraction=EVAL_FRACTION, max_length=144, max_prompt_length=64)
    records, _ = load_records(cfg, step, part)
    found = [r.prompt_messages if step == "reward" else r.messages for r in records][:n]
    if len(found) < n:
        sys.exit(f"demo-feedback: the {step}/{part} shard has {len(found)} prompts; asked for {n}")
    return found


class Rater:
    """The simulated users' taste: a reward model's score; one scoring at a time (the users are threads)."""

    def __init__(self, path: Path):
        self.model, self.tok = load_reward(str(path))
        self.lock = threading.Lock()

    def scores(self, prompt: list[dict], replies: list[str]) -> list[float]:
        with self.lock:
            return reward_scores(self.model, self.tok, [prompt] * len(replies), replies)


class Server:
    """`chatrl serve ARGS --port 0` in the background, its output in files; `url` once it listens."""

    def __init__(self, logs: Path, *args: str, timeout: float = 900):
        logs.mkdir(parents=True, exist_ok=True)
        self.out, self.err = logs / "serve.out", logs / "serve.err"
        self.proc = subprocess.Popen([CHATRL, "serve", *args, "--port", "0"], cwd=ROOT, stdout=self.out.open("w"),
                                     stderr=self.err.open("w"))
        deadline = time.monotonic() + timeout
        while not (found := URL.search(self.out.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"demo-feedback: chatrl serve did not start: {self.err.read_text()[-3000:]}")
            time.sleep(0.5)
        self.url = found.group(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


def add_users(db: Path, n: int) -> tuple[list[str], str]:
    """Keys of `n` simulated users and of an admin (who may reload the model)."""
    store = FeedbackStore(open_db(db))
    stamp = time.strftime("%Y%m%d%H%M%S")  # a rerun on the same database adds new people
    keys = [store.add_user(f"sim{i}-{stamp}") for i in range(n)]
    admin = store.add_user(f"admin-{stamp}", admin=True)
    store.db.close()
    return keys, admin


def in_parallel(work, items: list, keys: list[str], desc: str) -> list:
    """`work(key, item)` for every item, item i by user i % len(keys), one thread per user."""
    out: list = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc, unit="prompt")

    def user(k: int) -> None:
        for i in range(k, len(items), len(keys)):
            out[i] = work(keys[k], items[i])
            bar.update(1)

    with ThreadPoolExecutor(len(keys)) as pool:
        list(pool.map(user, range(len(keys))))  # list(): a user's exception is raised here
    bar.close()
    return out


def give_feedback(url: str, rater: Rater, args: argparse.Namespace):
    """One user turn of phase 2: chat (n=2), rate both replies by the rater, choose the better."""
    def turn(key: str, prompt: list[dict]) -> int:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=2, timeout=600)
        done = client.chat.completions.create(model="served", messages=prompt, n=2, temperature=args.temperature,
                                              max_tokens=args.max_tokens)
        texts, ids = [c.message.content for c in done.choices], done.model_extra["completion_ids"]
        if texts[0] == texts[1]:
            return 0  # nothing to prefer
        scores = rater.scores(prompt, texts)
        better, worse = (0, 1) if scores[0] >= scores[1] else (1, 0)
        post(url, key, {"completion_id": ids[better], "rating": 1})
        post(url, key, {"completion_id": ids[worse], "rating": -1})
        post(url, key, {"prompt_id": done.model_extra["prompt_id"], "chosen_id": ids[better],
                        "rejected_id": ids[worse]})
        return 2
    return turn


def arena_choice(url: str, rater: Rater, args: argparse.Namespace):
    """One arena turn: two anonymous replies, the rater's choice posted; returns 1 (new won), 0 (old) or None (tie)."""
    def turn(key: str, prompt: list[dict]) -> int | None:
        pair = post(url, key, {"messages": prompt, "temperature": args.temperature, "max_tokens": args.max_tokens},
                    path="/v1/arena")
        (a, b) = pair["completions"]
        if a["content"] == b["content"]:
            return None
        score_a, score_b = rater.scores(prompt, [a["content"], b["content"]])
        chosen, rejected = (a, b) if score_a >= score_b else (b, a)
        answer = post(url, key, {"prompt_id": pair["prompt_id"], "chosen_id": chosen["completion_id"],
                                 "rejected_id": rejected["completion_id"]})
        winner = next(m for m in answer["models"] if m["completion_id"] == chosen["completion_id"])
        return int(winner["model"] == "new")
    return turn


def post(url: str, key: str, body: dict, path: str = "/v1/feedback") -> dict:
    resp = httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=600)
    if resp.status_code != 200:
        sys.exit(f"demo-feedback: {path} answered {resp.status_code}: {resp.text[:500]}")
    return resp.json()


def train_rater(run: Path, args: argparse.Namespace) -> Path:
    out = run / "rater"
    if (out / "model" / "config.json").is_file():
        print(f"demo-feedback: rater {out / 'model'} already trained, reusing it")
        return out / "model"
    chatrl("reward", f"model.name_or_path={args.model}", f"model.dtype={args.dtype}", *_layers(args),
           f"data.paths=[{DATA}]", f"data.split={SPLIT}", f"data.eval_fraction={EVAL_FRACTION}",
           "data.max_length=144", "data.max_prompt_length=64", "data.reward_shards=[sft,rlhf]",
           f"output_dir={out}", "optim.lr=5e-5", "optim.micro_batch_size=8", f"optim.max_steps={args.rater_steps}",
           "optim.warmup_steps=1", "checkpoint.every=0", f"logging.eval_every={args.rater_steps}")
    return out / "model"


def train_kto(run: Path, rows: Path, args: argparse.Namespace) -> Path:
    chatrl("kto", f"model.name_or_path={args.model}", f"model.dtype={args.dtype}", *_layers(args),
           f"data.paths=[{rows}]", "data.split=0,1,0", "data.eval_fraction=0.1", "data.max_length=160",
           "data.max_prompt_length=96", f"output_dir={run / 'kto'}", f"optim.lr={args.lr}", "optim.micro_batch_size=8",
           f"optim.max_steps={args.kto_steps}", "optim.warmup_steps=1", "checkpoint.every=0",
           f"logging.eval_every={args.kto_steps}", f"kto.beta={args.beta}")
    return run / "kto" / "model"


def _layers(args: argparse.Namespace) -> list[str]:
    return [f"model.trainable_layers={args.trainable_layers}"] if args.trainable_layers else []


def run_demo(args: argparse.Namespace) -> dict:
    run = Path(args.run_dir).resolve()
    db = run / "chat.db"
    rater = Rater(train_rater(run, args))
    keys, admin = add_users(db, args.users)
    serve = ["--db", str(db), "--dtype", args.dtype, "--default-max-tokens", str(args.max_tokens)]

    server = Server(run / "logs" / "feedback", "--model", args.model, *serve)
    try:
        rated = in_parallel(give_feedback(server.url, rater, args), prompts("reward", "train", args.prompts), keys,
                            "users chat and rate")
        rows = run / "feedback-kto.jsonl"
        chatrl("feedback", "export", "--db", str(db), "--format", "kto", "--out", str(rows))
        trained = train_kto(run, rows, args)
        swap = post(server.url, admin, {"model": str(trained)}, path="/admin/reload")
        if swap["model_version"] == swap["previous_version"]:
            sys.exit("demo-feedback: the reloaded model has the old weights")
    finally:
        server.stop()

    server = Server(run / "logs" / "arena", "--arena", "--model", f"old={args.model}", "--model", f"new={trained}",
                    *serve)
    try:
        choices = in_parallel(arena_choice(server.url, rater, args),
                              prompts("rlhf", "eval", args.arena_prompts), keys, "arena: old vs new")
    finally:
        server.stop()
    return summarize(db, args, trained, rated, choices, swap)


def summarize(db: Path, args: argparse.Namespace, trained: Path, rated: list[int], choices: list[int | None],
              swap: dict) -> dict:
    decided = [c for c in choices if c is not None]
    p = sum(decided) / len(decided) if decided else float("nan")
    se = proportion_se(p, len(decided))
    versions = {swap["previous_version"], swap["model_version"]}
    store = open_db(db)
    arena = [c for c in comparisons(store) if {c.winner, c.loser} == versions]
    board = {r["model_version"]: r for r in leaderboard(arena)}  # ridge prior 0.1: finite if one side won all
    store.close()
    new, old = board.get(model_version(trained), {}), board.get(swap["previous_version"], {})
    return {"model": args.model, "users": args.users, "feedback_prompts": args.prompts, "ratings": sum(rated),
            "kto_steps": args.kto_steps, "old_version": swap["previous_version"], "new_version": swap["model_version"],
            "arena_prompts": len(choices), "arena_ties": len(choices) - len(decided), "new_wins": sum(decided),
            "decided": len(decided), "new_preference": p, "new_preference_se": se,
            "beyond_2se": bool(decided) and abs(p - 0.5) > 2 * se,
            # two centred strengths: s_old = -s_new, so the difference's s.e. is twice a strength's
            "bt_new_minus_old": new.get("bt", 0.0) - old.get("bt", 0.0), "bt_diff_se": 2 * new.get("bt_se", 0.0)}


def report(r: dict) -> str:
    verdict = "yes" if r["beyond_2se"] else "no"
    rows = [[r["model"], r["users"], r["feedback_prompts"], r["ratings"], r["kto_steps"], r["decided"],
             r["arena_ties"], f"{r['new_preference']:.1%} ± {r['new_preference_se']:.1%}", verdict,
             f"{r['bt_new_minus_old']:+.2f} ± {r['bt_diff_se']:.2f}"]]
    head = ["model", "users", "feedback prompts", "ratings", "KTO steps", "arena choices", "ties",
            "new model preferred (± s.e.)", "beyond 2 s.e. of 50%",
            "Bradley-Terry new - old (± s.e.)"]
    return (table(head, rows) + f"\n\nOld version {r['old_version']}, new {r['new_version']}; the users' taste is a "
            f"reward model trained on other pairs of the same sample (bench/demo_feedback.py).")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the served model (default SmolLM2-135M-Instruct)")
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "demo-feedback"), help="rater, database, KTO run")
    ap.add_argument("--prompts", type=int, default=240, help="feedback prompts (reward shard), 2 ratings each")
    ap.add_argument("--arena-prompts", type=int, default=81, help="arena prompts (the rlhf shard's held-out part)")
    ap.add_argument("--users", type=int, default=4, help="simulated users (threads with their own API keys)")
    ap.add_argument("--max-tokens", type=int, default=48, help="reply length limit")
    ap.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of every reply")
    ap.add_argument("--rater-steps", type=int, default=80, help="reward-model steps of the rater")
    ap.add_argument("--kto-steps", type=int, default=60, help="KTO steps on the feedback (60 x 8 rows: ~1 epoch)")
    ap.add_argument("--lr", type=float, default=1e-4, help="KTO learning rate")
    ap.add_argument("--beta", type=float, default=0.1, help="KTO beta")
    ap.add_argument("--trainable-layers", type=int, default=8, help="top blocks trained (rater and KTO); 0 = all")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="model dtype everywhere")
    ap.add_argument("--out", default=str(RESULTS / "demo-feedback.json"), help="the result JSON")
    ap.add_argument("--readme", action="store_true", help=f"write the table into README's {MARKER} block")
    args = ap.parse_args(argv)
    result = run_demo(args)
    text = report(result)
    print("\n" + text)
    write_json(args.out, result)
    if args.readme:
        update_readme(text, MARKER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
