"""The entry points the training steps call: records or tokenized rows for one step and part.

read -> detect schema / adapt -> parse -> clean (NFC, whitespace, empty, duplicates) -> max_rows ->
split per dataset (sft / reward / rlhf shards, each with an eval part) -> records for the step ->
blend the train parts by `data.weights`. `tokenized_rows` adds tokenization and an on-disk cache.
KTO's records ("kto": `LabeledCompletion`) come from the reward shard: labelled replies as they are, preference
pairs split into a desirable and an undesirable row. Undesirable replies never become SFT targets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal, Union

from chatrl.config import DataConfig
from chatrl.data.adapters import ADAPTERS, find_adapter
from chatrl.data.clean import SCHEMA_HELP, DataReport, clean_text, dedupe, row_key
from chatrl.data.readers import Source, feedback_fingerprint, read_source, resolve_data_source
from chatrl.data.schemas import PAIR_SCHEMAS, SCHEMAS, Example, RowError, detect_schema, parse_row
from chatrl.data.split import STEPS, blend, split_dataset
from chatrl.data.templates import template_of
from chatrl.data.tokenize import encode_conversation, encode_labeled, encode_pair, encode_prompt
from chatrl.data.types import Conversation, LabeledCompletion, PreferencePair, Prompt
from chatrl.errors import ChatrlError
from chatrl.paths import atomic_write_json, cache_dir

log = logging.getLogger("chatrl.data")
Step = Literal["sft", "reward", "rlhf", "kto"]
Part = Literal["train", "eval"]
Record = Union[Conversation, PreferencePair, Prompt, LabeledCompletion]
CACHE_VERSION = "3"  # bump when tokenization or the split changes so old caches are not reused
_HASH_LIMIT = 256 * 2**20  # files up to this size are hashed by content, bigger ones by size+mtime


@dataclasses.dataclass
class Dataset:
    """One cleaned dataset of `data.paths`."""
    spec: str
    seed_name: str  # Source.seed_name: what its split is seeded by
    schema: str
    examples: list[Example]


# ----------------------------------------------------------------------------- reading + cleaning


def _schema_for(cfg: DataConfig, src: Source, rows: list[dict[str, Any]], first_source: str) -> str:
    if cfg.schema != "auto" and cfg.schema not in SCHEMAS and cfg.schema not in ADAPTERS:
        raise ChatrlError(f"data.schema='{cfg.schema}' is unknown; use auto, one of {', '.join(SCHEMAS)}, "
                          f"or a hub name with an adapter: {', '.join(ADAPTERS)}")
    adapter = find_adapter(cfg.schema, src.hub_name)
    if adapter:
        return adapter[0]
    if cfg.schema in SCHEMAS:
        return cfg.schema
    schema = detect_schema(rows)
    if schema is None:
        keys = ", ".join(sorted(rows[0])) if rows else "(none)"
        raise ChatrlError(f"{first_source}: cannot recognise the data schema from the columns ({keys}).\n{SCHEMA_HELP}")
    return schema


def _clean_example(ex: Example) -> Example:
    ex.messages = [{**m, "content": clean_text(m["content"])} for m in ex.messages]  # a tool result keeps its name
    ex.response = clean_text(ex.response) if ex.response is not None else None
    ex.rejected = clean_text(ex.rejected) if ex.rejected is not None else None
    return ex


def _is_empty(ex: Example) -> bool:
    no_prompt = not any(m["content"] for m in ex.messages if m["role"] in ("user", "system"))
    return no_prompt or (ex.response is not None and not ex.response)


def read_examples(spec: str, cfg: DataConfig, report: DataReport, step: str | None = None) -> Dataset:
    """Read, parse and clean one `data.paths` entry (for `step`: a feedback database gives that step's rows); every
    dropped row is counted in `report`."""
    src = resolve_data_source(spec)
    skip = cfg.skip_bad_rows or src.builtin
    if src.builtin and not cfg.skip_bad_rows:
        report.notes.append(f"bad rows of the shipped {spec} are skipped (and counted)")
    raw = read_source(src, report, skip, step)
    if not raw:  # every row was malformed and skipped
        raise ChatrlError(f"{spec}: no usable rows left after filtering.\n{report.summary()}\n{SCHEMA_HELP}")
    schema = _schema_for(cfg, src, [r.data for r in raw], raw[0].source)
    adapter = find_adapter(cfg.schema, src.hub_name)
    examples: list[Example] = []
    for row in raw:
        try:
            data = adapter[1](row.data) if adapter else row.data
            ex = _clean_example(parse_row(schema, data, row.source))
            if ex.is_pair and ex.response == ex.rejected:
                raise RowError("chosen_equals_rejected", "rejected", "is identical to 'chosen' after cleanup")
        except RowError as e:
            report.bad_row(e.reason, row.source, f"{e} (schema '{schema}')", skip)
            continue
        if _is_empty(ex):
            report.drop("empty", row.source)
            continue
        examples.append(ex)
    examples = dedupe(examples, lambda e: row_key([e.messages, e.response, e.rejected, e.label]), report,
                      lambda e: e.source)
    if cfg.max_rows is not None and len(examples) > cfg.max_rows:
        report.drop("over_max_rows", examples[cfg.max_rows].source)
        report.dropped["over_max_rows"] += len(examples) - cfg.max_rows - 1
        examples = examples[: cfg.max_rows]
    report.read[spec], report.schemas[spec], report.kept[spec] = len(raw), schema, len(examples)
    if not examples:
        raise ChatrlError(f"{spec}: no usable rows left after filtering.\n{report.summary()}\n{SCHEMA_HELP}")
    return Dataset(spec, src.seed_name, schema, examples)


def read_all(cfg: DataConfig, step: str | None = None) -> tuple[list[Dataset], DataReport]:
    if not cfg.paths:
        raise ChatrlError("data.paths is empty; give at least one data file, e.g. data.paths=[builtin:hh-rlhf-harmless]")
    report = DataReport()
    return [read_examples(spec, cfg, report, step) for spec in cfg.paths], report


# ----------------------------------------------------------------------------- records per step


def _to_records(examples: list[Example], step: str) -> list[Record]:
    if step == "sft":
        return [e.to_conversation() for e in examples if e.response is not None and not e.is_undesirable]
    if step == "reward":
        return [e.to_pair() for e in examples if e.is_pair]
    if step == "kto":
        return [r for e in examples for r in e.to_labeled()]
    return [e.to_prompt() for e in examples]


def _empty_error(step: str, part: str, datasets: list[Dataset]) -> ChatrlError:
    schemas = ", ".join(f"{d.spec} ({d.schema})" for d in datasets)
    if step == "reward" and not any(d.schema in PAIR_SCHEMAS for d in datasets):
        why = (f"the reward step needs preference pairs, but the data has none: {schemas}. "
               f"Schemas that carry pairs: {', '.join(PAIR_SCHEMAS)} (rows with chosen + rejected).")
    elif step == "kto" and not any(d.schema in (*PAIR_SCHEMAS, "kto") for d in datasets):
        why = (f"KTO needs labelled replies (kto rows {{prompt, completion, label}}) or preference pairs, but the "
               f"data has none: {schemas}.")
    elif step == "sft" and all(d.schema == "prompt" for d in datasets):
        why = f"SFT needs replies, but the data is prompt-only: {schemas}."
    else:
        why = (f"the {step}/{part} shard is empty for {schemas}; check data.split (sft,reward,rlhf shares), "
               "data.eval_fraction and data.max_rows.")
    return ChatrlError(f"no {step} {part} records: {why}\n{SCHEMA_HELP}")


def select_records(datasets: list[Dataset], cfg: DataConfig, step: str, part: str,
                   report: DataReport) -> list[Record]:
    """The records of one (step, part) across datasets; train parts blended by data.weights."""
    if step not in (*STEPS, "kto") or part not in ("train", "eval"):
        raise ChatrlError(f"unknown data step/part {step}/{part}; steps: {', '.join(STEPS)}, kto, parts: train, eval")
    shard = "reward" if step == "kto" else step  # KTO trains on the preference data's shard, as DPO does
    shards = cfg.reward_shards if (shard, part) == ("reward", "train") else [shard]
    unknown = [s for s in shards if s not in STEPS]
    if unknown or not shards:
        raise ChatrlError(f"data.reward_shards={shards}: expected a non-empty list of {', '.join(STEPS)}")
    per_dataset = []
    for d in datasets:
        split = split_dataset(d.examples, d.seed_name, cfg.split, cfg.eval_fraction, cfg.seed)
        per_dataset.append((d.seed_name, _to_records([e for s in shards for e in split[(s, part)]], step)))
    if part == "train":
        records = blend(per_dataset, cfg.weights, cfg.seed)
    else:
        records = [r for _, rs in per_dataset for r in rs]
    report.shards[f"{step}/{part}"] = len(records)
    if not records:
        raise _empty_error(step, part, datasets)
    return records


def load_records(cfg: DataConfig, step: Step, part: Part) -> tuple[list[Record], DataReport]:
    """Records for one step ("sft" -> Conversation, "reward" -> PreferencePair, "rlhf" -> Prompt, "kto" ->
    LabeledCompletion) and part ("train" / "eval"), plus the report of what was dropped and why."""
    datasets, report = read_all(cfg, step)
    records = select_records(datasets, cfg, step, part, report)
    log.info("data %s/%s: %d records\n%s", step, part, len(records), report.summary())
    return records, report


def load_all_records(cfg: DataConfig) -> tuple[dict[str, list[Record]], DataReport]:
    """Every shard: {"sft_train": [...], "sft_eval": [...], "reward_train": ..., "rlhf_eval": ...}.
    Shards a step cannot use (e.g. reward shards of chat data) come back empty instead of failing."""
    datasets, report = read_all(cfg)
    out: dict[str, list[Record]] = {}
    for step in STEPS:
        for part in ("train", "eval"):
            try:
                out[f"{step}_{part}"] = select_records(datasets, cfg, step, part, report)
            except ChatrlError as e:
                out[f"{step}_{part}"] = []
                report.notes.append(str(e).split("\n")[0])
    return out, report


# ----------------------------------------------------------------------------- tokenization + cache


def _encode(tokenizer: Any, rec: Record, step: str, cfg: DataConfig, train_on_prompt: bool) -> dict[str, Any] | None:
    if step == "sft":
        row = encode_conversation(tokenizer, rec, cfg.max_length, train_on_prompt, cfg.overlength)  # type: ignore[arg-type]
        return None if row is None else {**row, "source": rec.source}
    if step == "reward":
        assert isinstance(rec, PreferencePair)
        pair = encode_pair(tokenizer, rec, cfg.max_length, cfg.max_prompt_length, cfg.overlength)
        if pair is None:
            return None
        return {"chosen_ids": pair.chosen, "rejected_ids": pair.rejected, "chosen_prompt_len": pair.chosen_prompt_len,
                "rejected_prompt_len": pair.rejected_prompt_len, "margin": rec.margin, "source": rec.source}
    if step == "kto":
        assert isinstance(rec, LabeledCompletion)
        encoded = encode_labeled(tokenizer, rec, cfg.max_length, cfg.max_prompt_length, cfg.overlength)
        if encoded is None:
            return None
        return {"input_ids": encoded[0], "prompt_len": encoded[1], "desirable": rec.desirable, "source": rec.source}
    assert isinstance(rec, Prompt)
    ids = encode_prompt(tokenizer, rec, cfg.max_prompt_length, cfg.overlength)
    if ids is None:
        return None
    extra = json.loads(json.dumps(rec.extra, default=str))  # same values whether fresh or from the cache
    return {"prompt_ids": ids, "messages": rec.messages, "reference": rec.reference, "extra": extra,
            "source": rec.source}


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    if st.st_size > _HASH_LIMIT:
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_fingerprint(spec: str) -> str:
    """Content hash of a data.paths entry (files hashed; hub names by name)."""
    src = resolve_data_source(spec)
    if src.feedback is not None:
        return feedback_fingerprint(src)
    if src.path is None:
        return f"hub:{spec}"
    files = sorted(p for p in src.path.rglob("*") if p.is_file()) if src.path.is_dir() else [src.path]
    return hashlib.sha256("|".join(f"{p.name}={_file_fingerprint(p)}" for p in files).encode()).hexdigest()


def cache_key(cfg: DataConfig, tokenizer: Any, step: str, part: str, train_on_prompt: bool) -> str:
    parts = {
        "version": CACHE_VERSION,
        "data": [data_fingerprint(s) for s in cfg.paths],
        "cfg": dataclasses.asdict(cfg),
        "tokenizer": [type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
                      template_of(tokenizer)],
        "step": [step, part, train_on_prompt],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tokenized_rows(cfg: DataConfig, tokenizer: Any, step: Step, part: Part, *,
                   train_on_prompt: bool = False) -> list[dict[str, Any]]:
    """Tokenized rows for a step (plain lists, cached under cache_dir("tokenized")):
    sft: input_ids, labels; reward: chosen_ids, rejected_ids, chosen/rejected_prompt_len, margin; rlhf: prompt_ids, messages,
    reference, extra; kto: input_ids, prompt_len, desirable. Every row also has its "source"."""
    path = cache_dir("tokenized") / f"{step}-{part}-{cache_key(cfg, tokenizer, step, part, train_on_prompt)}.json"
    if path.exists():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            log.info("data %s/%s: %d tokenized rows from cache %s", step, part, len(cached["rows"]), path)
            return cached["rows"]
        except (OSError, ValueError, KeyError):
            log.warning("ignoring unreadable tokenized cache %s", path)
    records, report = load_records(cfg, step, part)
    rows = []
    for rec in records:
        row = _encode(tokenizer, rec, step, cfg, train_on_prompt)
        if row is None:
            report.drop("overlength" if cfg.overlength == "drop" else "nothing_to_train", rec.source)
        else:
            rows.append(row)
    if not rows:
        raise ChatrlError(f"every {step}/{part} row was dropped at tokenization (data.max_length={cfg.max_length}, "
                          f"data.max_prompt_length={cfg.max_prompt_length}, data.overlength={cfg.overlength}); "
                          "raise the limits or use data.overlength=truncate.\n" + report.summary())
    log.info("data %s/%s: %d tokenized rows\n%s", step, part, len(rows), report.summary())
    atomic_write_json(path, {"rows": rows, "report": report.to_dict()}, ensure_ascii=False)
    return rows
