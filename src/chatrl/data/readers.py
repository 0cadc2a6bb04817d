"""Readers: turn one `data.paths` entry into raw dict rows, each tagged with its "file:line" source.

Accepted entries: `builtin:NAME` (folders under the repo's `data/`), local `.json` (an array, an
object holding one array, or JSON lines), `.jsonl`, `.jsonl.gz`/`.json.gz`, `.parquet`, `.csv`, a folder
written by `datasets.Dataset.save_to_disk` (or a folder of such files), and hub dataset names loaded
with `datasets.load_dataset` (needs internet). Folders and hub names take an optional `#split` suffix
(default `train`). For parquet and `datasets` folders the "line" is the 1-based row number.

`feedback:PATH` (or a `sqlite:///PATH` URL) reads a `chatrl serve --db` database through `chatrl.feedback.export`:
the rows the asking step trains on (reward/dpo/rlhf: pairs, kto: labelled ratings, sft: liked replies), or the
format named by a `#pairs`, `#kto` or `#sft` suffix.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatrl.data.clean import DataReport
from chatrl.errors import ChatrlError
from chatrl.paths import builtin_data_dir

FILE_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".csv")
BUILTIN_PREFIX = "builtin:"
FEEDBACK_PREFIXES = ("feedback:", "sqlite:")
FEEDBACK_FORMAT = {"reward": "pairs", "rlhf": "pairs", "kto": "kto", "sft": "sft"}  # what each step trains on


@dataclass
class RawRow:
    """One row as read from disk: the JSON object and where it came from ("file:line")."""

    data: dict[str, Any]
    source: str


@dataclass
class Source:
    """A resolved `data.paths` entry: what to read and how to name it."""

    spec: str  # the entry as written in the config
    path: Path | None  # local file/folder, or None for a hub dataset
    hub_name: str | None = None
    split: str | None = None
    builtin: bool = False
    feedback: str | None = None  # the SQLAlchemy URL of a feedback database (`split`: the export format, if named)

    @property
    def seed_name(self) -> str:
        """What the dataset's split and blend shuffles are seeded by (data/split.py): a local file's or folder's own
        name, not the folder it lies in, so the same data gives the same split wherever it is (another checkout, a
        temporary folder); hub and built-in names as written."""
        if self.path is None or self.builtin or self.feedback:
            return self.spec
        return self.path.name + (f"#{self.split}" if self.split else "")


def resolve_data_source(spec: str) -> Source:
    """Map a `data.paths` entry to a local path or a hub name (no reading yet)."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        folder = builtin_data_dir() / name
        if not name or not folder.is_dir():
            have = sorted(p.name for p in builtin_data_dir().iterdir() if p.is_dir())
            raise ChatrlError(f"unknown built-in dataset '{spec}'. Available: {', '.join(BUILTIN_PREFIX + h for h in have)}")
        return Source(spec, folder, builtin=True)
    if spec.startswith(FEEDBACK_PREFIXES):
        return _feedback_source(spec)
    base, _, split = spec.partition("#")
    path = Path(base).expanduser()
    if path.exists():
        return Source(spec, path, split=split or None)
    looks_local = base.startswith(("/", ".", "~")) or base.endswith(FILE_SUFFIXES) or base.count("/") > 1
    if looks_local:
        raise ChatrlError(f"data file not found: {base} (data.paths entry '{spec}')")
    return Source(spec, None, hub_name=base, split=split or None)


def _feedback_source(spec: str) -> Source:
    base, _, fmt = spec.partition("#")
    if fmt and fmt not in FEEDBACK_FORMAT.values():
        raise ChatrlError(f"data.paths entry '{spec}': #{fmt} is no feedback export format; use #pairs, #kto or #sft "
                          f"(or nothing: the format the step trains on)")
    target = base.removeprefix("feedback:")
    if "://" in target and not target.startswith("sqlite:///"):  # a server database (postgresql+psycopg://...)
        return Source(spec, None, split=fmt or None, feedback=target)
    path = Path(target.removeprefix("sqlite:///")).expanduser()
    if not path.is_file():  # opening would create an empty database
        raise ChatrlError(f"feedback database not found: {path} (data.paths entry '{spec}')")
    return Source(spec, None, split=fmt or None, feedback=f"sqlite:///{path.resolve()}")


def _read_feedback(src: Source, step: str | None) -> list[RawRow]:
    """The feedback export rows for `step` (or the `#format` of the entry)."""
    # lazy: SQLAlchemy and Alembic are the optional `feedback` extra
    from chatrl.feedback.db import open_db
    from chatrl.feedback.export import export_rows

    fmt = src.split or FEEDBACK_FORMAT.get(step or "reward", "pairs")
    db = open_db(src.feedback)
    try:
        rows = export_rows(db, fmt).rows
    finally:
        db.close()
    if not rows:
        raise ChatrlError(f"{src.spec}: the feedback database has no {fmt} rows yet (chatrl feedback stats --db ... "
                          f"shows what it holds)")
    return [RawRow(row, f"{src.spec}:{fmt}:{i}") for i, row in enumerate(rows, 1)]


def feedback_fingerprint(src: Source) -> str:
    """What a feedback database's exports depend on: rows are only ever added, so the row counts say it."""
    from chatrl.feedback.db import open_db  # lazy: the optional `feedback` extra
    from chatrl.feedback.store import FeedbackStore

    db = open_db(src.feedback)
    try:
        return f"feedback:{src.feedback}#{src.split}:{sorted(FeedbackStore(db).counts().items())}"
    finally:
        db.close()


def read_source(src: Source, report: DataReport, skip_bad_rows: bool, step: str | None = None) -> list[RawRow]:
    """Read every row of one source (`step`: the step asking, which picks a feedback database's rows). Malformed
    rows raise a ChatrlError or, when skipping, are counted."""
    if src.feedback is not None:
        return _read_feedback(src, step)
    if src.path is None:
        return _read_hub(src)
    if src.path.is_dir():
        return _read_folder(src, report, skip_bad_rows)
    label = src.path.name if src.builtin else str(src.path)
    return read_file(src.path, label, report, skip_bad_rows)


def read_file(path: Path, label: str, report: DataReport, skip: bool) -> list[RawRow]:
    """Read one local file by its suffix; `label` prefixes the "label:line" sources."""
    name = path.name.lower()
    dropped_before = sum(report.dropped.values())
    if not name.endswith(FILE_SUFFIXES):
        raise ChatrlError(f"{path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}")
    if name.endswith(".parquet"):
        rows = _read_parquet(path, label)
    else:
        data = _read_bytes(path)
        if name.endswith(".csv"):
            rows = _read_csv(data, label)
        elif name.endswith((".jsonl", ".jsonl.gz")):
            rows = _read_jsonl(data, label, report, skip)
        else:
            rows = _read_json(data, label, report, skip)
    if not rows and sum(report.dropped.values()) == dropped_before:
        raise ChatrlError(f"{label}: the file is empty (no rows).\nAccepted: {', '.join(FILE_SUFFIXES)}")
    return rows


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as e:
        raise ChatrlError(f"{path}: cannot read the file ({e})") from None
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # drop a UTF-8 byte-order mark


def _decode(data: bytes, label: str) -> str:
    """Decode a whole file as UTF-8 or fail naming the first bad line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ChatrlError(f"{label}:{line}: bytes {data[e.start:e.start + 4]!r} are not valid UTF-8; "
                          f"re-save the file as UTF-8") from None


def _read_jsonl(data: bytes, label: str, report: DataReport, skip: bool) -> list[RawRow]:
    rows = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        source = f"{label}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            report.bad_row("not_utf8", source, f"bytes {raw[e.start:e.start + 4]!r} at column {e.start + 1} are not "
                           "valid UTF-8; re-save the file as UTF-8", skip)
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            report.bad_row("bad_json", source, f"malformed JSON ({e.msg} at column {e.colno})", skip)
            continue
        if not isinstance(obj, dict):
            report.bad_row("not_an_object", source, f"each line must be a JSON object, got {type(obj).__name__}", skip)
            continue
        rows.append(RawRow(obj, source))
    return rows


def _read_json(data: bytes, label: str, report: DataReport, skip: bool) -> list[RawRow]:
    """A JSON array of objects (line numbers kept), an object holding one such array, or JSON lines."""
    text = _decode(data, label)
    start = _skip_ws(text, 0)
    if start == len(text):
        return []
    if text[start] != "[":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # several objects: it is JSON lines in a .json file
                return _read_jsonl(data, label, report, skip)
            raise ChatrlError(f"{label}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        return _rows_from_object(obj, label)
    return _read_json_array(text, start, label, report, skip)


def _read_json_array(text: str, pos: int, label: str, report: DataReport, skip: bool) -> list[RawRow]:
    decoder = json.JSONDecoder()
    rows: list[RawRow] = []
    line, counted = 1, 0
    pos = _skip_ws(text, pos + 1)
    while pos < len(text) and text[pos] != "]":
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ChatrlError(f"{label}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); rows inside a "
                              "JSON array cannot be skipped, fix the file or convert it to JSON lines") from None
        if isinstance(obj, dict):
            rows.append(RawRow(obj, f"{label}:{line}"))
        else:
            report.bad_row("not_an_object", f"{label}:{line}", f"array items must be objects, got {type(obj).__name__}",
                           skip)
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    return rows


def _rows_from_object(obj: Any, label: str) -> list[RawRow]:
    if isinstance(obj, dict):
        lists = [k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(lists) == 1:  # e.g. {"data": [...]} or {"train": [...]}
            key = lists[0]
            return [RawRow(x, f"{label}:{key}[{i}]") for i, x in enumerate(obj[key])]
        if lists:
            raise ChatrlError(f"{label}: the JSON object holds several row lists ({', '.join(lists)}); keep one")
        return [RawRow(obj, f"{label}:1")]
    raise ChatrlError(f"{label}: expected a JSON array of objects, got {type(obj).__name__}")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_csv(data: bytes, label: str) -> list[RawRow]:
    text = _decode(data, label)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for row in reader:
            clean = {k: _maybe_json(v) for k, v in row.items() if k is not None and v is not None}
            rows.append(RawRow(clean, f"{label}:{reader.line_num}"))
    except csv.Error as e:
        raise ChatrlError(f"{label}:{reader.line_num}: malformed CSV ({e})") from None
    return rows


def _maybe_json(value: str) -> Any:
    """CSV cells holding message lists are JSON text; decode those, keep everything else a string."""
    if value.startswith("[{") or value.startswith("[]"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_parquet(path: Path, label: str) -> list[RawRow]:
    import pyarrow.parquet as pq  # lazy: only .parquet files need pyarrow

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise ChatrlError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    return [RawRow(row, f"{label}:{i}") for i, row in enumerate(table.to_pylist(), start=1)]


def _read_folder(src: Source, report: DataReport, skip: bool) -> list[RawRow]:
    folder = src.path
    assert folder is not None
    if (folder / "dataset_dict.json").exists() or (folder / "state.json").exists():
        return _read_saved_dataset(src)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(FILE_SUFFIXES))
    if not files:
        raise ChatrlError(f"{folder}: folder holds no data files ({', '.join(FILE_SUFFIXES)}) and is not a "
                          "`datasets` save_to_disk folder")
    rows = []
    for f in files:
        label = f"{src.spec}/{f.name}" if src.builtin else str(f)
        rows.extend(read_file(f, label, report, skip))
    return rows


def _pick_split(obj: Any, split: str | None, where: str) -> tuple[Any, str]:
    """From a DatasetDict take `split` (default train, else the only/first split)."""
    from datasets import DatasetDict  # lazy: `datasets` is slow to import; only saved datasets / hub names need it

    if not isinstance(obj, DatasetDict):
        return obj, ""
    names = list(obj.keys())
    want = split or ("train" if "train" in names else names[0])
    if want not in names:
        raise ChatrlError(f"{where}: no split '{want}'; available splits: {', '.join(names)}")
    return obj[want], want


def _read_saved_dataset(src: Source) -> list[RawRow]:
    from datasets import load_from_disk  # lazy: `datasets` is slow to import

    try:
        loaded = load_from_disk(str(src.path))
    except Exception as e:  # datasets raises FileNotFoundError/ValueError/... for broken folders
        raise ChatrlError(f"{src.path}: cannot load the `datasets` folder ({type(e).__name__}: {e})") from None
    ds, split = _pick_split(loaded, src.split, str(src.path))
    label = f"{src.path}[{split}]" if split else str(src.path)
    return [RawRow(dict(row), f"{label}:{i}") for i, row in enumerate(ds, start=1)]


def _read_hub(src: Source) -> list[RawRow]:
    """Load a hub dataset by name (internet needed unless `datasets` has it cached)."""
    from datasets import load_dataset  # lazy: `datasets` is slow to import

    name = src.hub_name
    try:
        ds = load_dataset(name, split=src.split or "train")
    except Exception as e:  # offline: ConnectionError / OfflineModeIsEnabled / DatasetNotFoundError ...
        raise ChatrlError(
            f"could not load '{name}' from the Hugging Face hub ({type(e).__name__}: {str(e)[:300]}).\n"
            "If this machine is offline, download it elsewhere with "
            f"`datasets.load_dataset('{name}').save_to_disk(DIR)`, copy DIR here and set data.paths=[DIR]; "
            "or convert it to a local .jsonl/.parquet/.csv file.") from None
    return [RawRow(dict(row), f"{name}[{src.split or 'train'}]:{i}") for i, row in enumerate(ds, start=1)]
