"""An LLM judge as a reward source (`reward.judge`): any OpenAI-compatible chat endpoint scores the replies.

mode=score: each (prompt, reply) fills the rubric; the answer's "Score: N" (or an answer that is only a number,
e.g. "7" or "7/10") must lie in [score_min, score_max] and is scaled to [0, 1]. mode=pairwise: within each group
of G replies to one prompt, every two replies are compared (both orders with `swap`); a reply's score is its share
of wins in [0, 1], a tie counting 1/2.

Requests run on a thread pool of `concurrency` workers with the official `openai` client; a timeout, a failed
connection or HTTP 408/409/429/5xx is retried `retries` times after backoff_s * 2^k seconds; any other HTTP error
(a wrong key, model or URL) stops the run at once. Answers that parse are kept in an SQLite cache keyed by the hash
of (rubric, model, prompt, reply), so a rerun asks nothing twice. An answer without a valid score, or a request
that failed after its retries, either stops the run with one line naming the endpoint and quoting the answer
(on_error=error) or drops the episode's group from the update (on_error=skip, counted): never a silent zero.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chatrl.config_sources import JudgeConfig
from chatrl.errors import ChatrlError
from chatrl.plugins import import_optional

DEFAULT_RUBRIC = """You are grading an AI assistant's reply to a user.

[User]
{prompt}

[Assistant]
{reply}

Rate the reply's helpfulness, correctness and clarity from 1 (useless or wrong) to 10 (excellent). Answer with one \
line "Score: N", N an integer from 1 to 10, and nothing else."""

DEFAULT_PAIRWISE_RUBRIC = """You are comparing two AI assistant replies to the same user message.

[User]
{prompt}

[Reply A]
{reply_a}

[Reply B]
{reply_b}

Which reply is more helpful, correct and clear? Answer with one line "Winner: A", "Winner: B" or "Winner: tie", \
and nothing else."""

PLACEHOLDERS = {"score": ("prompt", "reply"), "pairwise": ("prompt", "reply_a", "reply_b")}
# HTTP statuses worth retrying: the server is busy or broken for now; any other 4xx is the request's own fault
RETRY_STATUSES = frozenset({408, 409, 429})
METRICS = ("judge/requests", "judge/cache_hits", "judge/errors", "judge/skipped")  # counts: summed over ranks

_NUMBER = r"([-+]?\d+(?:\.\d+)?)"
_SCORE_LINE = re.compile(r"score\W{0,3}\s*[:=]\s*\**\s*" + _NUMBER, re.IGNORECASE)
_BARE_NUMBER = re.compile(r"^\s*\**\s*" + _NUMBER + r"\s*(?:/\s*\d+(?:\.\d+)?)?\s*\**\s*\.?\s*$")
_WINNER_LINE = re.compile(r"winner\W{0,3}\s*[:=]\s*\**\s*(a|b|tie)\b", re.IGNORECASE)
_BARE_WINNER = re.compile(r"^\s*\**\s*(a|b|tie)\s*\**\s*\.?\s*$", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\{(prompt|reply|reply_a|reply_b)\}")


class AnswerError(ValueError):
    """The judge answered, but not with a valid score."""


# ----------------------------------------------------------------------------- rubric and parsing


def load_rubric(rubric: str | None, mode: str) -> str:
    """The template: the built-in one, the text of a file, or the inline text; its placeholders checked."""
    if rubric is None:
        return DEFAULT_RUBRIC if mode == "score" else DEFAULT_PAIRWISE_RUBRIC
    text = rubric
    if "{" not in rubric and Path(rubric).is_file():
        text = Path(rubric).read_text(encoding="utf-8")
    missing = [f"{{{name}}}" for name in PLACEHOLDERS[mode] if f"{{{name}}}" not in text]
    if missing:
        where = f"file {rubric}" if text is not rubric else f"{rubric!r:.80}"
        raise ChatrlError(f"reward.judge.rubric ({where}) lacks {', '.join(missing)}: mode={mode} needs the "
                          f"placeholders {', '.join('{' + p + '}' for p in PLACEHOLDERS[mode])} (or a file path)")
    return text


def fill(template: str, **values: str) -> str:
    """The template with its placeholders replaced in one pass (braces elsewhere, and in the values, stay)."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def parse_score(answer: str, low: float, high: float) -> float:
    """The answer's score scaled from [low, high] to [0, 1]; AnswerError without one, or out of range."""
    found = _SCORE_LINE.findall(answer) or _BARE_NUMBER.findall(answer)
    if not found:
        raise AnswerError(f"holds no score (expected 'Score: N' with N in {low:g}..{high:g})")
    value = float(found[-1])  # the verdict comes last when the judge reasons first
    if not low <= value <= high:
        raise AnswerError(f"gives score {value:g}, outside {low:g}..{high:g}")
    return (value - low) / (high - low)


def parse_preference(answer: str) -> float:
    """1.0 when reply A wins, 0.0 when B wins, 0.5 for a tie; AnswerError otherwise."""
    found = _WINNER_LINE.findall(answer) or _BARE_WINNER.findall(answer)
    if not found:
        raise AnswerError("names no winner (expected 'Winner: A', 'Winner: B' or 'Winner: tie')")
    return {"a": 1.0, "b": 0.0, "tie": 0.5}[found[-1].lower()]


def prompt_text(prompt: Any) -> str:
    """A chat prompt as the rubric shows it: a lone user message's text, else 'role: content' paragraphs."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return str(prompt[0]["content"])
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


# ----------------------------------------------------------------------------- cache


class AnswerCache:
    """Answers that parsed, by key, in an SQLite file: every write is one transaction (atomic), so a run killed
    mid-write leaves the cache readable, and ranks sharing the file wait on SQLite's lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def get(self, keys: Sequence[str]) -> dict[str, str]:
        if not keys:
            return {}
        with self._connect() as db:
            marks = ",".join("?" * len(keys))
            return dict(db.execute(f"SELECT key, answer FROM answers WHERE key IN ({marks})", list(keys)))

    def put(self, items: dict[str, str]) -> None:
        if items:
            with self._connect() as db:  # one transaction: committed whole or not at all
                db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?)", list(items.items()))


def cache_key(*parts: str) -> str:
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- the judge


@dataclass
class Query:
    """One question to the judge: the filled rubric, its cache key and the parser of its answer."""

    text: str
    key: str
    prompt: str


@dataclass
class JudgeScores:
    """scores [B] in [0, 1] (0 where not kept) and kept [B] (False: the row's group is left out of the update)."""

    scores: torch.Tensor
    kept: torch.Tensor


class Judge:
    """The configured endpoint, rubric and cache; `score` judges one batch of replies (groups of G in a row)."""

    def __init__(self, cfg: JudgeConfig, output_dir: str | Path) -> None:
        assert cfg.base_url is not None
        # an optional dependency (the `judge` extra), imported only when a judge is configured
        openai = import_optional("openai", "judge", "reward.judge")
        self.cfg, self.openai = cfg, openai
        self.rubric = load_rubric(cfg.rubric, cfg.mode)
        key = None
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ChatrlError(f"reward.judge.api_key_env={cfg.api_key_env}: that environment variable is not set")
        # the client's own retries are off: ours count, log and back off as configured
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=key or "none", timeout=cfg.timeout_s,
                                    max_retries=0)
        self.cache = None
        if cfg.cache != "off":
            self.cache = AnswerCache(Path(output_dir) / "judge_cache.sqlite" if cfg.cache == "auto"
                                     else Path(cfg.cache))
        self._lock = threading.Lock()
        self._counts: dict[str, float] = {}
        self.take_metrics()

    # --------------------------------------------------------------- public

    @property
    def weight(self) -> float:
        return self.cfg.weight

    def score(self, prompts: Sequence[Any], replies: Sequence[str], group_size: int = 1) -> JudgeScores:
        """Scores [B] of the replies (row i answers prompts[i]; groups of `group_size` consecutive rows)."""
        texts = [prompt_text(p) for p in prompts]
        if self.cfg.mode == "pairwise":
            scores, failed = self._pairwise(texts, list(replies), group_size)
        else:
            queries = [self._query(t, reply=r) for t, r in zip(texts, replies, strict=True)]
            values = self._ask(queries)
            scores = [v if isinstance(v, float) else 0.0 for v in values]
            failed = [not isinstance(v, float) for v in values]
        kept = torch.tensor(failed, dtype=torch.bool).reshape(-1, group_size).any(1, keepdim=True).logical_not()
        kept = kept.expand(-1, group_size).reshape(-1)  # a group missing one score has no baseline: all of it goes
        self._add("judge/skipped", int((~kept).sum()))
        return JudgeScores(torch.tensor(scores, dtype=torch.float32) * kept, kept)

    def take_metrics(self) -> dict[str, float]:
        """The counts since the last call, and the mean latency of the requests that got an answer (0: none)."""
        with self._lock:
            out = {k: self._counts.get(k, 0) for k in METRICS}
            answered = self._counts.get("answered", 0)
            out["judge/latency_s"] = self._counts.get("latency", 0.0) / answered if answered else 0.0
            self._counts = {}
        return out

    # --------------------------------------------------------------- queries

    def _query(self, prompt: str, **replies: str) -> Query:
        return Query(fill(self.rubric, prompt=prompt, **replies),
                     cache_key(self.rubric, self.cfg.model, prompt, *replies.values()), prompt)

    def _pairwise(self, prompts: list[str], replies: list[str], g: int) -> tuple[list[float], list[bool]]:
        """Every two replies of a group compared (both orders with swap); a reply's score = its share of wins."""
        pairs = [(s + i, s + j) for s in range(0, len(replies), g) for i in range(g) for j in range(g)
                 if i != j and (self.cfg.swap or i < j)]
        queries = [self._query(prompts[a], reply_a=replies[a], reply_b=replies[b]) for a, b in pairs]
        wins, games, failed = [0.0] * len(replies), [0] * len(replies), [False] * len(replies)
        for (a, b), value in zip(pairs, self._ask(queries, parse=parse_preference), strict=True):
            if not isinstance(value, float):
                failed[a] = failed[b] = True
                continue
            wins[a] += value
            wins[b] += 1.0 - value
            games[a] += 1
            games[b] += 1
        return [w / n if n else 0.0 for w, n in zip(wins, games, strict=True)], failed

    def _parse(self, answer: str) -> float:
        return parse_score(answer, self.cfg.score_min, self.cfg.score_max)

    def _ask(self, queries: list[Query], parse: Any = None) -> list[float | str]:
        """Each query's parsed answer, or a one-line reason it has none (raised at once with on_error=error)."""
        parse = parse or self._parse
        cached = self.cache.get(sorted({q.key for q in queries})) if self.cache else {}
        todo = list({q.key: q for q in queries if q.key not in cached}.values())  # duplicates asked once
        self._add("judge/cache_hits", len(queries) - sum(q.key not in cached for q in queries))
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="chatrl-judge") as pool:
            fresh = dict(zip((q.key for q in todo), pool.map(self._request, todo), strict=True))
        results: dict[str, float | str] = {}
        good: dict[str, str] = {}
        for key, answer in {**cached, **fresh}.items():
            if isinstance(answer, Failure):
                results[key] = answer.reason
                continue
            try:
                results[key] = parse(answer)
                good[key] = answer
            except AnswerError as e:
                results[key] = f"answered {answer!r:.300}, which {e}"
        if self.cache:
            self.cache.put({k: v for k, v in good.items() if k not in cached})
        failures = [q for q in queries if isinstance(results[q.key], str)]
        self._add("judge/errors", len(failures))
        if failures and self.cfg.on_error == "error":
            q = failures[0]
            raise ChatrlError(f"reward.judge at {self.cfg.base_url} (model {self.cfg.model}) {results[q.key]} "
                              f"[prompt {q.prompt!r:.80}]; {len(failures)} of {len(queries)} judgements failed. "
                              "reward.judge.on_error=skip leaves such groups out of the update instead")
        return [results[q.key] for q in queries]

    def _request(self, query: Query) -> str | Failure:
        """The judge's answer text, retrying transient failures with exponential backoff."""
        errors = self.openai
        reason = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            self._add("judge/requests", 1)
            start = time.perf_counter()
            try:
                reply = self.client.chat.completions.create(
                    model=self.cfg.model, messages=[{"role": "user", "content": query.text}],
                    temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens)
            except errors.APITimeoutError:
                reason = f"gave no answer within timeout_s={self.cfg.timeout_s:g}"
            except errors.APIConnectionError as e:
                reason = f"could not be reached ({e.__cause__ or e})"
            except errors.APIStatusError as e:
                reason = f"answered HTTP {e.status_code}: {_body(e)!r:.300}"
                if e.status_code < 500 and e.status_code not in RETRY_STATUSES:  # wrong key, model or URL
                    raise ChatrlError(f"reward.judge at {self.cfg.base_url} (model {self.cfg.model}) {reason}; "
                                      "check reward.judge.base_url, model and api_key_env") from None
            else:
                self._add("latency", time.perf_counter() - start)
                self._add("answered", 1)
                return (reply.choices[0].message.content or "") if reply.choices else ""
        return Failure(f"{reason} ({self.cfg.retries + 1} attempts)")

    def _add(self, key: str, value: float) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + value


@dataclass
class Failure:
    """A request that got no answer after its retries."""

    reason: str


def _body(error: Any) -> str:
    """The error response's text, as the endpoint sent it."""
    try:
        return error.response.text
    except Exception:  # a body that cannot be read still leaves the status to report
        return ""
